//! The collective layer: what ranks say to each other, and nothing else.
//!
//! [`Comm`] is the small set of collectives the protocol needs (allgather, broadcast, gather and
//! the reductions built from them). Two implementations live here: [`SingleComm`] (one rank, what
//! runs without a launcher) and [`ThreadComm`] (N ranks as threads in one process, what the fast
//! tests and `--ranks N` use). The MPI implementation drops in behind the same trait.
//!
//! Every rank must call the same collectives in the same order. [`agree`] is the one way a rank's
//! local outcome becomes a collective one: each phase ends with it, so an error on any rank reaches
//! every rank and all of them leave through the same door. Collectives are called only from a
//! rank's main thread, never from copy workers.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, ErrorClass, Result};

/// The collectives the transfer protocol uses.
pub trait Comm {
    /// This rank's number, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank contributes `data`; every rank receives all contributions, indexed by rank.
    fn allgather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// `root` sends `data` (ignored elsewhere); every rank receives it.
    fn broadcast(&self, root: usize, data: &[u8]) -> Result<Vec<u8>> {
        let mine: &[u8] = if self.rank() == root { data } else { &[] };
        let mut all = self.allgather(mine)?;
        Ok(std::mem::take(&mut all[root]))
    }

    /// Every rank sends `data`; `root` receives all of it (others get an empty list).
    fn gather(&self, root: usize, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.allgather(data)?;
        Ok(if self.rank() == root { all } else { Vec::new() })
    }

    /// `root` sends `parts[r]` to each rank `r` (`parts` is ignored elsewhere); each rank
    /// receives its own part. The default goes through [`Comm::broadcast`], fine within one
    /// process; MPI sends each rank only its part.
    fn scatter(&self, root: usize, parts: &[Vec<u8>]) -> Result<Vec<u8>> {
        let mut packed = Vec::new();
        if self.rank() == root {
            for p in parts {
                packed.extend_from_slice(&(p.len() as u64).to_le_bytes());
                packed.extend_from_slice(p);
            }
        }
        let all = self.broadcast(root, &packed)?;
        let mut at = 0usize;
        for r in 0..self.size() {
            if at + 8 > all.len() {
                return Err(Error::internal("scatter: short message"));
            }
            let len = decode_u64(&all[at..at + 8]) as usize;
            at += 8;
            if r == self.rank() {
                return Ok(all[at..at + len].to_vec());
            }
            at += len;
        }
        Err(Error::internal("scatter: no part for this rank"))
    }

    /// Like [`Comm::scatter`], but `root` makes each rank's part only when it is sent
    /// (`make(r)` for every `r != root`; the root's own part is empty), so it never holds all
    /// of them at once. The default makes them all and scatters; MPI sends them one by one.
    fn scatter_each(&self, root: usize, make: &mut dyn FnMut(usize) -> Vec<u8>) -> Result<Vec<u8>> {
        let parts: Vec<Vec<u8>> = if self.rank() == root {
            (0..self.size())
                .map(|r| if r == root { Vec::new() } else { make(r) })
                .collect()
        } else {
            Vec::new()
        };
        self.scatter(root, &parts)
    }

    /// The sum of `v` over all ranks.
    fn allreduce_sum(&self, v: u64) -> Result<u64> {
        let all = self.allgather(&v.to_le_bytes())?;
        Ok(all.iter().map(|b| decode_u64(b)).sum())
    }

    /// Wait until every rank arrives.
    fn barrier(&self) -> Result<()> {
        self.allgather(&[]).map(|_| ())
    }
}

fn decode_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(a)
}

/// Make a rank's local outcome collective. Every rank learns whether any rank failed; if one did,
/// every rank returns the error of the lowest failing rank (tagged with that rank), so all ranks
/// exit with the same class and message.
pub fn agree<T>(comm: &dyn Comm, local: Result<T>) -> Result<T> {
    let local = local.and_then(|v| crate::failpoints::hit("comm::before_agree").map(|_| v));
    let mine = match &local {
        Ok(_) => Vec::new(),
        Err(e) => serde_json::to_vec(&e.clone().on_rank(comm.rank()))
            .map_err(|e| Error::internal(format!("encode error: {e}")))?,
    };
    let all = comm.allgather(&mine)?;
    crate::failpoints::hit("comm::after_agree")?;
    // The lowest rank's own error wins; a rank that only stopped because a peer did (an echo)
    // is reported only if no rank has an error of its own.
    let mut echo = None;
    for bytes in &all {
        if !bytes.is_empty() {
            let e: Error = serde_json::from_slice(bytes)
                .map_err(|e| Error::internal(format!("decode peer error: {e}")))?;
            if !e.is_echo() {
                return Err(e);
            }
            echo.get_or_insert(e);
        }
    }
    match echo {
        Some(e) => Err(e),
        None => local,
    }
}

thread_local! {
    static RANK: Cell<(usize, usize)> = const { Cell::new((0, 1)) };
}

/// The rank a launcher (mpirun, srun, ...) gave this process, read from the environment it sets,
/// without initialising MPI.
pub fn launcher_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Record which rank this thread works for (for log prefixes and failpoints).
pub fn set_thread_rank(rank: usize, size: usize) {
    RANK.with(|r| r.set((rank, size)));
}

/// The (rank, size) this thread works for; (0, 1) if never set.
pub fn thread_rank() -> (usize, usize) {
    RANK.with(|r| r.get())
}

/// One rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleComm;

impl Comm for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn allgather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![data.to_vec()])
    }
}

struct Round {
    generation: u64,
    arrived: usize,
    slots: Vec<Vec<u8>>,
    last: Arc<Vec<Vec<u8>>>,
    dead: Option<usize>,
}

struct Shared {
    size: usize,
    round: Mutex<Round>,
    cv: Condvar,
}

/// N ranks as threads of one process. Make the handles with [`ThreadComm::create`] and move one
/// into each rank's thread. A rank whose handle is dropped (it returned or panicked) marks the
/// group dead, so peers still waiting for a collective fail with `interrupted` instead of hanging.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Handles for `size` ranks, one per rank, in rank order.
    pub fn create(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                generation: 0,
                arrived: 0,
                slots: vec![Vec::new(); size],
                last: Arc::new(Vec::new()),
                dead: None,
            }),
            cv: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn peer_died(rank: usize) -> Error {
        Error::new(
            ErrorClass::Interrupted,
            format!("peer rank {rank} stopped and left the collective"),
        )
    }
}

impl Drop for ThreadComm {
    /// A rank that leaves (returns or panics) can join no further collective: peers that wait for
    /// one fail with `interrupted` instead of hanging. Rounds it already joined still complete.
    fn drop(&mut self) {
        let mut r = self.shared.round.lock().unwrap_or_else(|e| e.into_inner());
        r.dead.get_or_insert(self.rank);
        self.shared.cv.notify_all();
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn allgather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let sh = &self.shared;
        let mut r = sh.round.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = r.dead {
            return Err(Self::peer_died(d));
        }
        let gen = r.generation;
        r.slots[self.rank] = data.to_vec();
        r.arrived += 1;
        if r.arrived == sh.size {
            let slots = std::mem::replace(&mut r.slots, vec![Vec::new(); sh.size]);
            r.last = Arc::new(slots);
            r.arrived = 0;
            r.generation += 1;
            sh.cv.notify_all();
            return Ok(r.last.as_ref().clone());
        }
        while r.generation == gen {
            if let Some(d) = r.dead {
                return Err(Self::peer_died(d));
            }
            r = sh.cv.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        Ok(r.last.as_ref().clone())
    }
}

/// Run `f` on `size` in-process ranks, one thread each, and return every rank's result in rank
/// order. A panicking rank yields an `internal` error for itself and `interrupted` for peers
/// waiting on it.
pub fn run_threads<T, F>(size: usize, f: F) -> Vec<Result<T>>
where
    T: Send,
    F: Fn(&dyn Comm) -> Result<T> + Sync,
{
    let comms = ThreadComm::create(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("rank-{}", c.rank))
                    .spawn_scoped(s, move || {
                        set_thread_rank(c.rank, c.size());
                        f(&c)
                    })
                    .map_err(|e| Error::internal(format!("cannot start a rank thread: {e}")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(Error::internal("a rank thread panicked"))),
                Err(e) => Err(e),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allgather_and_broadcast_on_threads() {
        let res = run_threads(4, |c| {
            let all = c.allgather(&[c.rank() as u8])?;
            assert_eq!(all, vec![vec![0], vec![1], vec![2], vec![3]]);
            let b = c.broadcast(2, b"from two")?;
            assert_eq!(b, b"from two");
            let parts: Vec<Vec<u8>> = (0..4u8).map(|r| vec![r; r as usize]).collect();
            let mine = c.scatter(1, if c.rank() == 1 { &parts } else { &[] })?;
            assert_eq!(mine, vec![c.rank() as u8; c.rank()]);
            let s = c.allreduce_sum(c.rank() as u64 + 1)?;
            Ok(s)
        });
        for r in res {
            assert_eq!(r.unwrap(), 10);
        }
    }

    #[test]
    fn agree_spreads_the_lowest_failing_ranks_error() {
        let res = run_threads(3, |c| {
            let local: Result<()> = if c.rank() >= 1 {
                Err(Error::usage(format!("bad on {}", c.rank())))
            } else {
                Ok(())
            };
            agree(c, local)
        });
        for r in res {
            let e = r.unwrap_err();
            assert_eq!(e.rank, Some(1));
            assert_eq!(e.message, "bad on 1");
        }
    }

    #[test]
    fn a_panicking_rank_does_not_hang_its_peers() {
        let res = run_threads(3, |c| {
            if c.rank() == 2 {
                panic!("boom");
            }
            c.barrier()?;
            Ok(())
        });
        assert!(res.iter().all(|r| r.is_err()));
        assert_eq!(res[0].as_ref().unwrap_err().class, ErrorClass::Interrupted);
    }

    #[test]
    fn a_rank_that_returns_early_does_not_hang_its_peers() {
        let res = run_threads(3, |c| {
            c.barrier()?;
            if c.rank() == 1 {
                return Err(Error::internal("left early"));
            }
            c.barrier()
        });
        assert_eq!(res[0].as_ref().unwrap_err().class, ErrorClass::Interrupted);
        assert_eq!(res[2].as_ref().unwrap_err().class, ErrorClass::Interrupted);
    }

    #[test]
    fn many_rounds_keep_order() {
        let res = run_threads(3, |c| {
            let mut acc = 0u64;
            for i in 0..200u64 {
                acc += c.allreduce_sum(i * (c.rank() as u64 + 1))?;
            }
            Ok(acc)
        });
        let want: u64 = (0..200u64).map(|i| i * 6).sum();
        for r in res {
            assert_eq!(r.unwrap(), want);
        }
    }
}
