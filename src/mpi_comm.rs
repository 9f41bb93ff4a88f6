//! The MPI implementation of [`Comm`] (cargo feature `mpi`, on by default), over rsmpi.
//!
//! Every collective is issued as a non-blocking MPI operation and polled: a few quick polls, then
//! a 1 ms sleep between polls. A rank blocked in a plain MPI collective spins a core at 100%
//! (`../shared/notes/mpi.md`), which on an oversubscribed node steals the CPU its peers need to
//! finish the very copy it waits for. Variable-size data goes as a size exchange followed by an
//! `MPI_Iallgatherv` / `MPI_Ibcast`. This module also owns MPI start-up and the panic hook that
//! turns a panic on any rank, in any thread, into `MPI_Abort` (a default Rust panic under MPI
//! hangs the whole job). It never touches files.

use std::time::Duration;

use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;

use crate::comm::Comm;
use crate::error::{Error, ErrorClass, Result};

/// The world communicator of an MPI job.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
}

/// MPI as this process started it. Keep it alive until the end of `main`: dropping it finalizes
/// MPI.
pub struct Mpi {
    /// The universe (finalizes MPI on drop).
    pub universe: Universe,
    /// The collectives over `MPI_COMM_WORLD`.
    pub comm: MpiComm,
}

/// Whether this process was started by an MPI launcher (mpirun, srun, ...), judged from the
/// environment the launchers set. `FERRY_MPI=1` forces MPI (a singleton), `FERRY_MPI=0` avoids it.
pub fn launched() -> bool {
    match std::env::var("FERRY_MPI").as_deref() {
        Ok("1") => return true,
        Ok("0") => return false,
        _ => {}
    }
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_RANK",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALNRANKS",
        "MV2_COMM_WORLD_SIZE",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Initialise MPI (threads may exist, only the main thread calls MPI) and install the panic hook.
pub fn init() -> Result<Mpi> {
    let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .ok_or_else(|| Error::internal("MPI was already initialised"))?;
    let world = universe.world();
    let comm = MpiComm {
        rank: world.rank() as usize,
        size: world.size() as usize,
        world,
    };
    install_panic_hook(comm.rank, comm.size);
    unpin();
    Ok(Mpi { universe, comm })
}

/// Open MPI binds each rank to one core when ranks are few (`-n 1`, `-n 2`), which would run all
/// of a rank's copy threads on that core. ferry's ranks are I/O-bound thread pools: give this
/// thread (and so every thread it starts later) every online CPU, as `--bind-to none` would.
fn unpin() {
    // SAFETY: sysconf, CPU_ZERO/CPU_SET on a local cpu_set_t, and sched_get/setaffinity of the
    // calling thread (pid 0) with its size; no memory is shared.
    unsafe {
        let online = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let mut now: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut now) != 0
            || libc::CPU_COUNT(&now) as usize >= online
        {
            return;
        }
        let mut all: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..online.min(libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut all);
        }
        if libc::sched_setaffinity(0, size, &all) == 0 {
            log::debug!(
                "unpinned: {} of {online} CPUs were allowed by the launcher's binding",
                libc::CPU_COUNT(&now)
            );
        }
    }
}

/// On a panic anywhere (a copy thread included): print it with the rank, then `MPI_Abort`, which
/// ends every rank of the job at once instead of leaving them waiting in a collective.
fn install_panic_hook(rank: usize, size: usize) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("ferry r{rank}/{size} error: internal: panic: {info} — aborting the MPI job");
        default(info);
        // SAFETY: MPI_Abort may be called from any thread once MPI is initialised; it does not
        // return. RSMPI_COMM_WORLD is the predefined world communicator.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
        }
    }));
}

/// Wait for a request without spinning a core: poll quickly at first, then every millisecond.
/// A rank that was signalled and still waits for its peers after `stop::GRACE` ends the job:
/// a peer that does not come has died, and waiting for the launcher's kill can take Slurm's
/// KillWait (30 s by default). Everything the rank made durable stays; the transfer is resumable.
fn wait_polled<'a, R: ?Sized, S: Scope<'a>>(mut req: Request<'a, R, S>) {
    let mut polls = 0u32;
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => req = r,
        }
        polls += 1;
        if polls.is_multiple_of(128) && crate::stop::grace_expired() {
            let (rank, size) = crate::comm::thread_rank();
            eprintln!(
                "ferry r{rank}/{size}: stopping, but a peer rank has not answered within {:?} of \
                 the signal (it may have died): ending the job; the transfer is resumable",
                crate::stop::GRACE
            );
            // SAFETY: MPI is initialised (this rank is waiting on an MPI request); MPI_Abort
            // does not return. RSMPI_COMM_WORLD is the predefined world communicator.
            unsafe {
                mpi::ffi::MPI_Abort(
                    mpi::ffi::RSMPI_COMM_WORLD,
                    ErrorClass::Interrupted.exit_code(),
                );
            }
        }
        if polls < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn too_big(n: usize) -> Error {
    Error::new(
        ErrorClass::Internal,
        format!("a collective message of {n} bytes exceeds MPI's 2 GiB count limit"),
    )
}

/// The most bytes one rank puts into one round of a v-collective: every round carries at most
/// `ranks` × this, well under MPI's 2 GiB count limit (`FERRY_MPI_CHUNK` makes it smaller, so
/// tests can drive many rounds with little data).
fn piece(ranks: usize) -> u64 {
    let cap = (Count::MAX as u64 / 2) / ranks.max(1) as u64;
    let want = std::env::var("FERRY_MPI_CHUNK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(256 << 20);
    want.min(cap).max(1)
}

/// Rounds needed to move parts of up to `largest` bytes `piece` bytes at a time (at least one,
/// so an all-empty collective still meets).
fn rounds(largest: u64, piece: u64) -> u64 {
    largest.div_ceil(piece).max(1)
}

/// The bytes of `data` that travel in round `k`.
fn part_of(data: &[u8], k: u64, piece: u64) -> &[u8] {
    let from = (k * piece).min(data.len() as u64) as usize;
    let to = ((k + 1) * piece).min(data.len() as u64) as usize;
    &data[from..to]
}

/// Counts, displacements and total for a v-collective of parts of `sizes` bytes. Open MPI
/// refuses zero counts there (MPI_ERR_ARG), so an empty part travels as one ignored byte.
fn layout(sizes: &[u64]) -> Result<(Vec<Count>, Vec<Count>, u64)> {
    let total: u64 = sizes.iter().map(|&s| s.max(1)).sum();
    if total > Count::MAX as u64 {
        return Err(too_big(total as usize));
    }
    let counts: Vec<Count> = sizes.iter().map(|&s| s.max(1) as Count).collect();
    let displs: Vec<Count> = counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect();
    Ok((counts, displs, total))
}

/// The parts of a v-collective's receive buffer, padding dropped.
fn unpack(buf: &[u8], sizes: &[u64], displs: &[Count]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .zip(displs)
        .map(|(&s, &d)| buf[d as usize..d as usize + s as usize].to_vec())
        .collect()
}

impl MpiComm {
    /// End every rank of the job with `code` (for errors that leave ranks out of step).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn allgather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.size;
        let mine = data.len() as u64;
        let mut sizes = vec![0u64; n];
        mpi::request::scope(|scope| {
            wait_polled(
                self.world
                    .immediate_all_gather_into(scope, &mine, &mut sizes[..]),
            );
        });
        // In rounds of at most `piece` bytes per rank: no message nears the count limit.
        let piece = piece(n);
        let mut out: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&s| Vec::with_capacity(s as usize))
            .collect();
        for k in 0..rounds(sizes.iter().copied().max().unwrap_or(0), piece) {
            let these: Vec<u64> = sizes
                .iter()
                .map(|&s| (s.min((k + 1) * piece)).saturating_sub(k * piece))
                .collect();
            let (counts, displs, total) = layout(&these)?;
            let pad = [0u8];
            let mine = part_of(data, k, piece);
            let send: &[u8] = if mine.is_empty() { &pad } else { mine };
            let mut buf = vec![0u8; total as usize];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                mpi::request::scope(|scope| {
                    wait_polled(
                        self.world
                            .immediate_all_gather_varcount_into(scope, send, &mut part),
                    );
                });
            }
            for (o, p) in out.iter_mut().zip(unpack(&buf, &these, &displs)) {
                o.extend_from_slice(&p);
            }
        }
        Ok(out)
    }

    fn broadcast(&self, root: usize, data: &[u8]) -> Result<Vec<u8>> {
        let proc = self.world.process_at_rank(root as i32);
        let mut len: u64 = if self.rank == root {
            data.len() as u64
        } else {
            0
        };
        mpi::request::scope(|scope| {
            wait_polled(proc.immediate_broadcast_into(scope, &mut len));
        });
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = if self.rank == root {
            data.to_vec()
        } else {
            vec![0u8; len as usize]
        };
        // MPI counts are ints: send big payloads in pieces.
        for p in buf.chunks_mut(piece(1) as usize) {
            mpi::request::scope(|scope| {
                wait_polled(proc.immediate_broadcast_into(scope, p));
            });
        }
        Ok(buf)
    }

    fn gather(&self, root: usize, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let proc = self.world.process_at_rank(root as i32);
        let n = self.size;
        let mine = data.len() as u64;
        let piece = piece(n);
        let pad = [0u8];
        if self.rank != root {
            mpi::request::scope(|scope| {
                wait_polled(proc.immediate_gather_into(scope, &mine));
            });
            let mut k_max: u64 = 0;
            mpi::request::scope(|scope| {
                wait_polled(proc.immediate_broadcast_into(scope, &mut k_max));
            });
            for k in 0..k_max {
                // Zero counts are refused by Open MPI's v-collectives: an empty part travels as
                // a byte.
                let p = part_of(data, k, piece);
                let send: &[u8] = if p.is_empty() { &pad } else { p };
                mpi::request::scope(|scope| {
                    wait_polled(proc.immediate_gather_varcount_into(scope, send));
                });
            }
            return Ok(Vec::new());
        }
        let mut sizes = vec![0u64; n];
        mpi::request::scope(|scope| {
            wait_polled(proc.immediate_gather_into_root(scope, &mine, &mut sizes[..]));
        });
        // In rounds of at most `piece` bytes per rank: no message nears the count limit.
        let mut k_max = rounds(sizes.iter().copied().max().unwrap_or(0), piece);
        mpi::request::scope(|scope| {
            wait_polled(proc.immediate_broadcast_into(scope, &mut k_max));
        });
        let mut out: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&s| Vec::with_capacity(s as usize))
            .collect();
        for k in 0..k_max {
            let these: Vec<u64> = sizes
                .iter()
                .map(|&s| (s.min((k + 1) * piece)).saturating_sub(k * piece))
                .collect();
            let (counts, displs, total) = layout(&these)?;
            let p = part_of(data, k, piece);
            let send: &[u8] = if p.is_empty() { &pad } else { p };
            let mut buf = vec![0u8; total as usize];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                mpi::request::scope(|scope| {
                    wait_polled(proc.immediate_gather_varcount_into_root(scope, send, &mut part));
                });
            }
            for (o, p) in out.iter_mut().zip(unpack(&buf, &these, &displs)) {
                o.extend_from_slice(&p);
            }
        }
        Ok(out)
    }

    fn scatter(&self, root: usize, parts: &[Vec<u8>]) -> Result<Vec<u8>> {
        let proc = self.world.process_at_rank(root as i32);
        let n = self.size;
        let piece = piece(n);
        let mut len: u64 = 0;
        let mut sizes: Vec<u64> = Vec::new();
        if self.rank == root {
            if parts.len() != n {
                return Err(Error::internal("scatter: one part per rank is needed"));
            }
            sizes = parts.iter().map(|p| p.len() as u64).collect();
            mpi::request::scope(|scope| {
                wait_polled(proc.immediate_scatter_into_root(scope, &sizes[..], &mut len));
            });
        } else {
            mpi::request::scope(|scope| {
                wait_polled(proc.immediate_scatter_into(scope, &mut len));
            });
        }
        // In rounds of at most `piece` bytes per rank: no message nears the count limit.
        let mut k_max = rounds(sizes.iter().copied().max().unwrap_or(0), piece);
        mpi::request::scope(|scope| {
            wait_polled(proc.immediate_broadcast_into(scope, &mut k_max));
        });
        let mut out = Vec::with_capacity(len as usize);
        for k in 0..k_max {
            let mine = (len.min((k + 1) * piece)).saturating_sub(k * piece);
            // Zero counts are refused by Open MPI's v-collectives: empty parts travel as a byte.
            let mut buf = vec![0u8; mine.max(1) as usize];
            if self.rank == root {
                let mut counts: Vec<Count> = Vec::with_capacity(n);
                let mut displs: Vec<Count> = Vec::with_capacity(n);
                let mut send: Vec<u8> = Vec::new();
                for p in parts {
                    let p = part_of(p, k, piece);
                    displs.push(send.len() as Count);
                    if p.is_empty() {
                        send.push(0);
                    } else {
                        send.extend_from_slice(p);
                    }
                    counts.push(p.len().max(1) as Count);
                }
                let part = mpi::datatype::Partition::new(&send[..], &counts[..], &displs[..]);
                mpi::request::scope(|scope| {
                    wait_polled(proc.immediate_scatter_varcount_into_root(
                        scope,
                        &part,
                        &mut buf[..],
                    ));
                });
            } else {
                mpi::request::scope(|scope| {
                    wait_polled(proc.immediate_scatter_varcount_into(scope, &mut buf[..]));
                });
            }
            buf.truncate(mine as usize);
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    fn scatter_each(&self, root: usize, make: &mut dyn FnMut(usize) -> Vec<u8>) -> Result<Vec<u8>> {
        // Point to point, one rank at a time: the root holds one part at once. The length goes
        // first; big parts travel in pieces (MPI counts are ints). Messages between two ranks
        // with one tag arrive in order.
        const TAG: i32 = 7;
        let piece = piece(1) as usize;
        if self.rank == root {
            for r in (0..self.size).filter(|&r| r != root) {
                let part = make(r);
                let to = self.world.process_at_rank(r as i32);
                let len = part.len() as u64;
                mpi::request::scope(|scope| {
                    wait_polled(to.immediate_send_with_tag(scope, &len, TAG));
                });
                for p in part.chunks(piece) {
                    mpi::request::scope(|scope| {
                        wait_polled(to.immediate_send_with_tag(scope, p, TAG));
                    });
                }
            }
            return Ok(Vec::new());
        }
        let from = self.world.process_at_rank(root as i32);
        let mut len: u64 = 0;
        mpi::request::scope(|scope| {
            wait_polled(from.immediate_receive_into_with_tag(scope, &mut len, TAG));
        });
        let mut buf = vec![0u8; len as usize];
        for p in buf.chunks_mut(piece) {
            mpi::request::scope(|scope| {
                wait_polled(from.immediate_receive_into_with_tag(scope, p, TAG));
            });
        }
        Ok(buf)
    }

    fn barrier(&self) -> Result<()> {
        wait_polled(self.world.immediate_barrier());
        Ok(())
    }
}
