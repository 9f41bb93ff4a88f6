//! A transfer as a job: `copy` plans and runs it, `resume` continues it, and `cancel`, `verify`,
//! `list` and `forget` act on it. This is the protocol of the brief, phase by phase, and the only
//! place that sequences collectives.
//!
//! Every phase ends in [`agree`], so an error on any rank reaches every rank and all of them leave
//! at the same point. The phases of a run:
//!
//! 1. rank 0 takes the lock; the plan is built (or read on resume) and written before any data
//!    moves, then broadcast;
//! 2. rank 0 reads every journal; each rank checks the journaled units of the entries it owns
//!    (their temporary file must still hold them) and the survivors are shared;
//! 3. the remaining units are assigned to the ranks of this run and copied (engine);
//! 4. with `--verify`, every unit is read back and compared;
//! 5. rank 0 durably records the decision; each rank renames its entries to their final names,
//!    fsyncs directories and checks every final name with a stat;
//! 6. rank 0 writes the commit record with the manifest;
//! 7. with `--delete-source`, sources are removed, then rank 0 records that.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::comm::{agree, Comm};
use crate::commit;
use crate::engine::{self, CopyJob, Progress};
use crate::error::{Error, ErrorClass, IoContext, Result};
use crate::failpoints;
use crate::fsio;
use crate::h5;
use crate::journal::{self, Idents, Journal, TempId};
use crate::locks::DestLock;
use crate::manifest::{self, CommitRecord};
use crate::plan::{self, Entry, Kind, Layout, Plan};
use crate::retry::RetryPolicy;
use crate::state::{self, names, Lock, TransferDir};
use crate::status::{self, State, Status};
use crate::stop::{self, Stopper};

/// Default chunk size: 64 MiB.
pub const DEFAULT_CHUNK: u64 = 64 << 20;

/// What the user asked `ferry copy` for.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Sources (may contain `{rank}`).
    pub sources: Vec<OsString>,
    /// Destination (may contain `{rank}`).
    pub dest: OsString,
    /// Transfer id; a fresh one if `None`.
    pub id: Option<String>,
    /// State directory; default `DST/.ferry`.
    pub state_dir: Option<PathBuf>,
    /// Layout; default `local` if a source names `{rank}`, else `shared`.
    pub layout: Option<Layout>,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Copy threads per rank.
    pub threads: usize,
    /// Remove sources after the commit.
    pub delete_source: bool,
    /// Re-read and compare before the commit.
    pub verify: bool,
    /// Keep owners, groups and extended attributes (POSIX ACLs included) too, where permitted;
    /// what cannot be kept is reported per file as a warning.
    pub preserve: bool,
    /// Record the transfer in the per-user registry (so it is found by id alone).
    pub register: bool,
    /// Leave out sockets, FIFOs and device files (with a warning) instead of refusing them.
    pub skip_special: bool,
    /// Explicit source → destination pairs (the library API's `add`, AXL's `AXL_Add`): each
    /// source (a file, or a directory copied as a tree) goes exactly to its destination path.
    /// When not empty, `sources` and `dest` only describe the transfer, and `state_dir` must be
    /// given.
    pub pairs: Vec<(PathBuf, PathBuf)>,
}

impl CopyOptions {
    /// Options with the defaults of the CLI.
    pub fn new(sources: Vec<OsString>, dest: OsString) -> CopyOptions {
        CopyOptions {
            sources,
            dest,
            id: None,
            state_dir: None,
            layout: None,
            chunk_size: DEFAULT_CHUNK,
            threads: 4,
            delete_source: false,
            verify: false,
            preserve: false,
            register: true,
            skip_special: false,
            pairs: Vec::new(),
        }
    }
}

/// Called on rank 0 once the transfer is named and its plan durable: (id, its state directory,
/// bytes in the plan).
pub type Announce = Arc<dyn Fn(&str, &Path, u64) + Send + Sync>;

/// Settings of one run (copy or resume) that are not part of the plan.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Override the plan's threads per rank.
    pub threads: Option<usize>,
    /// Verify before the commit even if the plan did not ask for it.
    pub verify: bool,
    /// A progress counter to update (shared by all ranks in this process).
    pub progress: Option<Arc<Progress>>,
    /// Told the transfer id as soon as the plan is durable (before any data moves).
    pub announce: Option<Announce>,
    /// How transient errors are retried.
    pub retry: RetryPolicy,
    /// Stop once every unit is durable under its temporary name, before the commit decision
    /// (state `prepared`); a later `resume` commits without copying. The library API's collective
    /// wait uses it: ranks commit only after all of them prepared.
    pub prepare_only: bool,
    /// Open and read back every staged `.h5`/`.hdf5` file with libhdf5 before the decision
    /// (`--verify-hdf5`); recorded, so a later resume checks too.
    pub verify_hdf5: Option<crate::h5::Depth>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("threads", &self.threads)
            .field("verify", &self.verify)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// What a run did. Every rank returns one; rank 0's is the one to print.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Transfer id.
    pub id: String,
    /// State at the end of the run.
    pub state: State,
    /// Where the state lives.
    #[serde(with = "crate::pathser")]
    pub state_dir: PathBuf,
    /// Ranks of this run.
    pub ranks: usize,
    /// Files in the plan.
    pub files: usize,
    /// Directories in the plan.
    pub dirs: usize,
    /// Symlinks in the plan.
    pub symlinks: usize,
    /// Bytes in the plan.
    pub bytes_total: u64,
    /// Bytes copied by this run (all ranks).
    pub bytes_copied: u64,
    /// Bytes found durable from earlier runs and not copied again.
    pub bytes_reused: u64,
    /// Units copied by this run.
    pub units_copied: u64,
    /// Journal records discarded as torn or corrupt.
    pub records_discarded: usize,
    /// Bytes copied by each rank in this run.
    pub bytes_per_rank: Vec<u64>,
    /// Wall time of the run.
    pub seconds: f64,
    /// The transfer was already committed when this run started.
    pub already_committed: bool,
    /// With `--delete-source`: whether every source is gone.
    pub sources_removed: Option<bool>,
    /// With `--preserve`: owners, groups or extended attributes this run could not keep (each
    /// one logged as a warning naming the file).
    pub not_preserved: u64,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::internal(format!("encode: {e}")))
}

fn decode<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::internal(format!("decode: {e}")))
}

/// Every rank must run the same command: a job launched with other arguments on some rank (a
/// different DST, say) stops here, before anything is touched.
fn same_command(comm: &dyn Comm, fingerprint: &str) -> Result<()> {
    let all = comm.allgather(fingerprint.as_bytes())?;
    match all.iter().position(|b| b != &all[0]) {
        None => Ok(()),
        Some(r) => Err(Error::usage(format!(
            "rank {r} was started with other arguments than rank 0 ({} / {}); every rank of \
             the job must run the same ferry command",
            String::from_utf8_lossy(&all[r]),
            String::from_utf8_lossy(&all[0])
        ))
        .on_rank(r)),
    }
}

/// Rank 0 computes a value (or an error) that every rank receives.
fn from_root<T, F>(comm: &dyn Comm, f: F) -> Result<T>
where
    T: Serialize + for<'a> Deserialize<'a>,
    F: FnOnce() -> Result<T>,
{
    let local = if comm.rank() == 0 {
        f().and_then(|v| encode(&v))
    } else {
        Ok(Vec::new())
    };
    let bytes = agree(comm, local)?;
    decode(&comm.broadcast(0, &bytes)?)
}

/// The default state directory for a destination template: `DST/.ferry` when DST is (to be) a
/// directory, else beside the destination file; with `{rank}` in DST, beside the first
/// component that names it (so all ranks share one state directory).
fn default_state_dir(dest_t: &OsStr, dest_is_dir: bool) -> PathBuf {
    let p = Path::new(dest_t);
    if plan::has_rank(dest_t) {
        let mut base = PathBuf::new();
        for c in p.components() {
            if plan::has_rank(c.as_os_str()) {
                break;
            }
            base.push(c);
        }
        return base.join(".ferry");
    }
    if dest_is_dir {
        p.join(".ferry")
    } else {
        fsio::parent_of(p).join(".ferry")
    }
}

/// Run `ferry copy` on this rank.
pub fn copy(comm: &dyn Comm, opts: &CopyOptions, run: &RunOptions) -> Result<Summary> {
    if !opts.pairs.is_empty() && comm.size() > 1 {
        return Err(Error::usage(
            "explicit source/destination pairs are one rank's transfer: run them on one rank",
        ));
    }
    let (me, n) = (comm.rank(), comm.size());
    same_command(
        comm,
        &format!(
            "copy {:?} {:?} id={:?} state-dir={:?} layout={:?} chunk={} threads={} delete={} verify={} skip-special={}",
            opts.sources,
            opts.dest,
            opts.id,
            opts.state_dir,
            opts.layout,
            opts.chunk_size,
            opts.threads,
            opts.delete_source,
            opts.verify,
            opts.skip_special
        ),
    )?;
    // Every rank resolves its own paths; any bad input stops all of them.
    let local = resolve_inputs(opts, me);
    let (layout, roots, dst) = agree(comm, local)?;

    // Rank 0 names the transfer, makes its state directory and takes the lock.
    let mut lock = None;
    let mut made = Vec::new();
    let mut mine = None;
    let td: TransferDir = {
        let local = if me == 0 {
            setup_new_transfer(opts, &roots, &dst).map(|(td, l, m)| {
                lock = Some(l);
                made = m;
                td
            })
        } else {
            Ok(TransferDir::new(Path::new(""), ""))
        };
        let local = local.and_then(|td| {
            let out = encode(&(crate::pathser::encode(&td.path), &td.id));
            if me == 0 {
                mine = Some(td);
            }
            out
        });
        let bytes = comm.broadcast(0, &agree(comm, local)?)?;
        let (path, id): (String, String) = decode(&bytes)?;
        let path = crate::pathser::decode(&path).map_err(Error::internal)?;
        // Every rank holds the transfer's directory open from here on (rank 0 since it made it).
        let pinned = match mine.take() {
            Some(td) => Ok(td),
            None => {
                let mut td = TransferDir::from_path(path, id);
                td.pin_existing(PRIVATE_HINT).map(|_| td)
            }
        };
        agree(comm, pinned)?
    };

    // Walk: rank 0 alone (shared) or every rank its own sources (local).
    let result = (|| {
        let walked = match layout {
            Layout::Shared if me != 0 => Ok(Vec::new()),
            _ => walk_mine(&roots, &td, (layout == Layout::Local).then_some(me), opts),
        };
        // Shared: rank 0 walked everything and keeps it. Local: every rank's list goes to rank 0.
        let mut entries: Vec<Entry> = Vec::new();
        match layout {
            Layout::Shared => entries = agree(comm, walked)?,
            Layout::Local => {
                let mine = agree(comm, walked.and_then(|w| encode(&w)))?;
                for b in comm.gather(0, &mine)? {
                    entries.extend(decode::<Vec<Entry>>(&b)?);
                }
            }
        }
        // Rank 0 keeps the whole plan; the others get its header now and their slice later.
        let mut whole = None;
        let shared = from_root(comm, || {
            plan::check_paths(&entries, &[])?;
            let plan = make_plan(opts, layout, &td, n, std::mem::take(&mut entries));
            failpoints::hit("plan::walked")?;
            // Streamed: the plan of millions of files is never held encoded in memory.
            let crc = state::write_record_streamed(&td.file(names::PLAN), "plan", &plan)?;
            failpoints::hit("plan::written")?;
            let head = plan.header();
            whole = Some(plan);
            Ok((head, crc))
        })?;
        let (head, crc): (Plan, u32) = shared;
        Ok((whole.unwrap_or(head), crc))
    })();
    let (plan, crc) = match result {
        Ok(v) => v,
        Err(e) => {
            // Nothing was planned: leave no half-made transfer behind.
            if me == 0 && !td.exists() {
                undo_setup(&td, &made, opts.register);
            }
            return Err(e);
        }
    };
    execute(comm, &td, &plan, crc, run, lock)
}

/// A source and where it goes.
type Root = (PathBuf, PathBuf);

fn resolve_inputs(
    opts: &CopyOptions,
    me: usize,
) -> Result<(Layout, Vec<Root>, (PathBuf, OsString))> {
    if opts.sources.is_empty() && opts.pairs.is_empty() {
        return Err(Error::usage("no source given: ferry copy SRC... DST"));
    }
    if opts.chunk_size == 0 {
        return Err(Error::usage("--chunk-size must be at least 1 byte"));
    }
    if opts.threads == 0 {
        return Err(Error::usage("--threads must be at least 1"));
    }
    if !opts.pairs.is_empty() {
        return resolve_pairs(opts);
    }
    let src_rank = opts.sources.iter().any(|s| plan::has_rank(s));
    let layout = opts.layout.unwrap_or(if src_rank {
        Layout::Local
    } else {
        Layout::Shared
    });
    if layout == Layout::Shared && (src_rank || plan::has_rank(&opts.dest)) {
        return Err(Error::usage(
            "{rank} in SRC or DST needs --layout local (each rank copies its own files)",
        ));
    }
    let mut srcs = Vec::new();
    for s in &opts.sources {
        let p = plan::subst_rank(s, me);
        srcs.push(existing_source(&p)?);
    }
    let dst_typed = plan::subst_rank(&opts.dest, me).into_os_string();
    let dst = plan::absolute(Path::new(&dst_typed))?;
    let roots = plan::roots(&srcs, &dst, &dst_typed)?;
    plan::check_paths(&[], &roots)?;
    // Refuse now, before anything is made, if another transfer is filling the destination (the
    // run takes the lock for good once its plan is known).
    if layout == Layout::Local || me == 0 {
        let dirs: Vec<PathBuf> = roots
            .iter()
            .filter(|(s, d)| s.is_dir() && !d.is_symlink())
            .map(|(_, d)| real_parent(d))
            .collect();
        let files: Vec<PathBuf> = roots
            .iter()
            .filter(|(s, _)| !s.is_dir())
            .map(|(_, d)| real_parent(d))
            .collect();
        drop(DestLock::acquire_with(&dirs, &files, false)?);
    }
    Ok((layout, roots, (dst, dst_typed)))
}

/// The absolute path of a source that exists (`not-found` otherwise).
fn existing_source(p: &Path) -> Result<PathBuf> {
    if std::fs::symlink_metadata(p).is_err() {
        return Err(Error::new(ErrorClass::NotFound, "source does not exist")
            .with_path(p)
            .with_op("stat"));
    }
    plan::absolute(p)
}

/// Explicit pairs: one rank's own list (no `{rank}`, no layout to choose), its state directory
/// given by the caller.
fn resolve_pairs(opts: &CopyOptions) -> Result<(Layout, Vec<Root>, (PathBuf, OsString))> {
    if opts.state_dir.is_none() {
        return Err(Error::usage(
            "a transfer of explicit source/destination pairs needs its state directory",
        ));
    }
    if opts.layout == Some(Layout::Local) {
        return Err(Error::usage(
            "explicit pairs are copied in the shared layout",
        ));
    }
    let mut roots = Vec::new();
    for (s, d) in &opts.pairs {
        if d.as_os_str().is_empty() {
            return Err(Error::usage("an empty destination path").with_path(s));
        }
        roots.push((existing_source(s)?, plan::absolute(d)?));
    }
    plan::check_paths(&[], &roots)?;
    let first = roots[0].1.clone();
    let typed = first.clone().into_os_string();
    Ok((Layout::Shared, roots, (first, typed)))
}

/// Remove what [`setup_new_transfer`] made for a transfer that never got a plan: its directory,
/// its registry entry, and the directories `made` for it (deepest first, only if empty).
/// What to do about a state directory that is not private (see [`state::check_private`]).
const PRIVATE_HINT: &str = "give a private directory of yours with --state-dir";

fn undo_setup(td: &TransferDir, made: &[PathBuf], register: bool) {
    // Through its descriptor: a directory swapped for a link is left, never followed.
    if let Err(e) = td.remove(PRIVATE_HINT) {
        log::warn!("left '{}': {e}", td.path.display());
    }
    if register {
        state::registry::remove(&td.id);
    }
    for d in made {
        let _ = std::fs::remove_dir(d);
    }
}

/// Name the transfer, make its state directory and take its lock. Returns the directories it had
/// to make (deepest first), so a run that stops before its plan is durable leaves nothing behind.
fn setup_new_transfer(
    opts: &CopyOptions,
    roots: &[Root],
    dst: &(PathBuf, OsString),
) -> Result<(TransferDir, Lock, Vec<PathBuf>)> {
    let id = match &opts.id {
        Some(id) => {
            state::validate_id(id)?;
            id.clone()
        }
        None => state::new_id(),
    };
    let state_dir = match &opts.state_dir {
        Some(d) => plan::absolute(d)?,
        None => {
            let dest_is_dir = roots.len() > 1
                || roots.first().is_some_and(|(s, _)| s.is_dir())
                || dst.1.as_bytes().ends_with(b"/")
                || dst.0.is_dir();
            let d = if plan::has_rank(&opts.dest) {
                default_state_dir(&opts.dest, true)
            } else {
                default_state_dir(dst.0.as_os_str(), dest_is_dir)
            };
            // `.ferry` itself is not resolved: a link planted there is refused below, never
            // followed.
            plan::absolute(fsio::parent_of(&d))?.join(".ferry")
        }
    };
    let td = TransferDir::new(&state_dir, &id);
    if opts.register {
        state::registry::reserve(&td)?;
    }
    let made: Vec<PathBuf> = state_dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .map(Path::to_path_buf)
        .collect();
    // A transfer directory that exists already is someone else's: a failure keeps it.
    let existed = td.path.exists();
    let res = (|| {
        state::create_private_dir(&state_dir)?;
        state::check_private(&state_dir, PRIVATE_HINT)?;
        make_transfer_dir(&td, &state_dir)?;
        // Held open from here on: everything of this transfer goes through that descriptor.
        let mut pinned = td.clone();
        pinned.pin_existing(PRIVATE_HINT)?;
        Lock::acquire(&pinned).map(|lock| (pinned, lock))
    })();
    match res {
        Ok((td, lock)) => Ok((td, lock, made)),
        Err(e) => {
            if !existed {
                undo_setup(&td, &made, opts.register);
            }
            Err(e)
        }
    }
}

fn make_transfer_dir(td: &TransferDir, state_dir: &Path) -> Result<()> {
    let id = &td.id;
    use std::os::unix::fs::DirBuilderExt;
    // Made 0700 (the umask can only narrow it): no chmod by path afterwards.
    match std::fs::DirBuilder::new().mode(0o700).create(&td.path) {
        Ok(()) => {
            fsio::fsync_dir(state_dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::usage(format!(
                "transfer {id} already exists in '{}'; use `ferry resume {id}` to continue it \
                 or pick another --id",
                state_dir.display()
            )));
        }
        Err(e) => return Err(Error::io("mkdir", &td.path, e)),
    }
    Ok(())
}

fn walk_mine(
    roots: &[Root],
    td: &TransferDir,
    holder: Option<usize>,
    opts: &CopyOptions,
) -> Result<Vec<Entry>> {
    let state_dir = fsio::parent_of(&td.path).to_path_buf();
    let mut entries = Vec::new();
    let mut report = plan::WalkReport {
        skip_special: opts.skip_special,
        ..Default::default()
    };
    // Several sources go inside DST, which is then their anchor (DST/NAME is no more trusted
    // than any directory below it).
    let inside = opts.pairs.is_empty() && roots.len() > 1;
    for (s, d) in roots {
        // Never copy ferry's own state: this transfer's, or an earlier one kept in the source.
        let exclude = vec![state_dir.clone(), s.join(".ferry")];
        entries.extend(plan::walk(s, d, &exclude, holder, inside, &mut report)?);
    }
    plan::check_paths(&entries, roots)?;
    Ok(entries)
}

fn make_plan(
    opts: &CopyOptions,
    layout: Layout,
    td: &TransferDir,
    n: usize,
    entries: Vec<Entry>,
) -> Plan {
    let (user, host) = state::who();
    let units = plan::make_units(&entries, opts.chunk_size);
    Plan {
        format: plan::FORMAT,
        id: td.id.clone(),
        layout,
        chunk_size: opts.chunk_size,
        ranks: n,
        created: state::now(),
        user,
        host,
        sources: opts
            .sources
            .iter()
            .map(|s| crate::pathser::encode(Path::new(s)))
            .collect(),
        dest: crate::pathser::encode(Path::new(&opts.dest)),
        delete_source: opts.delete_source,
        verify: opts.verify,
        preserve: opts.preserve,
        threads: opts.threads,
        nonce: state::new_nonce(),
        entries,
        units,
        entry_ids: Vec::new(),
        unit_ids: Vec::new(),
        whole: None,
    }
}

/// Run `ferry resume` on this rank.
pub fn resume(
    comm: &dyn Comm,
    id: &str,
    state_dir: Option<&Path>,
    run: &RunOptions,
) -> Result<Summary> {
    same_command(
        comm,
        &format!(
            "resume {id:?} state-dir={state_dir:?} threads={:?} verify={}",
            run.threads, run.verify
        ),
    )?;
    let mut lock = None;
    let mut mine = None;
    let located = from_root(comm, || {
        // Located, checked and held open (see `TransferDir::pin`).
        let td = state::locate(id, state_dir)?;
        state::check_private(fsio::parent_of(&td.path), PRIVATE_HINT)?;
        lock = Some(Lock::acquire(&td)?);
        let out = (crate::pathser::encode(&td.path), td.id.clone());
        mine = Some(td);
        Ok(out)
    })?;
    let (path, id): (String, String) = located;
    let pinned = match mine.take() {
        Some(td) => Ok(td),
        None => crate::pathser::decode(&path)
            .map_err(Error::internal)
            .and_then(|path| {
                let mut td = TransferDir::from_path(path, id);
                td.pin_existing(PRIVATE_HINT).map(|_| td)
            }),
    };
    let td = agree(comm, pinned)?;
    // Rank 0 reads the whole plan; the others get its header (and later their slice), with the
    // CRC of the plan as stored, to which journals are bound.
    let mut whole = None;
    let shared = from_root(comm, || {
        let (plan, body) = status::read_plan_body(&td)?;
        let head = plan.header();
        whole = Some(plan);
        Ok((head, crc32fast::hash(&body)))
    })?;
    let (head, crc): (Plan, u32) = shared;
    let plan = whole.unwrap_or(head);
    execute(comm, &td, &plan, crc, run, lock)
}

/// What rank 0 learns from the state directory at the start of a run and tells every rank.
#[derive(Debug, Serialize, Deserialize)]
struct Known {
    committed: bool,
    cancelled: bool,
    cancel_requested: bool,
    decided: bool,
    sources_removed: bool,
    attempt: u32,
    discarded: usize,
    /// (unit, len, crc) of every journaled unit.
    records: Vec<(u32, u64, u32)>,
    /// The temporary file the journals record for each entry.
    idents: Vec<(u32, TempId)>,
}

/// Temporary files a rank made, as ranks exchange them: (entry, identity).
type Made = Vec<(u32, TempId)>;

/// A journal record as ranks exchange it: (unit, length, CRC32).
type Record = (u32, u64, u32);

/// What a rank is sent at the start of a run: the plan entries it owns (with their units) and
/// the journal records of those units.
#[derive(Debug, Serialize, Deserialize)]
struct SliceMsg<P = Plan> {
    plan: P,
    records: Vec<Record>,
    idents: Vec<(u32, TempId)>,
}

/// Rank 0 encodes `make(r)` for each other rank `r` and sends it, one rank at a time (it never
/// holds all the parts of a large plan at once); every other rank returns its part decoded,
/// rank 0 `None`. A part that cannot be encoded fails every rank.
fn send_each<T: Serialize, U: for<'a> Deserialize<'a>>(
    comm: &dyn Comm,
    mut make: impl FnMut(usize) -> T,
) -> Result<Option<U>> {
    let mut failed = None;
    let mine = comm.scatter_each(0, &mut |r| {
        // An empty part tells the rank that its part could not be made.
        encode(&make(r)).unwrap_or_else(|e| {
            failed.get_or_insert(e);
            Vec::new()
        })
    });
    let local = mine.and_then(|bytes| match (comm.rank(), failed) {
        (0, Some(e)) => Err(e),
        (0, None) => Ok(None),
        _ if bytes.is_empty() => Err(Error::internal("rank 0 could not send this rank its part")),
        _ => decode(&bytes).map(Some),
    });
    agree(comm, local)
}

/// Rank 0 sends every other rank the entries it owns, their units, their journal records and
/// their temporary files. Returns this rank's slice, records and temporary files (rank 0: the
/// header and everything; it works on the whole plan).
fn deliver_owned(
    comm: &dyn Comm,
    plan: &Plan,
    records: Vec<Record>,
    idents: Idents,
) -> Result<(Plan, Vec<Record>, Idents)> {
    let (me, n) = (comm.rank(), comm.size());
    if me != 0 {
        let msg: Option<SliceMsg> = send_each(comm, |_| ())?;
        let msg = msg.ok_or_else(|| Error::internal("no slice from rank 0"))?;
        return Ok((msg.plan, msg.records, msg.idents.into_iter().collect()));
    }
    let mut ents = vec![std::collections::BTreeSet::new(); n];
    let mut units = vec![std::collections::BTreeSet::new(); n];
    for e in 0..plan.n_entries() {
        let o = plan.owner(e, n);
        if o != 0 {
            ents[o].insert(e as u32);
            units[o].extend(plan.units_of(e));
        }
    }
    let by_unit: HashMap<u32, Record> = records.iter().map(|r| (r.0, *r)).collect();
    send_each::<_, ()>(comm, |r| SliceMsg {
        plan: plan.slice_view(&ents[r], &units[r]),
        records: units[r]
            .iter()
            .filter_map(|u| by_unit.get(u).copied())
            .collect(),
        idents: ents[r]
            .iter()
            .filter_map(|e| idents.get(e).map(|id| (*e, *id)))
            .collect(),
    })?;
    Ok((plan.header(), records, idents))
}

/// What rank 0 tells a rank before the copy: the units it copies, those it verifies, and the
/// part of the plan it needs for them beyond what it owns.
/// (Rank 0 encodes it borrowed — `L = &[u32]`, `P = SliceView` — and a rank decodes it owned.)
#[derive(Debug, Serialize, Deserialize)]
struct Work<L = Vec<u32>, P = Plan> {
    copy: L,
    verify: L,
    extra: Option<P>,
}

fn read_known(td: &TransferDir, plan: &Plan, crc: u32) -> Result<Known> {
    fsio::clean_atomic_leftovers(&td.dir())?;
    let commit: Option<CommitRecord> = state::read_record(&td.file(names::COMMIT), "commit")?;
    let cancelled: Option<state::Cancelled> =
        state::read_record(&td.file(names::CANCELLED), "cancelled")?;
    let decision: Option<state::Decision> =
        state::read_record(&td.file(names::DECISION), "decision")?;
    let removed: Option<state::SourcesRemoved> =
        state::read_record(&td.file(names::SOURCES_REMOVED), "sources-removed")?;
    let scan = if commit.is_some() {
        journal::Scan::default()
    } else {
        journal::scan(td, plan, crc)?
    };
    // A new run starts: the last run's outcome and stop notice no longer describe the transfer.
    let stale =
        fsio::remove_file(&td.file(names::STOP))? | fsio::remove_file(&td.file(names::PREPARED))?;
    if commit.is_none() && fsio::remove_file(&td.file(names::OUTCOME))? || stale {
        fsio::fsync_dir(&td.dir())?;
    }
    let mut records: Vec<(u32, u64, u32)> = scan
        .units
        .values()
        .map(|r| (r.unit, r.len, r.crc))
        .collect();
    records.sort_unstable();
    let mut idents: Vec<(u32, TempId)> = scan.idents.into_iter().collect();
    idents.sort_unstable_by_key(|(e, _)| *e);
    Ok(Known {
        committed: commit.is_some(),
        cancelled: cancelled.is_some(),
        cancel_requested: td.file(names::CANCEL_REQUEST).exists(),
        decided: decision.is_some(),
        sources_removed: removed.is_some_and(|r| r.kept.is_empty()),
        attempt: scan.last_attempt + 1,
        discarded: scan.discarded,
        records,
        idents,
    })
}

/// Keep the journaled units of the entries this rank owns whose data is still where the journal
/// says: in the very temporary file the journal records (its inode, at least as long as the
/// units), or, after the decision, at the final name as that same inode (a rename keeps it).
/// Before the decision the source must also still be the version the temporary file was made
/// from. Everything else is returned to be voided (and its temporary file, where it is still
/// provably ferry's, removed once the void is durable): its old records describe a file that no
/// longer exists or cannot be trusted, and must not vouch for a new one. A file ferry cannot prove
/// its own is never trusted nor removed.
fn still_durable(
    plan: &Plan,
    records: &[(u32, u64, u32)],
    idents: &Idents,
    decided: bool,
    (me, n): (usize, usize),
) -> Result<(Vec<u32>, Vec<u32>)> {
    let tree = fsio::Tree::new();
    let src_tree = fsio::Tree::new();
    let journaled: HashMap<u32, u64> = records.iter().map(|&(u, l, _)| (u, l)).collect();
    let mut ok = Vec::new();
    let mut void = Vec::new();
    for e in plan.held_entries() {
        if plan.entry(e).kind != Kind::File || plan.owner(e, n) != me {
            continue;
        }
        let units = plan.units_of(e);
        let mine: Vec<u32> = units
            .iter()
            .copied()
            .filter(|u| journaled.contains_key(u))
            .collect();
        let id = idents.get(&(e as u32));
        if mine.is_empty() && id.is_none() {
            continue;
        }
        let ent = plan.entry(e);
        let Some(id) = id.filter(|_| !mine.is_empty()) else {
            void.push(e as u32);
            continue;
        };
        if !decided {
            // Only a source seen to be another version (or gone) voids durable work; an error
            // reading it stops the run instead.
            let same_source = src_tree
                .stat(&ent.src, ent.depth)?
                .is_some_and(|st| journal::src_hash_of(&st) == id.src);
            if !same_source {
                log::info!(
                    "'{}' is not the version its journaled units were copied from (or is gone); \
                     its units are copied again",
                    ent.src.display()
                );
                void.push(e as u32);
                continue;
            }
        }
        let tmp = engine::temp_path(plan, e, id.gen);
        match tree.key(&tmp, ent.dst_depth())? {
            Some(k) if k.regular && id.is(k.key) => {
                let whole = mine.iter().all(|&u| {
                    let unit = plan.unit(u);
                    k.size >= unit.offset + unit.len
                });
                if whole {
                    ok.extend(mine);
                } else {
                    void.push(e as u32);
                }
            }
            Some(_) => {
                let st = tree.stat(&tmp, ent.dst_depth())?;
                log::warn!("{} (left in place)", fsio::foreign_temp(&tmp, st.as_ref()));
                void.push(e as u32);
            }
            // After the decision a missing temporary file was renamed (its directory entry was
            // made durable before the decision, so power loss cannot have taken it) — if the
            // final name is that very file.
            None if decided
                && units.iter().all(|u| journaled.contains_key(u))
                && tree
                    .key(&ent.dst, ent.dst_depth())?
                    .is_some_and(|k| id.is(k.key) && k.size == ent.size) =>
            {
                ok.extend(mine)
            }
            None => void.push(e as u32),
        }
    }
    Ok((ok, void))
}

/// Remove the temporary files of `void`ed entries that are still provably ferry's (the inode
/// `idents` records); their void is durable already. Then, for every file this rank owns that
/// is copied again in attempt `attempt`, what killed attempts left at its temporary names without
/// journaling it (see [`commit::sweep_leftovers`]).
fn drop_voided(
    plan: &Plan,
    (void, ok): (&[u32], &[u32]),
    idents: &Idents,
    attempt: u32,
    (me, n): (usize, usize),
) -> Result<()> {
    let tree = fsio::Tree::new();
    for &e in void {
        let Some(id) = idents.get(&e) else { continue };
        let ent = plan.entry(e as usize);
        let tmp = engine::temp_path(plan, e as usize, id.gen);
        tree.remove_temp(&tmp, ent.dst_depth(), id.key())?;
    }
    if attempt <= 1 {
        return Ok(());
    }
    let mut kept: HashMap<u32, usize> = HashMap::new();
    for &u in ok {
        *kept.entry(plan.unit(u).entry).or_default() += 1;
    }
    for e in plan.held_entries() {
        if plan.entry(e).kind != Kind::File || plan.owner(e, n) != me {
            continue;
        }
        let have = kept.get(&(e as u32)).copied().unwrap_or(0);
        if have < plan.units_of(e).len() {
            let keep = idents
                .get(&(e as u32))
                .filter(|_| have > 0)
                .map(|id| id.gen);
            commit::sweep_leftovers(&tree, plan, e, attempt, keep)?;
        }
    }
    Ok(())
}

/// Clears the stop notice's path when dropped.
struct NoticeReset;

impl Drop for NoticeReset {
    fn drop(&mut self) {
        stop::set_notice(None);
    }
}

/// The phases every run goes through once the plan is known.
fn execute(
    comm: &dyn Comm,
    td: &TransferDir,
    plan: &Plan,
    crc: u32,
    run: &RunOptions,
    lock: Option<Lock>,
) -> Result<Summary> {
    let start = Instant::now();
    let (me, n) = (comm.rank(), comm.size());
    if plan.layout == Layout::Local {
        // Refused before anything else: in the local layout a rank's files are its own.
        plan.assign(&[], n)?;
    }
    if me == 0 {
        if let Some(a) = &run.announce {
            a(&plan.id, &td.path, plan.bytes_total());
        }
    }
    let _member = agree(comm, state::Member::join(td))?;
    // Journal records stay on rank 0; each rank is sent those of the entries it owns.
    let mut records = Vec::new();
    let mut idents = Idents::new();
    let known: Known = from_root(comm, || {
        let mut k = read_known(td, plan, crc)?;
        records = std::mem::take(&mut k.records);
        idents = std::mem::take(&mut k.idents).into_iter().collect();
        Ok(k)
    })?;
    let (mut slice, records, idents) = deliver_owned(comm, plan, records, idents)?;
    // The temporary files this rank may write, learned and made in this attempt.
    let temps = engine::Temps::new(known.attempt, Idents::new());
    let mut sum = Summary {
        id: plan.id.clone(),
        state: State::Copying,
        state_dir: td.path.clone(),
        ranks: n,
        files: plan.count(Kind::File),
        dirs: plan.count(Kind::Dir),
        symlinks: plan.count(Kind::Symlink),
        bytes_total: plan.bytes_total(),
        bytes_copied: 0,
        bytes_reused: 0,
        units_copied: 0,
        records_discarded: known.discarded,
        bytes_per_rank: vec![0; n],
        seconds: 0.0,
        already_committed: known.committed,
        sources_removed: None,
        not_preserved: 0,
    };
    if known.cancelled {
        return Err(Error::usage(format!(
            "transfer {} was cancelled; it cannot be resumed (start a new `ferry copy`)",
            plan.id
        )));
    }
    if known.committed {
        if plan.delete_source {
            let wp = if me == 0 { plan } else { &slice };
            sum.sources_removed = Some(if known.sources_removed {
                true
            } else {
                delete_sources(comm, td, wp)?
            });
        }
        sum.state = State::Committed;
        sum.bytes_reused = sum.bytes_total;
        sum.seconds = start.elapsed().as_secs_f64();
        drop(lock);
        return Ok(sum);
    }
    let dest = agree(
        comm,
        dest_lock(if me == 0 { plan } else { &slice }, (me, n), true),
    );
    // Past the decision a cancel is refused: the run only moves forward. A signal, or a peer
    // that stopped, still stops it (a resume finishes the commit).
    let stop_notice = td.file(names::STOP);
    stop::set_notice(Some(stop_notice.clone()));
    // Reset on every way out (an error, a panic): the notice's path goes through this
    // transfer's descriptor and must not outlive it.
    let _notice = NoticeReset;
    let stopper = Stopper::new(
        (!known.decided).then(|| td.file(names::CANCEL_REQUEST)),
        Some(stop_notice),
    );
    let progress = engine::progress_or_default(run.progress.as_ref());
    let res = match &dest {
        Ok(_) => run_phases(
            comm,
            td,
            (plan, &mut slice),
            (&records, &idents, &temps),
            crc,
            run,
            &known,
            (&stopper, &progress),
            &mut sum,
        ),
        Err(e) => Err(e.clone()),
    };
    let wp = if me == 0 { plan } else { &slice };
    let res = match res {
        Ok(()) => Ok(()),
        Err(e) if e.class == ErrorClass::Cancelled => {
            // The temporary files of the entries this rank owns as the journals record them, and
            // those it made in this attempt: only files provably ferry's are removed.
            let cleaned = commit::remove_temps(wp, me, n, &idents, &temps.created())
                .and_then(|_| sweep_owned(wp, (me, n), known.attempt + 1));
            let cleaned = agree(comm, cleaned.map(|_| ()));
            if me == 0 && cleaned.is_ok() {
                let (user, host) = state::who();
                let rec = state::Cancelled {
                    time: state::now(),
                    by: format!("{user}@{host}"),
                };
                state::write_record(&td.file(names::CANCELLED), "cancelled", &rec)?;
            }
            cleaned.and(Err(e))
        }
        Err(e) => {
            if me == 0 && lock.is_some() {
                let rec = state::Outcome {
                    time: state::now(),
                    error: e.clone(),
                };
                if let Err(w) = state::write_record(&td.file(names::OUTCOME), "outcome", &rec) {
                    log::warn!("could not record the failure: {w}");
                }
            }
            // An error every rank agreed on: no rank leaves before rank 0 recorded it (a launcher
            // ends the whole job as soon as one rank exits with an error).
            if e.rank.is_some() {
                let _ = comm.barrier();
            }
            Err(e)
        }
    };
    stop::set_notice(None);
    sum.seconds = start.elapsed().as_secs_f64();
    drop(dest);
    drop(lock);
    res.map(|()| sum)
}

#[allow(clippy::too_many_arguments)]
fn run_phases(
    comm: &dyn Comm,
    td: &TransferDir,
    (plan, slice): (&Plan, &mut Plan),
    (records, idents, temps): (&[(u32, u64, u32)], &Idents, &engine::Temps),
    crc: u32,
    run: &RunOptions,
    known: &Known,
    (stopper, progress): (&Stopper, &Progress),
    sum: &mut Summary,
) -> Result<()> {
    let (me, n) = (comm.rank(), comm.size());
    if known.cancel_requested {
        if !known.decided {
            return agree(comm, Err(Error::cancelled()));
        }
        // Past the decision the transfer only moves forward: finishing is the one safe end.
        log::warn!(
            "a cancel request for {} came after its commit decision; finishing the commit",
            plan.id
        );
        let dropped = if me == 0 {
            fsio::remove_file(&td.file(names::CANCEL_REQUEST))
                .and_then(|_| fsio::fsync_dir(&td.dir()))
        } else {
            Ok(())
        };
        agree(comm, dropped)?;
    }
    let threads = run.threads.unwrap_or(plan.threads).max(1);
    let pool = agree(comm, engine::pool(threads))?;
    let journal = agree(comm, Journal::create(td, known.attempt, me, crc))?;
    let verify = run.verify || plan.verify;
    // Recorded before any data moves, so a resume of a run killed mid-copy checks too.
    let hdf5 = hdf5_depth(comm, td, run.verify_hdf5)?;

    // Which journaled units are still durable where the journal says (each rank for the entries
    // it owns); void the records of temporary files that are gone before anything can make a
    // new one under the same name.
    let checked = {
        let wp = if me == 0 { plan } else { &*slice };
        still_durable(wp, records, idents, known.decided, (me, n)).and_then(|(ok, void)| {
            journal.void(&void)?;
            drop_voided(wp, (&void, &ok), idents, known.attempt, (me, n))?;
            // The temporary files that still hold journaled units are the ones to write into.
            let keep: BTreeSet<u32> = ok.iter().map(|&u| wp.unit(u).entry).collect();
            temps.learn(
                idents
                    .iter()
                    .filter(|(e, _)| keep.contains(e))
                    .map(|(e, id)| (*e, *id)),
            );
            encode(&ok)
        })
    };
    let ok = agree(comm, checked)?;
    let all_ok = comm.gather(0, &ok)?;

    // Rank 0 decides who copies and who verifies what, and sends each rank its share.
    let mut crcs: HashMap<u32, u32> = HashMap::new();
    // Rank 0: every entry's temporary file (those the journals vouch for, those made now), and
    // the files cut into several units that must be copied now (their temporary file is made
    // before the copy, by rank 0, when several ranks copy them).
    let mut full = Idents::new();
    let mut several: Vec<u32> = Vec::new();
    let work = if me == 0 {
        (|| {
            let journaled: HashMap<u32, u32> = records.iter().map(|&(u, _, c)| (u, c)).collect();
            for b in &all_ok {
                for u in decode::<Vec<u32>>(b)? {
                    if let Some(&c) = journaled.get(&u) {
                        crcs.insert(u, c);
                    }
                }
            }
            let reused: u64 = crcs.keys().map(|&u| plan.unit(u).len).sum();
            sum.bytes_reused = reused;
            let todo: Vec<u32> = (0..plan.n_units() as u32)
                .filter(|u| !crcs.contains_key(u))
                .collect();
            let kept: BTreeSet<u32> = crcs.keys().map(|&u| plan.unit(u).entry).collect();
            full = idents
                .iter()
                .filter(|(e, _)| kept.contains(e))
                .map(|(e, id)| (*e, *id))
                .collect();
            let todo_entries: BTreeSet<u32> = todo.iter().map(|&u| plan.unit(u).entry).collect();
            several = todo_entries
                .into_iter()
                .filter(|&e| plan.units_of(e as usize).len() > 1)
                .collect();
            progress.total.store(plan.bytes_total(), Ordering::Relaxed);
            progress.done.fetch_add(reused, Ordering::Relaxed);
            if known.attempt > 1 || !records.is_empty() {
                let redo: u64 = todo.iter().map(|&u| plan.unit(u).len).sum();
                log::info!(
                    "resume of {}: {} of {} unit(s) already durable ({} bytes kept); re-copying \
                     {} unit(s), {} bytes",
                    plan.id,
                    crcs.len(),
                    plan.n_units(),
                    reused,
                    todo.len(),
                    redo
                );
            }
            let copy = plan.assign(&todo, n)?;
            let check =
                plan.assign(&read_back(plan, verify, known.decided && hdf5.is_some()), n)?;
            Ok((copy, check))
        })()
    } else {
        Ok((Vec::new(), Vec::new()))
    };
    drop(all_ok);
    let (mut copy, mut check) = agree(comm, work)?;
    let work: Work = if me == 0 {
        send_each::<_, ()>(comm, |r| {
            let units: BTreeSet<u32> = copy[r].iter().chain(check[r].iter()).copied().collect();
            Work {
                copy: &copy[r][..],
                verify: &check[r][..],
                extra: Some(plan.slice_view(&Default::default(), &units)),
            }
        })?;
        Work {
            copy: std::mem::take(&mut copy[0]),
            verify: std::mem::take(&mut check[0]),
            extra: None,
        }
    } else {
        send_each(comm, |_| ())?.ok_or_else(|| Error::internal("no work from rank 0"))?
    };
    if let Some(extra) = work.extra {
        slice.absorb(extra);
    }
    let wp: &Plan = if me == 0 { plan } else { &*slice };

    // A directory inside the destination tree that is a symbolic link (planted there, or left
    // by someone) would carry every write below it outside the tree: refused before anything
    // is written (rank 0 holds the whole plan).
    agree(
        comm,
        if me == 0 {
            refuse_linked_dirs(plan)
        } else {
            Ok(())
        },
    )?;

    // Directories: each rank makes the ones it owns, then the parents of its units' files.
    // (All made first, then one fsync per parent directory.)
    // Below the destination anchors they are made through directory handles, never through a
    // symbolic link.
    let tree = fsio::Tree::new();
    let dirs = {
        let mut want: BTreeSet<(&Path, u16)> = BTreeSet::new();
        for e in wp.held_entries() {
            let ent = wp.entry(e);
            if ent.kind == Kind::Dir && wp.owner(e, n) == me {
                want.insert((&ent.dst, ent.dst_depth()));
            }
        }
        for &u in &work.copy {
            let ent = wp.entry(wp.unit(u).entry as usize);
            want.insert((fsio::parent_of(&ent.dst), ent.dst_depth().saturating_sub(1)));
        }
        tree.create_dirs(want).map(|_| ())
    };
    agree(comm, dirs)?;
    let src_tree = fsio::Tree::new();

    // A file that several ranks copy at once gets its temporary file from rank 0 before the copy
    // (journaled there), so no rank ever writes into a file it cannot prove is the transfer's.
    // Within one rank, copy threads take turns to make one.
    if plan.layout == Layout::Shared && n > 1 {
        let made: Vec<(u32, TempId)> = from_root(comm, || {
            let mut v = Vec::new();
            let mut failed = None;
            for &e in &several {
                let id = match full.get(&e) {
                    Some(id) => *id,
                    None => match temps.make(plan, &tree, &src_tree, &journal, e as usize) {
                        Ok(id) => id,
                        Err(err) => {
                            failed = Some(err);
                            break;
                        }
                    },
                };
                v.push((e, id));
            }
            // Durable, all together, before any rank writes into one of them (and those made
            // before a failure too, so a later attempt knows them as ferry's).
            let flushed = journal.flush();
            if let Some(err) = failed {
                return Err(err);
            }
            flushed?;
            Ok(v)
        })?;
        if me == 0 {
            full.extend(made.iter().copied());
        }
        temps.learn(made);
    }

    // Copy.
    let job = CopyJob {
        plan: wp,
        journal: &journal,
        stopper,
        progress,
        retry: run.retry,
        tree: &tree,
        src_tree: &src_tree,
        temps,
    };
    let copied = engine::copy_units(&job, &pool, &work.copy);
    let copied = agree(comm, copied)?;
    let mine_bytes: u64 = copied.iter().map(|r| r.len).sum();
    let recs: Vec<(u32, u32)> = copied.iter().map(|r| (r.unit, r.crc)).collect();
    for b in comm.gather(0, &encode(&(recs, temps.created()))?)? {
        let (recs, made): (Vec<(u32, u32)>, Made) = decode(&b)?;
        for (u, c) in recs {
            crcs.insert(u, c);
        }
        full.extend(made);
    }
    // Each rank learns the temporary files of the entries it finishes (owns) and verifies.
    let finals: Idents = if me == 0 {
        let mut per: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); n];
        for e in 0..plan.n_entries() {
            if plan.entry(e).kind == Kind::File {
                per[plan.owner(e, n)].insert(e as u32);
            }
        }
        for (r, units) in check.iter().enumerate().skip(1) {
            per[r].extend(units.iter().map(|&u| plan.unit(u).entry));
        }
        send_each::<_, ()>(comm, |r| {
            per[r]
                .iter()
                .filter_map(|e| full.get(e).map(|id| (*e, *id)))
                .collect::<Vec<(u32, TempId)>>()
        })?;
        std::mem::take(&mut full)
    } else {
        let mine: Option<Vec<(u32, TempId)>> = send_each(comm, |_| ())?;
        mine.unwrap_or_default().into_iter().collect()
    };
    let per_rank = comm.allgather(&mine_bytes.to_le_bytes())?;
    sum.bytes_per_rank = per_rank
        .iter()
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])))
        .collect();
    sum.bytes_copied = sum.bytes_per_rank.iter().sum();
    sum.units_copied = comm.allreduce_sum(copied.len() as u64)?;
    // Every temporary file's name durable before the decision: after it, a missing temporary
    // file means a rename, never a lost directory entry.
    agree(
        comm,
        commit::sync_temp_dirs(wp, me, n).and_then(|_| failpoints::hit("copy::all_done")),
    )?;

    // Optional read-back: rank 0 sends each rank the CRCs of the units it verifies.
    let h5_past_decision = known.decided && hdf5.is_some();
    if verify || h5_past_decision {
        let parts = if me == 0 {
            let check = plan.assign(&read_back(plan, verify, h5_past_decision), n);
            check.and_then(|check| {
                check
                    .iter()
                    .map(|units| {
                        let v: Vec<(u32, u32)> = units
                            .iter()
                            .filter_map(|u| crcs.get(u).map(|c| (*u, *c)))
                            .collect();
                        encode(&v)
                    })
                    .collect::<Result<Vec<_>>>()
            })
        } else {
            Ok(Vec::new())
        };
        let parts = agree(comm, parts)?;
        let mine: HashMap<u32, u32> = decode::<Vec<(u32, u32)>>(&comm.scatter(0, &parts)?)?
            .into_iter()
            .collect();
        let mut voided = Vec::new();
        let v = engine::verify_units(
            wp,
            &pool,
            &work.verify,
            &mine,
            &finals,
            &journal,
            stopper,
            run.retry,
            &mut voided,
        );
        // Every rank has read what it verifies; only now do voided temporaries go.
        let v = agree(comm, v);
        let removed = agree(comm, engine::remove_voided(wp, &voided, &finals));
        v?;
        removed?;
    }

    // Optional HDF5 check of every staged .h5/.hdf5 file (each by the rank that owns it); past
    // the decision, the read-back above stands for it.
    if let (Some(depth), false) = (hdf5, known.decided) {
        let checked = check_hdf5(wp, (me, n), depth, stopper, &finals, &journal);
        let files = agree(comm, checked)?;
        let files = comm.allreduce_sum(files)?;
        if me == 0 {
            log::info!(
                "HDF5 check ({}): {files} file(s) open and read back",
                depth.name()
            );
        }
    }

    // Decision: every unit is durable under its temporary name.
    sum.state = State::Prepared;
    if run.prepare_only && !known.decided {
        let noted = if me == 0 {
            let rec = state::Decision {
                time: state::now(),
                attempt: known.attempt,
            };
            state::write_record(&td.file(names::PREPARED), "prepared", &rec)
        } else {
            Ok(())
        };
        agree(comm, noted)?;
        log::info!(
            "transfer {} prepared: every unit is durable under its temporary name; not committed",
            plan.id
        );
        return Ok(());
    }
    let decided = if me == 0 {
        (|| {
            if crcs.len() != plan.n_units() {
                return Err(Error::internal(format!(
                    "{} of {} units have no checksum before the decision",
                    plan.n_units() - crcs.len(),
                    plan.n_units()
                )));
            }
            stopper.check_now()?;
            failpoints::hit("commit::before_decision")?;
            if !known.decided {
                let d = state::Decision {
                    time: state::now(),
                    attempt: known.attempt,
                };
                state::write_record(&td.file(names::DECISION), "decision", &d)?;
            }
            failpoints::hit("commit::decision_written")
        })()
    } else {
        Ok(())
    };
    agree(comm, decided)?;
    sum.state = State::Committing;

    // Final names, then a stat of each, then directories.
    let fin = commit::finalize_entries(wp, me, n, &finals)
        .and_then(|w| commit::check_finals(wp, me, n, &finals).map(|_| w));
    let files_warned = agree(comm, fin)?;
    let dirs_warned = agree(comm, commit::finish_dirs(wp, me, n))?;
    sum.not_preserved = comm.allreduce_sum(files_warned + dirs_warned)?;

    // The commit record: the one proof of completion.
    let committed = if me == 0 {
        commit::write_commit(td, plan, &crcs, known.attempt, n).map(|_| ())
    } else {
        Ok(())
    };
    agree(comm, committed)?;
    sum.state = State::Committed;
    if plan.delete_source {
        sum.sources_removed = Some(delete_sources(comm, td, wp)?);
    }
    Ok(())
}

/// Remove the sources (after the commit). Returns whether every one is gone; those kept (changed
/// since they were copied, or directories holding files outside the plan) are recorded.
fn delete_sources(comm: &dyn Comm, td: &TransferDir, plan: &Plan) -> Result<bool> {
    let (me, n) = (comm.rank(), comm.size());
    let files = agree(comm, commit::delete_source_files(td, plan, me, n))?;
    let kept = agree(
        comm,
        commit::delete_source_dirs(plan, me, n).and_then(|dirs| {
            let all: Vec<String> = files
                .iter()
                .chain(dirs.iter())
                .map(|p| crate::pathser::encode(p))
                .collect();
            encode(&all)
        }),
    )?;
    let all = comm.gather(0, &kept)?;
    let rec = if me == 0 {
        (|| {
            let mut kept = Vec::new();
            for b in &all {
                for s in decode::<Vec<String>>(b)? {
                    kept.push(crate::pathser::decode(&s).map_err(Error::internal)?);
                }
            }
            let complete = kept.is_empty();
            let rec = state::SourcesRemoved {
                time: state::now(),
                kept,
            };
            state::write_record(&td.file(names::SOURCES_REMOVED), "sources-removed", &rec)?;
            failpoints::hit("delete::recorded")?;
            Ok(complete)
        })()
    } else {
        Ok(false)
    };
    let complete = agree(comm, rec)?;
    let complete = comm.broadcast(0, &[complete as u8])?;
    Ok(complete.first() == Some(&1))
}

/// What `ferry cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CancelOutcome {
    /// A live run noticed the request and stopped.
    StoppedLiveRun,
    /// No run was live; this process removed the temporaries and recorded the cancel.
    Cancelled,
    /// It had been cancelled before.
    AlreadyCancelled,
}

/// `ferry cancel`: stop a running transfer or cancel an interrupted one. A committed (or
/// committing) transfer is refused with a `usage` error.
pub fn cancel(td: &TransferDir, wait: std::time::Duration) -> Result<CancelOutcome> {
    // Checked and held open, whoever made this handle (the library's too).
    let mut td = td.clone();
    td.pin_existing(PRIVATE_HINT)?;
    let td = &td;
    let st = status::status(td);
    match st.state {
        State::Committed => {
            return Err(Error::usage(format!(
                "transfer {} is already committed; there is nothing to cancel (use `ferry forget` \
                 to drop its record)",
                td.id
            )))
        }
        State::Cancelled => return Ok(CancelOutcome::AlreadyCancelled),
        State::Committing => {
            return Err(Error::usage(format!(
                "transfer {} is committing: its destination files are being replaced; \
                 cancelling now would leave a mix, so it will finish",
                td.id
            )))
        }
        _ => {}
    }
    let (user, host) = state::who();
    let req = state::Cancelled {
        time: state::now(),
        by: format!("{user}@{host}"),
    };
    if st.live.is_some() {
        state::write_record(&td.file(names::CANCEL_REQUEST), "cancel-request", &req)?;
        let t0 = Instant::now();
        while state::live_holder(td).is_some() {
            if t0.elapsed() > wait {
                return Err(Error::new(
                    ErrorClass::Transient,
                    format!(
                        "asked transfer {} to cancel, but its run has not stopped within {:?}; \
                         it will stop at its next check",
                        td.id, wait
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let after = status::status(td);
        return match after.state {
            State::Cancelled => Ok(CancelOutcome::StoppedLiveRun),
            State::Committed => Err(Error::usage(format!(
                "transfer {} committed before it saw the cancel request; nothing was cancelled",
                td.id
            ))),
            // The run died before it could act: finish the cancel here.
            _ => cancel_offline(td, &req),
        };
    }
    cancel_offline(td, &req)
}

fn cancel_offline(td: &TransferDir, req: &state::Cancelled) -> Result<CancelOutcome> {
    let _lock = Lock::acquire(td)?;
    let (plan, body) = status::read_plan_body(td)?;
    if td.file(names::COMMIT).exists() {
        return Err(Error::usage(format!(
            "transfer {} is already committed",
            td.id
        )));
    }
    if td.file(names::DECISION).exists() {
        if fsio::remove_file(&td.file(names::CANCEL_REQUEST))? {
            fsio::fsync_dir(&td.dir())?;
        }
        return Err(Error::usage(format!(
            "transfer {} already decided to commit and may have replaced destination files; \
             cancelling now would leave a mix. Run `ferry resume {}` to finish it",
            td.id, td.id
        )));
    }
    state::write_record(&td.file(names::CANCEL_REQUEST), "cancel-request", req)?;
    // One process cleans every rank's temporaries (visible here in the shared layout and in
    // local layouts on one machine; others are removed by `forget` on their node).
    // Only the temporary files the journals record are ferry's to remove.
    let scan = journal::scan(td, &plan, crc32fast::hash(&body))?;
    let n = plan.ranks.max(1);
    for r in 0..n {
        commit::remove_temps(&plan, r, n, &scan.idents, &[])?;
    }
    for r in 0..n {
        sweep_owned(&plan, (r, n), scan.last_attempt + 1)?;
    }
    // A killed run's destination lock files: taken and released, they go if nobody holds them.
    for r in 0..n {
        let _ = dest_lock(&plan, (r, n), false);
    }
    state::write_record(&td.file(names::CANCELLED), "cancelled", req)?;
    Ok(CancelOutcome::Cancelled)
}

/// The destination locks of rank `me` of `n` for plan (or slice) `wp`: its trees and the single
/// files outside them (a file copy, AXL pairs), each file by its name in its directory. The
/// anchor, the destination the user named, may be a link to a directory: its target is locked;
/// a link anywhere below it is refused.
fn dest_lock(wp: &Plan, (me, n): (usize, usize), create: bool) -> Result<DestLock> {
    let roots = wp.dest_roots(me, n);
    let mine = wp
        .held_entries()
        .into_iter()
        .map(|e| wp.entry(e))
        .filter(|e| match (wp.layout, e.holder) {
            (Layout::Local, Some(h)) => h == me,
            _ => me == 0,
        });
    let mut files = BTreeSet::new();
    let mut dirs = Vec::new();
    for e in mine {
        if e.kind == Kind::Dir {
            if roots.contains(&e.dst) {
                dirs.push(if e.dst_depth() == 0 {
                    resolved(&e.dst)
                } else {
                    real_parent(&e.dst)
                });
            }
        } else if !roots.iter().any(|r| e.dst.starts_with(r)) {
            let name = e.dst.file_name().unwrap_or_default();
            files.insert(resolved(fsio::parent_of(&e.dst)).join(name));
        }
    }
    let files: Vec<PathBuf> = files.into_iter().collect();
    DestLock::acquire_with(&dirs, &files, create)
}

/// `p` with every link in it followed, as the kernel does when it reaches `p` (the part that
/// does not exist yet kept as it is): two spellings of one destination lock the same guard
/// files.
fn resolved(p: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut at = p;
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(real, |acc, n| acc.join(n));
        }
        match (at.parent(), at.file_name()) {
            (Some(up), Some(name)) if !up.as_os_str().is_empty() => {
                rest.push(name.to_os_string());
                at = up;
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// `p` with the directories above it resolved (see [`resolved`]), its last component kept as
/// it is (a link there is not followed).
fn real_parent(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(d), Some(name)) if !d.as_os_str().is_empty() => resolved(d).join(name),
        _ => p.to_path_buf(),
    }
}

/// A `permission` error if a directory of the destination tree below its anchor (DST, or with
/// several sources DST/NAME too) exists as a symbolic link, before anything is written. The
/// directory handles of `fsio::Tree` refuse such a link whenever it appears; this check only
/// makes the refusal come first. The anchor itself is the user's choice and may be a link.
fn refuse_linked_dirs(plan: &Plan) -> Result<()> {
    for e in plan.entries.iter().filter(|e| e.kind == Kind::Dir) {
        let linked = std::fs::symlink_metadata(&e.dst).is_ok_and(|m| m.file_type().is_symlink());
        if e.dst_depth() > 0 && linked {
            return Err(fsio::linked_dir(&e.dst).with_op("lstat"));
        }
    }
    Ok(())
}

/// Whether this run checks HDF5 files, and how far: asked for now (recorded, so a resume of
/// the transfer checks too), or recorded by an earlier run. Rank 0 decides for all.
fn hdf5_depth(
    comm: &dyn Comm,
    td: &TransferDir,
    asked: Option<h5::Depth>,
) -> Result<Option<h5::Depth>> {
    let local = if comm.rank() == 0 {
        (|| {
            let path = td.file(names::VERIFY_HDF5);
            let depth = match asked {
                Some(d) => {
                    if state::read_record::<h5::Depth>(&path, "verify-hdf5")? != Some(d) {
                        state::write_record(&path, "verify-hdf5", &d)?;
                    }
                    Some(d)
                }
                None => state::read_record::<h5::Depth>(&path, "verify-hdf5")?,
            };
            if depth.is_some() && !h5::AVAILABLE {
                return Err(h5::unavailable("this transfer's --verify-hdf5"));
            }
            encode(&depth)
        })()
    } else {
        Ok(Vec::new())
    };
    let bytes = comm.broadcast(0, &agree(comm, local)?)?;
    decode(&bytes)
}

/// The units read back against the journal's CRCs: all of them with `--verify`; past the
/// decision with an HDF5 check, those of the HDF5 files. (Their format was checked before the
/// decision; what can have happened since is damage, which the read-back finds. A format check
/// there could fail forever on a source that is itself broken, which a transfer past its
/// decision can no longer give up.)
fn read_back(plan: &Plan, verify: bool, h5_past_decision: bool) -> Vec<u32> {
    (0..plan.n_units() as u32)
        .filter(|&u| {
            verify
                || h5_past_decision
                    && h5::is_hdf5_name(&plan.entry(plan.unit(u).entry as usize).dst)
        })
        .collect()
}

/// Open and read back every staged HDF5 file this rank owns; how many. A staged file that fails
/// the check is voided in the journal (durably) before its temporary file is removed, so a resume
/// copies it again instead of checking the same bytes forever.
fn check_hdf5(
    wp: &Plan,
    (me, n): (usize, usize),
    depth: h5::Depth,
    stopper: &Stopper,
    idents: &Idents,
    journal: &Journal,
) -> Result<u64> {
    let tree = fsio::Tree::new();
    let mut files = 0;
    for e in wp.held_entries() {
        let ent = wp.entry(e);
        if ent.kind != Kind::File || wp.owner(e, n) != me || !h5::is_hdf5_name(&ent.dst) {
            continue;
        }
        stopper.check_now()?;
        let id = idents.get(&(e as u32)).ok_or_else(|| {
            Error::internal("a staged file has no temporary file on record").with_path(&ent.dst)
        })?;
        let tmp = engine::temp_path(wp, e, id.gen);
        // The very file ferry made, opened by inode and read through that descriptor
        // (`/proc/self/fd`), so a file swapped in at the name is never what is checked.
        let f = tree.open_temp_read(&tmp, ent.dst_depth(), id.key())?;
        let path = if state::proc_fd() {
            state::fd_path(std::os::fd::AsFd::as_fd(&f))
        } else {
            tmp.clone()
        };
        if let Err(err) = h5::validate_staged(&path, &ent.dst, &ent.src, depth) {
            drop(f);
            // Voided first (durably), so a resume copies it again from the source; then the
            // temporary goes, if it is still the one ferry made.
            journal.void_all(&[e as u32])?;
            tree.remove_temp(&tmp, ent.dst_depth(), id.key())?;
            return Err(err);
        }
        files += 1;
    }
    Ok(files)
}

/// Remove what killed attempts before `upto` left unjournaled at the temporary names of the files
/// this rank owns (cancel; see [`commit::sweep_leftovers`]).
fn sweep_owned(plan: &Plan, (me, n): (usize, usize), upto: u32) -> Result<()> {
    let tree = fsio::Tree::new();
    for e in plan.held_entries() {
        if plan.entry(e).kind == Kind::File && plan.owner(e, n) == me {
            commit::sweep_leftovers(&tree, plan, e, upto, None)?;
        }
    }
    Ok(())
}

/// `ferry verify`: re-read a committed destination and compare with its manifest.
pub fn verify(td: &TransferDir) -> Result<manifest::Manifest> {
    let rec: CommitRecord =
        state::read_record(&td.file(names::COMMIT), "commit")?.ok_or_else(|| {
            Error::usage(format!(
            "transfer {} is not committed; there is nothing to verify yet (see `ferry status {}`)",
            td.id, td.id
        ))
        })?;
    let problems: Vec<Error> = manifest::verify(&rec.manifest)
        .into_iter()
        .map(|p| {
            if p.class == ErrorClass::Integrity {
                p.with_op("verify-committed")
            } else {
                p
            }
        })
        .collect();
    for p in &problems {
        log::error!("{p}");
    }
    match problems.into_iter().next() {
        None => Ok(rec.manifest),
        Some(first) => Err(first),
    }
}

/// `ferry forget`: remove a committed or cancelled transfer's state (the id stays reserved).
pub fn forget(td: &TransferDir) -> Result<()> {
    let mut td = td.clone();
    td.pin_existing(PRIVATE_HINT)?;
    let td = &td;
    let st = status::status(td);
    if !matches!(
        st.state,
        State::Committed | State::Cancelled | State::Unknown
    ) || st.live.is_some()
    {
        return Err(Error::usage(format!(
            "transfer {} is {}; only committed, cancelled or unreadable transfers can be \
             forgotten (cancel it first)",
            td.id, st.state
        )));
    }
    let _lock = Lock::acquire(td)?;
    failpoints::hit("forget::start")?;
    state::write_record(
        &td.file(names::FORGOTTEN),
        "forgotten",
        &state::Decision {
            time: state::now(),
            attempt: 0,
        },
    )?;
    for ent in std::fs::read_dir(td.dir()).ctx("read-dir", &td.path)? {
        let ent = ent.ctx("read-dir", &td.path)?;
        if ent.file_name() != names::FORGOTTEN && ent.file_name() != names::LOCK {
            fsio::remove_file(&ent.path())?;
        }
    }
    fsio::fsync_dir(&td.dir())?;
    // The registry entry stays: it points at the `forgotten` marker, so the id is never reused.
    Ok(())
}

/// `ferry status` of every transfer in `state_dir` (or in the registry).
pub fn list(state_dir: Option<&Path>) -> Result<Vec<Status>> {
    let tds = match state_dir {
        Some(d) => state::list_dir(d)?,
        None => {
            let mut v = state::registry::all();
            v.retain(|td| td.path.is_dir() && !td.forgotten());
            v
        }
    };
    // Each read through its directory held open (a link in its place is shown as unreadable).
    Ok(tds
        .into_iter()
        .map(|mut td| match td.pin_to_read() {
            Ok(()) => status::status(&td),
            Err(e) => status::unreadable(&td, e),
        })
        .collect())
}
