//! Stopping a run early: signals, `ferry cancel`, and a peer rank that stopped.
//!
//! * **Signals.** [`install_signal_handlers`] makes SIGTERM, SIGINT and SIGUSR1 (what Slurm sends
//!   before a time limit) set a process-wide flag. Every rank of the process then stops issuing
//!   work at its next check (between buffers of a copy, between directories of a walk), flushes
//!   its journal and ends with an `interrupted` error; the transfer stays resumable. A second
//!   signal ends the process at once with exit code 3 — still resumable, since nothing ferry
//!   trusts is ever only in memory. Signals within [`REPEAT`] of the first are one request that
//!   came by several paths (a Slurm time limit signals the step, srun and the job script, which
//!   all pass it on), not a second one. SIGXFSZ is ignored, so a file-size limit is an `EFBIG` error
//!   (class `resource`) instead of a silent death.
//! * **Peers.** A signal delivered to one rank, or an error on one rank, must stop every rank
//!   promptly, not when the others reach the end of their copy phase. The rank that stops writes a
//!   small *stop notice* into the transfer's state directory (which every rank shares); the
//!   [`Stopper`] of every rank looks for it at most every 100 ms and stops with an `interrupted`
//!   error that names the rank that stopped first. Such an echo never hides the real error: the
//!   agreement at the end of the phase reports a rank's own error before any echo
//!   ([`Error::is_echo`]).
//! * **Cancel.** `ferry cancel` leaves a request file in the state directory; the stopper of a
//!   live run sees it and the run cancels itself (refused once the commit is decided).
//!
//! The signal handler only touches atomics, `write(2)` and `_exit(2)` (async-signal-safe); a
//! thread of this module, which never calls MPI, writes the stop notice.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorClass, Result};

/// How often a run looks at the disk for a cancel request or a peer's stop notice.
pub const POLL: Duration = Duration::from_millis(100);

/// The signals that stop a run.
pub const SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

/// The first stopping signal this process received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// When this process noticed its first stopping signal.
static SIGNAL_AT: Mutex<Option<Instant>> = Mutex::new(None);

/// How long a signalled rank waits in a collective for its peers before it gives up on them and
/// ends the job: healthy peers stop within a poll interval plus the fsync in flight; a peer that
/// does not come has died, and the launcher may only kill the job after its grace time (Slurm's
/// KillWait, 30 s by default).
pub const GRACE: Duration = Duration::from_secs(1);
/// Stopping signals within this time of the first are the same request arriving by several
/// paths (at a Slurm time limit the step, srun and the job script each pass SIGTERM or SIGUSR1
/// on; Open MPI's mpirun passes SIGTERM on ~2.2 s late), not a second one.
pub const REPEAT: Duration = Duration::from_secs(3);
/// When the first stopping signal arrived, in milliseconds of CLOCK_MONOTONIC (set by the handler).
static FIRST_MS: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The run is over and the process is ending: a further signal ends it quietly.
static FINISHING: AtomicBool = AtomicBool::new(false);
/// The rank this process speaks for in stop notices.
static RANK: AtomicUsize = AtomicUsize::new(0);
/// The stop notice of the transfer this process is running, once it is known.
static NOTICE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The name of a signal, as users know it.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// The first stopping signal received, if any.
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The error of a run stopped by signal `sig` on this process.
fn signalled(sig: i32) -> Error {
    Error::new(
        ErrorClass::Interrupted,
        format!(
            "stopped by {}: no new work was started, the journal is flushed and the transfer \
             is resumable",
            signal_name(sig)
        ),
    )
    .with_op("signal")
    .on_rank(RANK.load(Ordering::Relaxed))
}

/// Whether a stopping signal arrived more than [`GRACE`] ago: a rank still waiting for its peers
/// then stops waiting (see `mpi_comm`).
pub fn grace_expired() -> bool {
    if signal().is_none() {
        return false;
    }
    let mut at = SIGNAL_AT.lock().unwrap_or_else(|e| e.into_inner());
    at.get_or_insert_with(Instant::now).elapsed() > GRACE
}

/// `Err(interrupted)` once this process received a stopping signal.
pub fn check_signal() -> Result<()> {
    match signal() {
        Some(s) => Err(signalled(s)),
        None => Ok(()),
    }
}

/// Sleep for `d`, waking early (with an `interrupted` error) if a signal arrives.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_signal()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// CLOCK_MONOTONIC in milliseconds; async-signal-safe (clock_gettime(2) is).
fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct we own; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Make SIGTERM, SIGINT and SIGUSR1 stop runs of this process (see the module docs); ignore
/// SIGXFSZ. `rank` is the rank the process speaks for. Installing twice is harmless.
pub fn install_signal_handlers(rank: usize) -> Result<()> {
    RANK.store(rank, Ordering::Relaxed);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let io = |e: std::io::Error| Error::internal(format!("cannot install signal handlers: {e}"));
    // SAFETY: setting a disposition to SIG_IGN has no handler code to be unsafe.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let (mut wake, wr) = UnixStream::pair().map_err(io)?;
    let (r, size) = crate::comm::thread_rank();
    for sig in SIGNALS {
        // SAFETY: the action only uses atomics, write(2) and _exit(2), all async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                // The first signal's time is kept before the signal itself, so a repeat always
                // finds it.
                let now = monotonic_ms().max(1);
                let _ = FIRST_MS.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
                let repeat = SIGNAL
                    .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err();
                if repeat
                    && now.saturating_sub(FIRST_MS.load(Ordering::SeqCst))
                        >= REPEAT.as_millis() as u64
                {
                    if !FINISHING.load(Ordering::SeqCst) {
                        let msg = b"ferry: second signal: exiting now; the transfer stays resumable (ferry resume ID)\n";
                        libc::write(2, msg.as_ptr().cast(), msg.len());
                    }
                    libc::_exit(ErrorClass::Interrupted.exit_code());
                }
            })
        }
        .map_err(io)?;
        signal_hook::low_level::pipe::register(sig, wr.try_clone().map_err(io)?).map_err(io)?;
    }
    std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || {
            crate::comm::set_thread_rank(r, size);
            let mut b = [0u8; 1];
            let mut told = false;
            while matches!(wake.read(&mut b), Ok(1)) {
                if let Some(s) = signal().filter(|_| !FINISHING.load(Ordering::SeqCst)) {
                    if told {
                        // A repeat within the window: the same request, already told.
                        continue;
                    }
                    told = true;
                    SIGNAL_AT
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(Instant::now);
                    log::warn!(
                        "received {}: stopping every rank; the transfer stays resumable \
                         (a second signal, 3 s or more later, exits at once)",
                        signal_name(s)
                    );
                    publish(&signalled(s));
                }
            }
        })
        .map_err(io)?;
    Ok(())
}

/// The run is over (its outcome printed and recorded): a signal from now on, such as the SIGTERM
/// a launcher sends the other ranks once one exits, ends the process without a message.
pub fn finishing() {
    FINISHING.store(true, Ordering::SeqCst);
}

/// What a stop notice says: who stopped first and why.
#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    rank: Option<usize>,
    error: Error,
}

/// Tell the peers of the running transfer (if one is set) that this process stops because of
/// `why`. Best effort: if the notice cannot be written, the peers learn at the end of the phase.
fn publish(why: &Error) {
    let Some(path) = NOTICE.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return;
    };
    write_notice(&path, why);
}

fn write_notice(path: &Path, why: &Error) {
    if path.exists() {
        return; // the first notice stays
    }
    let n = Notice {
        rank: why.rank,
        error: why.clone(),
    };
    // Not a durability step: the notice only hurries live peers; a resume removes it.
    if let Ok(b) = serde_json::to_vec(&n) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut f| f.write_all(&b));
        if let Err(e) = written {
            log::debug!("cannot write the stop notice '{}': {e}", path.display());
        }
    }
}

/// Watch the stop notice at `path` for the rest of this run (every rank of the process calls it
/// with the same path). If a signal already arrived, the notice is written now.
pub fn set_notice(path: Option<PathBuf>) {
    *NOTICE.lock().unwrap_or_else(|e| e.into_inner()) = path;
    if let Some(s) = signal() {
        publish(&signalled(s));
    }
}

/// The error a rank reports when a peer's notice stopped it.
fn echo(path: &Path) -> Error {
    let n: Option<Notice> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let why = match n {
        Some(Notice {
            rank: Some(r),
            error,
        }) => format!("rank {r} stopped ({error})"),
        Some(Notice { rank: None, error }) => format!("a rank stopped ({error})"),
        None => "another rank stopped".to_string(),
    };
    Error::new(
        ErrorClass::Interrupted,
        format!("{why}; this rank stopped too and the transfer is resumable"),
    )
    .with_op(Error::ECHO_OP)
}

/// Notices why a run must stop early: a signal (always), a peer's stop notice, or — before the
/// commit decision — a `ferry cancel` request.
#[derive(Debug)]
pub struct Stopper {
    cancel: Option<PathBuf>,
    notice: Option<PathBuf>,
    cancelled: AtomicBool,
    peer: AtomicBool,
    last: Mutex<Instant>,
}

impl Stopper {
    /// Watch for a cancel request at `cancel` and a stop notice at `notice`.
    pub fn new(cancel: Option<PathBuf>, notice: Option<PathBuf>) -> Stopper {
        Stopper {
            cancel,
            notice,
            cancelled: AtomicBool::new(false),
            peer: AtomicBool::new(false),
            last: Mutex::new(Instant::now() - POLL),
        }
    }

    /// `Err` once the run must stop (looks at the disk at most every [`POLL`]).
    pub fn check(&self) -> Result<()> {
        self.check_at(false)
    }

    /// As [`check`](Self::check), looking at the disk now whatever the time since the last look.
    pub fn check_now(&self) -> Result<()> {
        self.check_at(true)
    }

    fn check_at(&self, now: bool) -> Result<()> {
        check_signal()?;
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(Error::cancelled());
        }
        if self.peer.load(Ordering::Relaxed) {
            return Err(echo(self.notice.as_deref().unwrap_or(Path::new(""))));
        }
        let due = now || {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= POLL {
                *last = Instant::now();
                true
            } else {
                false
            }
        };
        if !due {
            return Ok(());
        }
        if self.cancel.as_ref().is_some_and(|p| p.exists()) {
            self.cancelled.store(true, Ordering::Relaxed);
            return Err(Error::cancelled());
        }
        if let Some(p) = self.notice.as_ref().filter(|p| p.exists()) {
            self.peer.store(true, Ordering::Relaxed);
            return Err(echo(p));
        }
        Ok(())
    }

    /// This rank stops because of `why`: tell the peers (unless `why` is itself an echo, a
    /// cancel they see themselves, or there is no notice to write).
    pub fn tell_peers(&self, why: &Error) {
        if why.is_echo() || why.class == ErrorClass::Cancelled {
            return;
        }
        if let Some(p) = &self.notice {
            write_notice(p, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_notice_stops_a_rank_with_an_echo_naming_the_first_rank() {
        let dir = tempfile::tempdir().unwrap();
        let notice = dir.path().join("stop");
        let a = Stopper::new(None, Some(notice.clone()));
        let b = Stopper::new(None, Some(notice.clone()));
        assert!(b.check_now().is_ok());
        let why = Error::new(ErrorClass::Resource, "disk full")
            .with_path(Path::new("/d/x"))
            .on_rank(2);
        a.tell_peers(&why);
        let e = b.check_now().unwrap_err();
        assert_eq!(e.class, ErrorClass::Interrupted);
        assert!(e.is_echo());
        assert!(e.message.contains("rank 2") && e.message.contains("disk full"));
        // An echo is never passed on as a new notice.
        std::fs::remove_file(&notice).unwrap();
        b.tell_peers(&e);
        assert!(!notice.exists());
    }

    #[test]
    fn a_cancel_request_stops_a_rank() {
        let dir = tempfile::tempdir().unwrap();
        let req = dir.path().join("cancel-request");
        let s = Stopper::new(Some(req.clone()), None);
        assert!(s.check_now().is_ok());
        std::fs::write(&req, b"x").unwrap();
        assert_eq!(s.check_now().unwrap_err().class, ErrorClass::Cancelled);
    }
}
