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

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::comm::SingleComm;
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

    /// Join the background thread if there is one.
    fn reap(&mut self) {
        self.phase = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Running(h) => Phase::Ended(h.join().unwrap_or_else(|_| {
                Err(Error::internal(
                    "the transfer thread panicked; its state is kept",
                ))
            })),
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
