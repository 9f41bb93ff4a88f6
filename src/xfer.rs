//! Asynchronous transfers for checkpoint libraries (SCR, VeloC): the library API under the
//! AXL-compatible interface.
//!
//! A library creates a transfer with a name and a state directory, adds source → destination
//! pairs, and **dispatches** it: the copy runs on background threads while the application
//! computes. **test** says, without blocking, whether it finished and how many bytes are durable;
//! **wait** blocks until it is committed (or failed); **cancel** stops it and removes its
//! temporary files. **open** takes up an existing transfer from its state alone — after a crash,
//! in a new process — and a dispatch of it resumes it: units already durable are not copied
//! again.
//!
//! The background run is ferry's engine on one rank ([`SingleComm`]): it never calls MPI, so an
//! application that initialised MPI without thread support is safe. It stops once every unit is
//! durable under its temporary name (`prepared`); **wait** then commits. The collective wait
//! ([`Xfer::wait_all`]) commits only after every rank's transfer is prepared; its agreement is a
//! collective made in the caller's thread.
//!
//! A throttle (`threads`) bounds the copy threads of a transfer so a flush does not starve the
//! computation.
//!
//! **free** removes the state of a transfer that is finished with (committed, cancelled, or
//! never dispatched; a failed one is cancelled first, so no temporary file is left in its
//! destination). **stop** ([`stop`]) cancels every transfer this process dispatched, and cancels
//! and frees those an earlier run of the same program left behind ([`stop_orphans`]): every
//! dispatched transfer is recorded, until it is freed, in an owner file (host, pid, program,
//! working directory) under `$FERRY_HOME/xfers` (see [`crate::state::registry::dir`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::comm::{Comm, SingleComm};
use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::state::{self, TransferDir};
use crate::status::State;
use crate::transfer::{self, CopyOptions, RunOptions, Summary};

/// Where a transfer is in its life, as this process sees it.
enum Phase {
    /// Created or opened; pairs may be added (created only).
    Idle,
    /// Copying on a background thread.
    Running(JoinHandle<Result<Summary>>),
    /// The background run ended: prepared (or committed), or failed.
    Ended(Result<Summary>),
}

/// What [`Xfer::test`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progressed {
    /// The background run has ended (successfully or not): `wait` will not block.
    pub done: bool,
    /// Bytes durable so far, including those of earlier runs.
    pub bytes_done: u64,
    /// Bytes in the transfer (0 until it is planned).
    pub bytes_total: u64,
}

/// One asynchronous transfer.
pub struct Xfer {
    td: TransferDir,
    pairs: Vec<(PathBuf, PathBuf)>,
    /// Opened from its state (its pairs are in its plan), not created in this process.
    opened: bool,
    threads: usize,
    phase: Phase,
    progress: Arc<Progress>,
    /// A file that belongs to this transfer and goes with it at free (AXL's state file).
    companion: Option<PathBuf>,
}

impl std::fmt::Debug for Xfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xfer")
            .field("id", &self.td.id)
            .field("state_dir", &self.td.path)
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

impl Xfer {
    /// A new transfer named `name` (a ferry id: letters, digits, `-`, `_`, `.`), its state kept
    /// in `state_dir/name`. The name must be new in that directory.
    pub fn create(name: &str, state_dir: &Path) -> Result<Xfer> {
        state::validate_id(name)?;
        let state_dir = crate::plan::absolute(state_dir)?;
        let td = TransferDir::new(&state_dir, name);
        if td.path.exists() {
            return Err(Error::usage(format!(
                "transfer {name} already exists in '{}': open it instead of creating it",
                state_dir.display()
            )));
        }
        Ok(Xfer {
            td,
            pairs: Vec::new(),
            opened: false,
            threads: 4,
            phase: Phase::Idle,
            progress: Arc::new(Progress::default()),
            companion: None,
        })
    }

    /// Take up an existing transfer from its state directory alone (how it was created does not
    /// matter). Dispatch resumes it; wait on a committed one returns at once.
    pub fn open(name: &str, state_dir: &Path) -> Result<Xfer> {
        let td = state::locate(name, Some(state_dir))?;
        // Readable state or a clear error now, not at dispatch.
        let st = crate::status::status(&td);
        if let (State::Unknown, Some(e)) = (st.state, st.error) {
            return Err(e);
        }
        Ok(Xfer {
            td,
            pairs: Vec::new(),
            opened: true,
            threads: 4,
            phase: Phase::Idle,
            progress: Arc::new(Progress::default()),
            companion: None,
        })
    }

    /// The transfer's name (its ferry id).
    pub fn id(&self) -> &str {
        &self.td.id
    }

    /// Where its state lives (`STATE_DIR/NAME`).
    pub fn state_path(&self) -> &Path {
        &self.td.path
    }

    /// At most `n` copy threads (at least 1): keeps a background flush from taking the cores the
    /// computation needs.
    pub fn set_threads(&mut self, n: usize) {
        self.threads = n.max(1);
    }

    /// A file to remove with the transfer's state at [`Xfer::free`], also when a later run's
    /// [`stop_orphans`] frees it (the AXL interface's state file). Such a transfer's state
    /// directory is its own: it is removed too once empty.
    pub fn set_companion(&mut self, path: impl Into<PathBuf>) {
        self.companion = Some(path.into());
    }

    /// Whether a background run is still going.
    pub fn running(&self) -> bool {
        matches!(&self.phase, Phase::Running(h) if !h.is_finished())
    }

    /// Whether it was dispatched in this process (a wait would not be a misuse).
    pub fn dispatched(&self) -> bool {
        !matches!(self.phase, Phase::Idle)
    }

    /// Add a source (file, or directory copied as a tree) and the exact path it goes to.
    /// Refused after dispatch, and on a transfer that was opened (its pairs are in its plan).
    pub fn add(&mut self, src: impl Into<PathBuf>, dst: impl Into<PathBuf>) -> Result<()> {
        if self.opened || !matches!(self.phase, Phase::Idle) {
            return Err(Error::usage(format!(
                "transfer {}: files can be added only before its first dispatch",
                self.td.id
            )));
        }
        self.pairs.push((src.into(), dst.into()));
        Ok(())
    }

    /// Start copying on a background thread and return at once. The run stops once every byte
    /// is durable under temporary names; [`Xfer::wait`] commits.
    pub fn dispatch(&mut self) -> Result<()> {
        if !matches!(self.phase, Phase::Idle) {
            return Err(Error::usage(format!(
                "transfer {} was dispatched already",
                self.td.id
            )));
        }
        if !self.opened && self.pairs.is_empty() {
            return Err(Error::usage(format!(
                "transfer {}: nothing was added to it",
                self.td.id
            )));
        }
        let run = RunOptions {
            threads: Some(self.threads),
            progress: Some(self.progress.clone()),
            prepare_only: true,
            ..Default::default()
        };
        let job: Box<dyn FnOnce() -> Result<Summary> + Send> = if self.opened {
            let (id, dir) = (self.td.id.clone(), parent_of(&self.td));
            Box::new(move || transfer::resume(&SingleComm, &id, Some(&dir), &run))
        } else {
            let mut opts = CopyOptions::new(Vec::new(), describe(&self.pairs).into());
            opts.id = Some(self.td.id.clone());
            opts.state_dir = Some(parent_of(&self.td));
            opts.threads = self.threads;
            opts.register = false;
            opts.pairs = self.pairs.clone();
            Box::new(move || transfer::copy(&SingleComm, &opts, &run))
        };
        owners::record(&self.td, self.companion.as_deref());
        let handle = std::thread::Builder::new()
            .name(format!("ferry-xfer-{}", self.td.id))
            .spawn(job)
            .map_err(|e| Error::internal(format!("cannot start the transfer thread: {e}")))?;
        self.phase = Phase::Running(handle);
        // From now on a later dispatch of the same object resumes what is on disk.
        self.opened = true;
        Ok(())
    }

    /// Without blocking: has the background run ended, and how far is it.
    pub fn test(&mut self) -> Progressed {
        if let Phase::Running(h) = &self.phase {
            if h.is_finished() {
                self.reap();
            }
        }
        Progressed {
            done: matches!(self.phase, Phase::Ended(_)),
            bytes_done: self.progress.done.load(Ordering::Relaxed),
            bytes_total: self.progress.total.load(Ordering::Relaxed),
        }
    }

    /// Block until the background run ended; its outcome (`prepared` on success). A transfer
    /// never dispatched in this process is a `usage` error.
    pub fn wait_prepared(&mut self) -> Result<Summary> {
        self.reap();
        match &self.phase {
            Phase::Ended(r) => r.clone(),
            Phase::Idle => Err(Error::usage(format!(
                "transfer {} was not dispatched: there is nothing to wait for",
                self.td.id
            ))),
            Phase::Running(_) => Err(Error::internal("transfer thread still running")),
        }
    }

    /// Commit a prepared transfer (every byte durable under temporary names): the renames and
    /// the commit record, nothing copied again. Committed already: nothing to do.
    pub fn commit(&mut self) -> Result<Summary> {
        let dir = parent_of(&self.td);
        let r = transfer::resume(&SingleComm, &self.td.id, Some(&dir), &RunOptions::default());
        self.phase = Phase::Ended(r.clone());
        r
    }

    /// Block until the transfer is committed (or failed).
    pub fn wait(&mut self) -> Result<Summary> {
        let prepared = self.wait_prepared()?;
        if prepared.state == State::Committed {
            return Ok(prepared);
        }
        self.commit()
    }

    /// The collective wait (AXL's `AXL_Wait_comm`, with the guarantee AXL lacks): every rank
    /// waits for its own transfer to be prepared, the ranks agree that all of them are, and only
    /// then each commits its own. If any rank failed, none commits, and every rank returns the
    /// failing rank's error; the transfers stay resumable. Called from the caller's thread, the
    /// one that may call MPI.
    pub fn wait_all(&mut self, comm: &dyn crate::comm::Comm) -> Result<Summary> {
        // The background run was one rank of its own: its errors name rank 0. Here they are
        // this rank's.
        let mine = |e: &Error| Error {
            rank: None,
            ..e.clone()
        };
        let prepared = self.wait_prepared().map(|_| ()).map_err(|e| mine(&e));
        crate::comm::agree(comm, prepared)?;
        let committed = self.commit();
        crate::comm::agree(comm, committed.as_ref().map(|_| ()).map_err(mine))?;
        committed
    }

    /// The collective dispatch: every rank dispatches its own transfer, and all learn whether
    /// every rank could (the failing rank's error otherwise; the ranks that did start keep
    /// running and are cancelled or waited as usual).
    pub fn dispatch_all(&mut self, comm: &dyn Comm) -> Result<()> {
        let mine = self.dispatch().map_err(|e| Error { rank: None, ..e });
        crate::comm::agree(comm, mine)
    }

    /// The collective test: `done` only when every rank's background run has ended; bytes are
    /// summed over the ranks. A collective, so every rank calls it, in its own thread.
    pub fn test_all(&mut self, comm: &dyn Comm) -> Result<Progressed> {
        let p = self.test();
        let ended = comm.allreduce_sum(u64::from(p.done))?;
        Ok(Progressed {
            done: ended == comm.size() as u64,
            bytes_done: comm.allreduce_sum(p.bytes_done)?,
            bytes_total: comm.allreduce_sum(p.bytes_total)?,
        })
    }

    /// Release the transfer: its state directory (and companion file) is removed. A transfer
    /// that is still copying is refused (wait for it or cancel it first); one that failed or was
    /// interrupted is cancelled first, so its temporary files do not stay in the destination —
    /// unless it had already decided to commit, then its commit is finished first.
    /// Committed files and sources are never touched.
    pub fn free(&mut self) -> Result<()> {
        if self.running() {
            return Err(Error::usage(format!(
                "transfer {} is still copying: wait for it or cancel it before freeing it",
                self.td.id
            )));
        }
        self.reap();
        release(&self.td, self.companion.as_deref())?;
        self.phase = Phase::Idle;
        Ok(())
    }

    /// Stop the transfer and remove its temporary files; its state records `cancelled`. A
    /// committed transfer cannot be cancelled.
    pub fn cancel(&mut self) -> Result<()> {
        // A run still planning has nothing to cancel yet: let it write its plan (or end).
        while matches!(&self.phase, Phase::Running(h) if !h.is_finished())
            && !self.td.file(state::names::PLAN).exists()
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if !self.td.file(state::names::PLAN).exists() {
            // It ended before planning (an error): there is nothing on disk to cancel.
            self.reap();
            return Ok(());
        }
        transfer::cancel(&self.td, std::time::Duration::from_secs(30))?;
        self.reap();
        Ok(())
    }

    /// Join the background thread if there is one. A run that failed before its state existed
    /// leaves nothing to stop: its owner record goes.
    fn reap(&mut self) {
        self.phase = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Running(h) => {
                let r = h.join().unwrap_or_else(|_| {
                    Err(Error::internal(
                        "the transfer thread panicked; its state is kept",
                    ))
                });
                if r.is_err() && !self.td.path.exists() {
                    owners::forget(&self.td);
                }
                Phase::Ended(r)
            }
            other => other,
        };
    }
}

impl Drop for Xfer {
    /// Freeing a transfer whose copy still runs waits for it (its files stay consistent; the
    /// transfer stays resumable if it did not finish).
    fn drop(&mut self) {
        self.reap();
    }
}

/// Cancel `td` unless it is finished, then remove its state, its companion file and its owner
/// record.
fn release(td: &TransferDir, companion: Option<&Path>) -> Result<()> {
    if td.path.exists() {
        let st = crate::status::status(td);
        if st.live.is_some() {
            return Err(Error::usage(format!(
                "transfer {} is in use by {}",
                td.id,
                st.live.unwrap_or_default()
            )));
        }
        let planned = td.file(state::names::PLAN).exists();
        if td.file(state::names::DECISION).exists() && st.state != State::Committed {
            // Past its decision a transfer can no longer be cancelled (some files may be at
            // their final names): finish the commit instead.
            let dir = parent_of(td);
            transfer::resume(&SingleComm, &td.id, Some(&dir), &RunOptions::default())?;
        } else if planned && !matches!(st.state, State::Committed | State::Cancelled) {
            transfer::cancel(td, std::time::Duration::from_secs(30))?;
        }
        td.remove("give a private directory of yours for the state")?;
    }
    if let Some(c) = companion {
        crate::fsio::remove_file(c)?;
        // A transfer with a companion file has a state directory of its own beside it: gone
        // once empty.
        let _ = std::fs::remove_dir(parent_of(td));
    }
    owners::forget(td);
    Ok(())
}

/// Stop everything this process dispatched and everything an earlier run of this program left
/// behind: this process's transfers still recorded (dispatched, not freed) are cancelled — a
/// running one stops, and its `wait` reports `cancelled`; its owner frees it — and the earlier
/// runs' are cancelled and freed ([`stop_orphans`]). Returns how many were stopped.
pub fn stop() -> Result<usize> {
    let me = std::process::id() as i32;
    let mut stopped = 0;
    let mut first_err = None;
    for (_, owner) in owners::list() {
        if owner.pid() != me || !owner.on_this_host() {
            continue;
        }
        let td = TransferDir::new(crate::fsio::parent_of(&owner.state), &owner.id);
        let st = crate::status::status(&td);
        if matches!(st.state, State::Committed | State::Cancelled) || !td.path.exists() {
            continue;
        }
        match transfer::cancel(&td, std::time::Duration::from_secs(30)) {
            Ok(_) => stopped += 1,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match (stop_orphans(), first_err) {
        (Ok(n), None) => Ok(stopped + n),
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
    }
}

/// Cancel and free every transfer that an earlier run of this program left behind: recorded
/// (at dispatch) on this host by a process that no longer exists, started from the same
/// executable in the same working directory, and not freed. The transfers of running processes,
/// and of other programs, are not touched. Returns how many were stopped; the first error, if
/// any, after trying every one.
pub fn stop_orphans() -> Result<usize> {
    let mut stopped = 0;
    let mut first_err = None;
    for (entry, owner) in owners::list() {
        if !owner.is_orphan_of_this_program() {
            continue;
        }
        // Claim the record first: the ranks of a restarted job on one node all see it, and
        // only one of them may release the transfer.
        let claimed = owners::claimed_name(&entry);
        if crate::fsio::rename(&entry, &claimed).is_err() {
            continue;
        }
        let td = TransferDir::new(crate::fsio::parent_of(&owner.state), &owner.id);
        match release(&td, owner.companion.as_deref()) {
            Ok(()) => {
                stopped += 1;
                let _ = std::fs::remove_file(&claimed);
            }
            Err(e) => {
                log::warn!("stop: transfer {}: {e}", td.id);
                first_err.get_or_insert(e);
                // Kept for a later stop (its temporaries are still in the destination).
                let _ = crate::fsio::rename(&claimed, &entry);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(stopped),
    }
}

/// Who dispatched which library transfer: one small file per transfer under
/// `$FERRY_HOME/xfers`, written at dispatch and removed at free.
mod owners {
    use std::path::{Path, PathBuf};

    use crate::state::TransferDir;

    pub struct Owner {
        host: String,
        pid: i32,
        exe: PathBuf,
        cwd: PathBuf,
        pub id: String,
        pub state: PathBuf,
        pub companion: Option<PathBuf>,
    }

    fn dir() -> Option<PathBuf> {
        crate::state::registry::dir().map(|d| d.join("xfers"))
    }

    /// One entry per transfer directory: named after a checksum of its path.
    fn entry(td: &TransferDir) -> Option<PathBuf> {
        let key = crc32fast::hash(td.path.as_os_str().as_encoded_bytes());
        dir().map(|d| d.join(format!("{key:08x}-{}", td.id)))
    }

    fn me() -> (String, i32, PathBuf, PathBuf) {
        (
            crate::state::who().1,
            std::process::id() as i32,
            std::env::current_exe().unwrap_or_default(),
            std::env::current_dir().unwrap_or_default(),
        )
    }

    /// Record that this process dispatched `td` (best effort: without a home directory, stop
    /// cannot find it after a restart, and says nothing).
    pub fn record(td: &TransferDir, companion: Option<&Path>) {
        let (Some(p), Some(d)) = (entry(td), dir()) else {
            return;
        };
        let (host, pid, exe, cwd) = me();
        let enc = crate::pathser::encode;
        let lines = [
            host,
            pid.to_string(),
            enc(&exe),
            enc(&cwd),
            td.id.clone(),
            enc(&td.path),
            companion.map(enc).unwrap_or_default(),
        ];
        let made = crate::state::create_private_dir(&d);
        if let Err(e) =
            made.and_then(|_| crate::fsio::write_atomic(&p, lines.join("\n").as_bytes()))
        {
            log::debug!("transfer {}: no owner record ({e})", td.id);
        }
    }

    /// The name of a record while one process releases its transfer.
    pub fn claimed_name(entry: &Path) -> PathBuf {
        let mut n = entry.as_os_str().to_os_string();
        n.push(format!(".claimed-{}", std::process::id()));
        PathBuf::from(n)
    }

    pub fn forget(td: &TransferDir) {
        if let Some(p) = entry(td) {
            let _ = crate::fsio::remove_file(&p);
        }
    }

    pub fn list() -> Vec<(PathBuf, Owner)> {
        let Some(d) = dir() else { return Vec::new() };
        let Ok(rd) = std::fs::read_dir(&d) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let s = std::fs::read_to_string(e.path()).ok()?;
                Some((e.path(), parse(&s)?))
            })
            .collect()
    }

    fn parse(s: &str) -> Option<Owner> {
        let dec = |l: &str| crate::pathser::decode(l).ok();
        let l: Vec<&str> = s.split('\n').collect();
        let [host, pid, exe, cwd, id, state, companion] = l[..] else {
            return None;
        };
        Some(Owner {
            host: host.to_string(),
            pid: pid.parse().ok()?,
            exe: dec(exe)?,
            cwd: dec(cwd)?,
            id: id.to_string(),
            state: dec(state)?,
            companion: (!companion.is_empty()).then(|| dec(companion)).flatten(),
        })
    }

    impl Owner {
        pub fn pid(&self) -> i32 {
            self.pid
        }

        pub fn on_this_host(&self) -> bool {
            self.host == me().0
        }

        /// Left behind by an earlier run of this program: same host, executable and working
        /// directory, and its process is gone.
        pub fn is_orphan_of_this_program(&self) -> bool {
            let (host, pid, exe, cwd) = me();
            // SAFETY: kill(2) with signal 0 only checks that the process exists.
            let gone = unsafe { libc::kill(self.pid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            self.host == host && self.pid != pid && self.exe == exe && self.cwd == cwd && gone
        }
    }
}

/// The state directory that holds `td`.
fn parent_of(td: &TransferDir) -> PathBuf {
    crate::fsio::parent_of(&td.path).to_path_buf()
}

/// What `status` shows as the destination of a transfer of pairs.
fn describe(pairs: &[(PathBuf, PathBuf)]) -> String {
    match pairs {
        [(_, d)] => d.display().to_string(),
        [(_, d), ..] => format!("{} and {} more", d.display(), pairs.len() - 1),
        [] => String::new(),
    }
}
