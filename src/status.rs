//! What `ferry status` reports, computed from the state on disk and the lock, never from a flag
//! that could drift.
//!
//! The state follows from which records exist: a commit record means `committed`; a cancelled
//! record `cancelled`; a live lock holder means a run is at work (`planned`, `copying`, `prepared`
//! or `committing`, by what its journals and decision show); otherwise the last run ended without
//! committing: `failed` if it recorded an error, `interrupted` if it was killed or signalled. A
//! state file that cannot be read gives `unknown` with the reason. Reading only; nothing here
//! writes.

use serde::Serialize;

use crate::error::{Error, ErrorClass, Result};
use crate::journal;
use crate::manifest::CommitRecord;
use crate::plan::{Kind, Layout, Plan};
use crate::state::{self, names, Cancelled, Decision, Outcome, SourcesRemoved, TransferDir};

/// The states of the brief.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Plan written, no data yet (a live run).
    Planned,
    /// A live run is copying.
    Copying,
    /// All data durable under temporary names (a live run about to decide).
    Prepared,
    /// The commit decision is recorded; renames under way.
    Committing,
    /// Done: the commit record exists.
    Committed,
    /// The last run stopped with an error (see `error`); resumable once the cause is fixed.
    Failed,
    /// Cancelled with `ferry cancel`.
    Cancelled,
    /// Killed or signalled; resumable.
    Interrupted,
    /// The state cannot be read (see `error`).
    Unknown,
}

impl State {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            State::Planned => "planned",
            State::Copying => "copying",
            State::Prepared => "prepared",
            State::Committing => "committing",
            State::Committed => "committed",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Interrupted => "interrupted",
            State::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A transfer's status.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Transfer id.
    pub id: String,
    /// Its state.
    pub state: State,
    /// Where its state lives.
    #[serde(with = "crate::pathser")]
    pub state_dir: std::path::PathBuf,
    /// Layout.
    pub layout: Option<Layout>,
    /// Ranks of the run that planned it.
    pub ranks: usize,
    /// Regular files in the plan.
    pub files: usize,
    /// Directories in the plan.
    pub dirs: usize,
    /// Symlinks in the plan.
    pub symlinks: usize,
    /// Bytes in the plan.
    pub bytes_total: u64,
    /// Bytes durable (journaled), all runs together.
    pub bytes_done: u64,
    /// Units in the plan.
    pub units_total: usize,
    /// Units durable.
    pub units_done: usize,
    /// When it was planned.
    pub started: Option<String>,
    /// `user@host` that planned it.
    pub started_by: Option<String>,
    /// When it ended (committed, cancelled or failed).
    pub finished: Option<String>,
    /// The error of a failed or unreadable transfer.
    pub error: Option<Error>,
    /// The live run holding the lock, if any.
    pub live: Option<String>,
    /// Whether sources are removed after the commit.
    pub delete_source: bool,
    /// With `--delete-source`: whether every source has been removed.
    pub sources_removed: Option<bool>,
    /// The sources as typed.
    pub sources: Vec<String>,
    /// The destination as typed.
    pub dest: String,
}

/// The status of a transfer whose directory cannot be read safely: `unknown`, with why.
pub fn unreadable(td: &TransferDir, why: Error) -> Status {
    let mut st = Status::empty(td);
    st.error = Some(why);
    st
}

impl Status {
    fn empty(td: &TransferDir) -> Status {
        Status {
            id: td.id.clone(),
            state: State::Unknown,
            state_dir: td.path.clone(),
            layout: None,
            ranks: 0,
            files: 0,
            dirs: 0,
            symlinks: 0,
            bytes_total: 0,
            bytes_done: 0,
            units_total: 0,
            units_done: 0,
            started: None,
            started_by: None,
            finished: None,
            error: None,
            live: None,
            delete_source: false,
            sources_removed: None,
            sources: Vec::new(),
            dest: String::new(),
        }
    }
}

/// Read the plan of a transfer: its body bytes' CRC and the plan.
pub fn read_plan(td: &TransferDir) -> Result<(Plan, u32)> {
    read_plan_body(td).map(|(plan, body)| (plan, crc32fast::hash(&body)))
}

/// Read and check the plan of a transfer: the plan and its body exactly as stored.
pub fn read_plan_body(td: &TransferDir) -> Result<(Plan, Vec<u8>)> {
    let path = td.file(names::PLAN);
    let bytes = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::io("read", &path, e).context(
                "this transfer has no plan: the run that created it stopped before its plan \
                 was durable, so nothing was copied; start a new `ferry copy` (and `ferry \
                 forget` this id)",
            )
        } else {
            Error::io("read", &path, e).context("the transfer's plan cannot be read")
        }
    })?;
    let body = state::unframe("plan", &bytes, &path)?;
    // Look at the format before the rest: a newer plan may not parse as this one.
    #[derive(serde::Deserialize)]
    struct Format {
        format: u32,
    }
    if let Ok(Format { format }) = serde_json::from_slice::<Format>(body) {
        if format > crate::plan::FORMAT {
            return Err(Error::newer_format(
                &path,
                "plan",
                format as u64,
                crate::plan::FORMAT as u64,
                true,
            ));
        }
    }
    let plan: Plan = serde_json::from_slice(body).map_err(|e| {
        Error::integrity(
            &path,
            format!("plan is unreadable ({e}); it was not trusted"),
        )
        .with_op("read-state")
    })?;
    if plan.format != crate::plan::FORMAT {
        return Err(Error::integrity(
            &path,
            format!("plan format {} is not supported", plan.format),
        ));
    }
    if plan.id != td.id {
        return Err(Error::integrity(
            &path,
            format!("plan belongs to transfer {}, not {}", plan.id, td.id),
        ));
    }
    Ok((plan, body.to_vec()))
}

/// Compute the status of a transfer.
pub fn status(td: &TransferDir) -> Status {
    let mut st = Status::empty(td);
    st.live = state::live_holder(td);
    if let Err(e) = fill(td, &mut st) {
        st.state = State::Unknown;
        st.error = Some(e);
    }
    st
}

fn fill(td: &TransferDir, st: &mut Status) -> Result<()> {
    let (plan, crc) = match read_plan(td) {
        Ok(p) => p,
        Err(e) if st.live.is_some() && e.class == ErrorClass::NotFound => {
            // A live run is still walking the sources.
            st.state = State::Planned;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    st.layout = Some(plan.layout);
    st.ranks = plan.ranks;
    st.files = plan.count(Kind::File);
    st.dirs = plan.count(Kind::Dir);
    st.symlinks = plan.count(Kind::Symlink);
    st.bytes_total = plan.bytes_total();
    st.units_total = plan.units.len();
    st.started = Some(plan.created.clone());
    st.started_by = Some(format!("{}@{}", plan.user, plan.host));
    st.delete_source = plan.delete_source;
    st.sources = plan.sources.clone();
    st.dest = plan.dest.clone();

    let commit: Option<CommitRecord> = state::read_record(&td.file(names::COMMIT), "commit")?;
    if let Some(c) = commit {
        st.state = State::Committed;
        st.finished = Some(c.time);
        st.bytes_done = st.bytes_total;
        st.units_done = st.units_total;
        if plan.delete_source {
            let r: Option<SourcesRemoved> =
                state::read_record(&td.file(names::SOURCES_REMOVED), "sources-removed")?;
            st.sources_removed = Some(r.is_some_and(|r| r.kept.is_empty()));
        }
        return Ok(());
    }
    let scan = journal::scan(td, &plan, crc)?;
    st.units_done = scan.units.len();
    st.bytes_done = scan.units.values().map(|r| r.len).sum();
    if let Some(c) = state::read_record::<Cancelled>(&td.file(names::CANCELLED), "cancelled")? {
        st.state = State::Cancelled;
        st.finished = Some(c.time);
        return Ok(());
    }
    let decision: Option<Decision> = state::read_record(&td.file(names::DECISION), "decision")?;
    if st.live.is_some() {
        st.state = if decision.is_some() {
            State::Committing
        } else if st.units_done == st.units_total && st.units_total > 0 {
            State::Prepared
        } else if scan.files > 0 {
            State::Copying
        } else {
            State::Planned
        };
        return Ok(());
    }
    match state::read_record::<Outcome>(&td.file(names::OUTCOME), "outcome")? {
        Some(o) if o.error.class != ErrorClass::Interrupted => {
            st.state = State::Failed;
            st.finished = Some(o.time);
            st.error = Some(o.error);
        }
        Some(o) => {
            st.state = State::Interrupted;
            st.error = Some(o.error);
        }
        // A run that stopped on purpose with every unit durable (a library dispatch that only
        // prepares); resume commits without copying.
        None if decision.is_none() && td.file(names::PREPARED).exists() => {
            st.state = State::Prepared
        }
        None => st.state = State::Interrupted,
    }
    Ok(())
}
