//! ferry behind AXL's C interface: the functions, types, enum values and return codes of AXL
//! v0.9.0's `axl.h`, over [`ferry::xfer::Xfer`]. Built as `libaxl.so` / `libaxl.a`; `libaxl_mpi`
//! (crate `ferry-axl-mpi`) adds the `*_comm` calls on top of this crate.
//!
//! Return codes are AXL's: 0 (`AXL_SUCCESS`) on success, -1 on failure (ids: `>= 0` or -1).
//! Every failure writes one line to stderr naming the call, the id and what went wrong. No call
//! panics into the host application: a panic inside is caught and reported as a failure.
//!
//! Where ferry differs from AXL on purpose is written down in `docs/axl-compatibility.md`.
//!
//! The `pub` Rust functions (`wait_prepared`, `finish_wait`, ...) are for `libaxl_mpi`, which
//! needs a wait split around its agreement; they are not part of the C interface.

#![allow(non_snake_case)]

pub mod kvtree;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry::state::TransferDir;
use ferry::xfer::Xfer;

use kvtree::Tree;

/// `AXL_SUCCESS`.
pub const SUCCESS: c_int = 0;
/// What every serial call returns on failure (AXL's internal `AXL_FAILURE`).
pub const FAILURE: c_int = -1;

/// `axl_xfer_t` (values are stored in state files and compiled into callers: never change them).
pub mod xtype {
    pub const NULL: i32 = 0;
    pub const DEFAULT: i32 = 1;
    pub const SYNC: i32 = 2;
    pub const ASYNC_DAEMON: i32 = 3;
    pub const ASYNC_DW: i32 = 4;
    pub const ASYNC_BBAPI: i32 = 5;
    pub const NATIVE: i32 = 6;
    pub const PTHREAD: i32 = 7;
    pub const STATE_FILE: i32 = 8;
}

/// AXL's transfer states, as stored under `STATE` in its state files.
mod axl_state {
    pub const CREATED: i64 = 1;
    pub const DISPATCHED: i64 = 2;
    pub const WAITING: i64 = 3;
    pub const COMPLETED: i64 = 4;
    pub const CANCELED: i64 = 5;
}

/// AXL's statuses (`STATUS`, top level and per file).
mod axl_status {
    pub const SOURCE: i64 = 1;
    pub const INPROG: i64 = 2;
    pub const DEST: i64 = 3;
    pub const ERROR: i64 = 4;
}

/// The options `AXL_Init` reads from the environment and `AXL_Config` sets.
#[derive(Debug, Clone)]
struct Options {
    debug: i32,
    mkdir: bool,
    copy_metadata: bool,
    use_extension: bool,
    file_buf_size: u64,
    rank: i32,
    /// ferry's throttle: copy threads per background transfer.
    threads: usize,
}

impl Options {
    const DEFAULT: Options = Options {
        debug: 0,
        mkdir: true,
        copy_metadata: false,
        use_extension: false,
        file_buf_size: 32 << 20,
        rank: -1,
        threads: 4,
    };

    /// AXL's environment variables (parsed like `atoi`), and ferry's `FERRY_AXL_THREADS`.
    fn from_env() -> Options {
        let int = |k: &str| std::env::var(k).ok().map(|v| atoi(&v));
        let mut o = Options::DEFAULT;
        o.debug = int("AXL_DEBUG").unwrap_or(0) as i32;
        o.mkdir = int("AXL_MKDIR").is_none_or(|v| v != 0);
        o.copy_metadata = int("AXL_COPY_METADATA").is_some_and(|v| v != 0);
        o.use_extension = int("AXL_USE_EXTENSION").is_some_and(|v| v != 0);
        if let Some(t) = int("FERRY_AXL_THREADS").filter(|&t| t > 0) {
            o.threads = t as usize;
        }
        o
    }
}

/// C's `atoi`: leading blanks, a sign, digits; anything else ends it (0 if none).
fn atoi(s: &str) -> i64 {
    let s = s.trim_start();
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let n = digits
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0i64, |n, d| {
            n.saturating_mul(10).saturating_add(i64::from(d - b'0'))
        });
    if neg {
        -n
    } else {
        n
    }
}

/// Where a handle is, as AXL's API sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Files may be added; not yet dispatched.
    Created,
    /// Re-created from a state file of a transfer dispatched by an earlier process: `AXL_Resume`
    /// continues it.
    Reloaded,
    /// Dispatched in this process; copying or done, not yet waited for.
    Dispatched,
    /// Waited for: committed (`true`) or failed.
    Completed(bool),
    Canceled,
}

/// Source metadata recorded at dispatch (AXL's per-file keys; its `Wait` checks sizes with them).
#[derive(Debug, Clone, Default)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    times: [(i64, i64); 3],
}

struct File {
    src: PathBuf,
    dst: PathBuf,
    meta: Option<Meta>,
}

struct Handle {
    id: i32,
    xtype: i32,
    name: Vec<u8>,
    state_file: Option<PathBuf>,
    phase: Phase,
    files: Vec<File>,
    xfer: Xfer,
    /// Dispatch failed: Test reports done, Wait fails.
    dispatch_failed: bool,
    /// Dispatched with no file (a rank without files in a collective flush, as SCR does): done
    /// at once, and Wait succeeds.
    nothing: bool,
}

struct Table {
    next: i32,
    handles: BTreeMap<i32, Arc<Mutex<Handle>>>,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    next: 0,
    handles: BTreeMap::new(),
});
static OPTIONS: Mutex<Options> = Mutex::new(Options::DEFAULT);
static INITS: AtomicU32 = AtomicU32::new(0);

/// A lock that a panic elsewhere did not make unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn options() -> Options {
    lock(&OPTIONS).clone()
}

/// An error of a transfer's background run names rank 0 (it ran as one rank of its own): the
/// message names this process's rank instead.
fn plain(e: ferry::Error) -> ferry::Error {
    ferry::Error { rank: None, ..e }
}

/// One line on stderr, as every failure gets.
fn complain(call: &str, id: Option<i32>, msg: impl std::fmt::Display) {
    match id {
        Some(id) => line(format_args!("{call}(id {id}): {msg}")),
        None => line(format_args!("{call}: {msg}")),
    }
}

fn debug(level: i32, msg: impl FnOnce() -> String) {
    if lock(&OPTIONS).debug >= level {
        line(format_args!("{}", msg()));
    }
}

/// `ferry-axl[ rank R]: what` on stderr in one write, so the lines of ranks sharing a terminal
/// or a log do not interleave.
fn line(what: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let rank = lock(&OPTIONS).rank;
    let text = if rank >= 0 {
        format!("ferry-axl rank {rank}: {what}\n")
    } else {
        format!("ferry-axl: {what}\n")
    };
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Run `f`, turning a panic into `fail` with a message (a Rust panic must never unwind into C).
fn guard(call: &str, fail: c_int, f: impl FnOnce() -> c_int) -> c_int {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(rc) => rc,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            complain(
                call,
                None,
                format!("internal error ({what}); nothing was changed after it"),
            );
            fail
        }
    }
}

/// A C string argument: None (with a message) when NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn c_path(call: &str, id: Option<i32>, what: &str, p: *const c_char) -> Option<PathBuf> {
    if p.is_null() {
        complain(call, id, format!("{what} is NULL"));
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let b = unsafe { CStr::from_ptr(p) }.to_bytes();
    if b.is_empty() {
        complain(call, id, format!("{what} is an empty path"));
        return None;
    }
    Some(PathBuf::from(OsStr::from_bytes(b)))
}

fn handle(call: &str, id: c_int) -> Option<Arc<Mutex<Handle>>> {
    let h = lock(&TABLE).handles.get(&id).cloned();
    if h.is_none() {
        complain(
            call,
            Some(id),
            "no such transfer (never created, or freed already)",
        );
    }
    h
}

/// With the handle `id` locked: `f`'s code, or `FAILURE` for an unknown id.
fn with<F: FnOnce(&mut Handle) -> c_int>(call: &str, id: c_int, f: F) -> c_int {
    match handle(call, id) {
        Some(h) => f(&mut lock(&h)),
        None => FAILURE,
    }
}

fn name_of(t: i32) -> &'static str {
    match t {
        xtype::DEFAULT => "DEFAULT",
        xtype::SYNC => "SYNC",
        xtype::ASYNC_DW => "ASYNC_DW",
        xtype::ASYNC_BBAPI => "ASYNC_BBAPI",
        xtype::NATIVE => "NATIVE",
        xtype::PTHREAD => "PTHREAD",
        xtype::STATE_FILE => "STATE_FILE",
        xtype::NULL => "NULL",
        xtype::ASYNC_DAEMON => "ASYNC_DAEMON",
        _ => "unknown",
    }
}

/// Types ferry runs: SYNC inside Dispatch, the others in the background (DataWarp and the BB
/// API fall back to the background engine, as AXL does where they are unavailable).
fn runnable(t: i32) -> bool {
    matches!(
        t,
        xtype::DEFAULT
            | xtype::SYNC
            | xtype::ASYNC_DW
            | xtype::ASYNC_BBAPI
            | xtype::NATIVE
            | xtype::PTHREAD
    )
}

/// Where ferry keeps the journal of a transfer: beside its AXL state file
/// (`.<name>.ferry/`), or, without one, in a private directory of this user
/// (`$FERRY_AXL_STATE_DIR`, else `$TMPDIR/ferry-axl-<uid>`), removed at Free.
fn ferry_dir(state_file: Option<&Path>, id: i32) -> TransferDir {
    match state_file {
        Some(f) => {
            let base = f.file_name().map(OsStr::as_bytes).unwrap_or(b"state");
            let mut n = b".".to_vec();
            n.extend_from_slice(base);
            n.extend_from_slice(b".ferry");
            let dir = ferry::fsio::parent_of(f).join(OsStr::from_bytes(&n));
            TransferDir::new(&dir, "xfer")
        }
        None => {
            let dir = std::env::var_os("FERRY_AXL_STATE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let uid = my_uid();
                    std::env::temp_dir().join(format!("ferry-axl-{uid}"))
                });
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!("axl-{}-{id}-{nanos:x}", std::process::id());
            TransferDir::new(&dir, &name)
        }
    }
}

fn my_uid() -> u32 {
    // SAFETY: getuid(2) cannot fail.
    unsafe { libc::getuid() }
}

fn absolute(p: &Path) -> PathBuf {
    ferry::plan::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A fresh ferry transfer in `td`, with `files` added.
fn new_xfer(td: &TransferDir, files: &[File], state_file: Option<&Path>) -> ferry::Result<Xfer> {
    let dir = ferry::fsio::parent_of(&td.path);
    ferry::state::create_private_dir(dir)?;
    check_private(dir)?;
    let mut x = Xfer::create(&td.id, ferry::fsio::parent_of(&td.path))?;
    for f in files {
        x.add(&f.src, &f.dst)?;
    }
    if let Some(s) = state_file {
        x.set_companion(s);
    }
    x.set_threads(options().threads);
    Ok(x)
}

/// The directory that holds ferry's journals must be this user's own, a real directory, and
/// writable by no one else: one that already existed belonging to another user (a shared
/// `/tmp`), or open to others, would let them change a transfer's state.
fn check_private(dir: &Path) -> ferry::Result<()> {
    ferry::state::check_private(
        dir,
        "set FERRY_AXL_STATE_DIR to a private directory, or give a state file",
    )
}

impl Handle {
    fn sync(&self) -> bool {
        self.xtype == xtype::SYNC
    }

    /// The AXL state file's tree: AXL's keys, and where ferry keeps its journal (`FERRY_STATE`).
    fn tree(&self) -> Tree {
        let o = options();
        let (state, status) = match self.phase {
            Phase::Created => (axl_state::CREATED, axl_status::SOURCE),
            Phase::Reloaded | Phase::Dispatched => (axl_state::DISPATCHED, axl_status::INPROG),
            Phase::Completed(true) => (axl_state::COMPLETED, axl_status::DEST),
            Phase::Completed(false) => (axl_state::COMPLETED, axl_status::ERROR),
            Phase::Canceled => (axl_state::CANCELED, axl_status::INPROG),
        };
        let mut t = Tree::default();
        if let Some(f) = &self.state_file {
            t.set("STATE_FILE", f.as_os_str().as_bytes());
        }
        t.set("TYPE", self.xtype.to_string());
        t.set("NAME", &self.name);
        t.set("STATUS", status.to_string());
        t.set("STATE", state.to_string());
        t.set("FILE_BUF_SIZE", o.file_buf_size.to_string());
        t.set("MKDIR", u8::from(o.mkdir).to_string());
        t.set("USE_EXTENSION", "0");
        t.set("COPY_METADATA", u8::from(o.copy_metadata).to_string());
        t.set("FERRY_STATE", self.xfer.state_path().as_os_str().as_bytes());
        let files = t.sub_mut(b"FILE");
        for f in &self.files {
            let n = files.sub_mut(f.src.as_os_str().as_bytes());
            n.set("DEST", f.dst.as_os_str().as_bytes());
            let st = match self.phase {
                Phase::Completed(true) => axl_status::DEST,
                Phase::Completed(false) => axl_status::ERROR,
                _ => axl_status::SOURCE,
            };
            n.set("STATUS", st.to_string());
            if let Some(m) = &f.meta {
                n.set("MODE", m.mode.to_string());
                n.set("UID", m.uid.to_string());
                n.set("GID", m.gid.to_string());
                n.set("SIZE", m.size.to_string());
                for (k, (s, ns)) in ["ATIME", "CTIME", "MTIME"].iter().zip(m.times) {
                    n.set(&format!("{k}_SECS"), s.to_string());
                    n.set(&format!("{k}_NSECS"), ns.to_string());
                }
            }
        }
        t
    }

    /// Rewrite the AXL state file (atomically: a crash leaves the old one or the new one).
    fn save(&self, call: &str) -> bool {
        let Some(f) = &self.state_file else {
            return true;
        };
        match ferry::fsio::write_atomic(f, &self.tree().to_file_bytes()) {
            Ok(()) => true,
            Err(e) => {
                complain(call, Some(self.id), format!("cannot write state file: {e}"));
                false
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The C interface.

/// `int AXL_Init(void)`: reads `AXL_DEBUG`, `AXL_MKDIR`, `AXL_COPY_METADATA`,
/// `AXL_USE_EXTENSION` (and ferry's `FERRY_AXL_THREADS`). Always 0.
#[no_mangle]
pub extern "C" fn AXL_Init() -> c_int {
    guard("AXL_Init", FAILURE, || {
        INITS.fetch_add(1, Ordering::SeqCst);
        let rank = lock(&OPTIONS).rank;
        let mut o = Options::from_env();
        o.rank = rank;
        *lock(&OPTIONS) = o;
        SUCCESS
    })
}

/// `int AXL_Finalize(void)`. Transfers still open stay as they are (as in AXL). Always 0.
#[no_mangle]
pub extern "C" fn AXL_Finalize() -> c_int {
    guard("AXL_Finalize", FAILURE, || {
        let _ = INITS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        SUCCESS
    })
}

/// `int AXL_Create(axl_xfer_t xtype, const char* name, const char* state_file)`.
///
/// # Safety
/// `name` and `state_file` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn AXL_Create(
    xtype: c_int,
    name: *const c_char,
    state_file: *const c_char,
) -> c_int {
    guard("AXL_Create", FAILURE, || {
        let name = if name.is_null() {
            Vec::new()
        } else {
            // SAFETY: the caller passes a NUL-terminated string.
            unsafe { CStr::from_ptr(name) }.to_bytes().to_vec()
        };
        let state_file = if state_file.is_null() {
            None
        } else {
            // SAFETY: as above.
            match unsafe { c_path("AXL_Create", None, "state_file", state_file) } {
                Some(p) => Some(absolute(&p)),
                None => return FAILURE,
            }
        };
        match create(xtype, name, state_file) {
            Ok(id) => id,
            Err(msg) => {
                complain("AXL_Create", None, msg);
                FAILURE
            }
        }
    })
}

fn next_id() -> i32 {
    let mut t = lock(&TABLE);
    let id = t.next;
    t.next += 1;
    id
}

fn create(xtype: i32, name: Vec<u8>, state_file: Option<PathBuf>) -> Result<i32, String> {
    if let Some(f) = state_file.as_deref().filter(|f| f.exists()) {
        return reload(xtype, name, f);
    }
    if xtype == xtype::STATE_FILE {
        return Err(match state_file {
            Some(f) => format!(
                "AXL_XFER_STATE_FILE needs an existing state file; '{}' does not exist",
                f.display()
            ),
            None => "AXL_XFER_STATE_FILE needs a state file, and none was given".into(),
        });
    }
    if !runnable(xtype) {
        return Err(format!(
            "transfer type {xtype} ({}) is not one ferry can run: use SYNC, PTHREAD, DEFAULT \
             or NATIVE",
            name_of(xtype)
        ));
    }
    let id = next_id();
    let td = ferry_dir(state_file.as_deref(), id);
    if state_file.is_some() && td.path.exists() {
        // Journal of an earlier transfer whose state file was removed: it is not this one.
        remove_stale(&td)?;
    }
    let xfer = new_xfer(&td, &[], state_file.as_deref()).map_err(|e| e.to_string())?;
    let h = Handle {
        id,
        xtype,
        name,
        state_file,
        phase: Phase::Created,
        files: Vec::new(),
        xfer,
        dispatch_failed: false,
        nothing: false,
    };
    if !h.save("AXL_Create") {
        return Err("no transfer was created".into());
    }
    debug(1, || format!("created id {id}, type {}", name_of(xtype)));
    lock(&TABLE).handles.insert(id, Arc::new(Mutex::new(h)));
    Ok(id)
}

/// A journal directory that no state file refers to any more: removed, unless a run holds it.
fn remove_stale(td: &TransferDir) -> Result<(), String> {
    if !td.path.exists() {
        return Ok(());
    }
    if let Some(who) = ferry::state::live_holder(td) {
        return Err(format!(
            "'{}' is in use by {who}: another process runs a transfer with this state file",
            td.path.display()
        ));
    }
    let mut x = Xfer::open(&td.id, ferry::fsio::parent_of(&td.path));
    match &mut x {
        Ok(x) => x.free().map_err(|e| e.to_string()),
        // Through its descriptor, after the privacy check: never through a link.
        Err(_) => td
            .remove("a private directory of this user")
            .map_err(|e| format!("cannot remove '{}': {e}", td.path.display())),
    }
}

/// `AXL_Create` over an existing state file: the transfer it records, in the phase it records.
fn reload(xtype: i32, name: Vec<u8>, f: &Path) -> Result<i32, String> {
    let bytes =
        std::fs::read(f).map_err(|e| format!("cannot read state file '{}': {e}", f.display()))?;
    let t = Tree::from_file_bytes(&bytes)
        .map_err(|e| format!("state file '{}' is unusable: {e}", f.display()))?;
    let recorded = t
        .get_int("TYPE")
        .ok_or_else(|| format!("state file '{}' records no transfer type", f.display()))?
        as i32;
    let state = t
        .get_int("STATE")
        .ok_or_else(|| format!("state file '{}' records no state", f.display()))?;
    if xtype != xtype::STATE_FILE && xtype != recorded {
        return Err(format!(
            "state file '{}' is of a transfer of type {recorded} ({}), not {xtype} ({}); it was \
             left as it is",
            f.display(),
            name_of(recorded),
            name_of(xtype)
        ));
    }
    if !runnable(recorded) {
        return Err(format!(
            "state file '{}' records transfer type {recorded}, which ferry cannot run",
            f.display()
        ));
    }
    let mut files = Vec::new();
    for (src, node) in t.sub("FILE").map(|t| t.0.as_slice()).unwrap_or_default() {
        let dst = node
            .get("DEST")
            .ok_or_else(|| format!("state file '{}': a file without DEST", f.display()))?;
        files.push(File {
            src: PathBuf::from(OsStr::from_bytes(src)),
            dst: PathBuf::from(OsStr::from_bytes(dst)),
            meta: None,
        });
    }
    let id = next_id();
    // Where ferry's journal is: recorded, or (a state file written by AXL itself) beside it.
    // ferry's journal is always the one beside this state file (the recorded FERRY_STATE is
    // informative only: a state file someone else can write must not point ferry at another
    // directory to open or remove), and it must be this user's private directory.
    let td = ferry_dir(Some(f), id);
    if td.path.exists() {
        check_private(ferry::fsio::parent_of(&td.path)).map_err(|e| e.to_string())?;
    }
    let planned = td.file(ferry::state::names::PLAN).exists();
    let (phase, xfer) = match state {
        axl_state::COMPLETED => {
            let ok = t.get_int("STATUS") == Some(axl_status::DEST);
            (Phase::Completed(ok), open_or_new(&td, &files, f)?)
        }
        axl_state::CREATED if !planned => {
            if td.path.exists() {
                remove_stale(&td)?;
            }
            (
                Phase::Created,
                new_xfer(&td, &files, Some(f)).map_err(|e| e.to_string())?,
            )
        }
        axl_state::CANCELED => (Phase::Canceled, open_or_new(&td, &files, f)?),
        axl_state::CREATED | axl_state::DISPATCHED | axl_state::WAITING => {
            (Phase::Reloaded, open_or_new(&td, &files, f)?)
        }
        s => {
            return Err(format!(
                "state file '{}' records an unknown state {s}",
                f.display()
            ))
        }
    };
    let h = Handle {
        id,
        xtype: recorded,
        name: if name.is_empty() {
            t.get("NAME").unwrap_or_default().to_vec()
        } else {
            name
        },
        state_file: Some(f.to_path_buf()),
        phase,
        files,
        xfer,
        dispatch_failed: false,
        nothing: false,
    };
    debug(1, || {
        format!(
            "id {id}: re-created from '{}' ({:?}, type {})",
            f.display(),
            phase,
            name_of(recorded)
        )
    });
    if !h.save("AXL_Create") {
        return Err("the transfer was not re-created".into());
    }
    lock(&TABLE).handles.insert(id, Arc::new(Mutex::new(h)));
    Ok(id)
}

/// The ferry transfer of a reloaded handle: its journal when it has a plan (a resume reuses
/// what is durable), else a fresh transfer of the recorded files.
fn open_or_new(td: &TransferDir, files: &[File], f: &Path) -> Result<Xfer, String> {
    if td.file(ferry::state::names::PLAN).exists() {
        let mut x =
            Xfer::open(&td.id, ferry::fsio::parent_of(&td.path)).map_err(|e| e.to_string())?;
        x.set_companion(f);
        x.set_threads(options().threads);
        return Ok(x);
    }
    if td.path.exists() {
        remove_stale(td)?;
    }
    new_xfer(td, files, Some(f)).map_err(|e| e.to_string())
}

/// `kvtree* AXL_Config(const kvtree* config)`; see `axl.h` for the keys that have an effect.
///
/// # Safety
/// `config` is NULL or a kvtree of the process's KVTree library.
#[no_mangle]
pub unsafe extern "C" fn AXL_Config(config: *const c_void) -> *mut c_void {
    let mut out = std::ptr::null_mut();
    guard("AXL_Config", FAILURE, || {
        // SAFETY: forwarded from the caller.
        out = unsafe { config::apply(config) };
        SUCCESS
    });
    out
}

mod config;

/// `int AXL_Add(int id, const char* source, const char* destination)`. As in AXL: a source file
/// added to an existing directory goes into it under its own name; a source directory is copied
/// as a tree (into an existing directory under its own name).
///
/// # Safety
/// `source` and `destination` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn AXL_Add(
    id: c_int,
    source: *const c_char,
    destination: *const c_char,
) -> c_int {
    const CALL: &str = "AXL_Add";
    guard(CALL, FAILURE, || {
        // SAFETY: forwarded from the caller.
        let (Some(src), Some(dst)) = (
            unsafe { c_path(CALL, Some(id), "source", source) },
            unsafe { c_path(CALL, Some(id), "destination", destination) },
        ) else {
            return FAILURE;
        };
        with(CALL, id, |h| add(h, src, dst))
    })
}

fn add(h: &mut Handle, src: PathBuf, dst: PathBuf) -> c_int {
    const CALL: &str = "AXL_Add";
    if h.phase != Phase::Created {
        complain(
            CALL,
            Some(h.id),
            format!(
                "files can be added only before Dispatch (it is {:?})",
                h.phase
            ),
        );
        return FAILURE;
    }
    let sm = match std::fs::metadata(&src) {
        Ok(m) if m.is_file() || m.is_dir() => m,
        Ok(_) => {
            complain(
                CALL,
                Some(h.id),
                format!("'{}' is neither a file nor a directory", src.display()),
            );
            return FAILURE;
        }
        Err(e) => {
            complain(CALL, Some(h.id), format!("source '{}': {e}", src.display()));
            return FAILURE;
        }
    };
    let dm = std::fs::metadata(&dst).ok();
    if sm.is_dir() && dm.as_ref().is_some_and(|m| !m.is_dir()) {
        complain(
            CALL,
            Some(h.id),
            format!(
                "'{}' is a directory but '{}' is a file",
                src.display(),
                dst.display()
            ),
        );
        return FAILURE;
    }
    let dst = match (&dm, src.file_name()) {
        (Some(m), Some(base)) if m.is_dir() => dst.join(base),
        _ => dst,
    };
    let (src, dst) = (absolute(&src), absolute(&dst));
    if h.files.iter().any(|f| f.src == src) {
        complain(
            CALL,
            Some(h.id),
            format!("'{}' was added already (once per transfer)", src.display()),
        );
        return FAILURE;
    }
    if let Err(e) = h.xfer.add(&src, &dst) {
        complain(CALL, Some(h.id), e);
        return FAILURE;
    }
    h.files.push(File {
        src,
        dst,
        meta: None,
    });
    if h.save(CALL) {
        SUCCESS
    } else {
        FAILURE
    }
}

/// `int AXL_Dispatch(int id)`: SYNC copies before it returns; every other type returns at once
/// and copies on background threads (which never call MPI).
#[no_mangle]
pub extern "C" fn AXL_Dispatch(id: c_int) -> c_int {
    guard("AXL_Dispatch", FAILURE, || {
        with("AXL_Dispatch", id, |h| dispatch(h, false))
    })
}

/// `int AXL_Resume(int id)`: continue a transfer re-created from its state file. What is
/// durable and checked in ferry's journal is kept; everything else is copied again (never
/// appended to). A completed transfer: nothing to do.
#[no_mangle]
pub extern "C" fn AXL_Resume(id: c_int) -> c_int {
    guard("AXL_Resume", FAILURE, || {
        with("AXL_Resume", id, |h| dispatch(h, true))
    })
}

fn dispatch(h: &mut Handle, resume: bool) -> c_int {
    let call = if resume { "AXL_Resume" } else { "AXL_Dispatch" };
    match (h.phase, resume) {
        (Phase::Created, _) => {}
        (Phase::Reloaded, true) => {}
        (Phase::Completed(ok), true) => return if ok { SUCCESS } else { FAILURE },
        (Phase::Canceled, true) => {
            // A cancelled transfer starts over (its temporaries were removed); without a state
            // file its old journal goes first (with one, the new journal takes its place).
            if h.state_file.is_none() {
                let _ = h.xfer.free();
            }
            let td = ferry_dir(h.state_file.as_deref(), h.id);
            let fresh = remove_stale(&td).and_then(|_| {
                new_xfer(&td, &h.files, h.state_file.as_deref()).map_err(|e| e.to_string())
            });
            match fresh {
                Ok(x) => h.xfer = x,
                Err(e) => {
                    complain(call, Some(h.id), e);
                    return FAILURE;
                }
            }
        }
        (p, _) => {
            let why = match p {
                Phase::Dispatched => "it was dispatched already",
                Phase::Reloaded => "it was dispatched by an earlier process: use AXL_Resume",
                Phase::Completed(_) => "it completed already",
                Phase::Canceled => "it was cancelled: use AXL_Resume to start it over",
                Phase::Created => unreachable!(),
            };
            complain(call, Some(h.id), format!("cannot dispatch: {why}"));
            return FAILURE;
        }
    }
    if h.files.is_empty() {
        // As in AXL: an empty transfer dispatches, is done at once and waits successfully.
        h.phase = Phase::Dispatched;
        h.nothing = true;
        return if h.save(call) { SUCCESS } else { FAILURE };
    }
    for f in &mut h.files {
        if let Ok(m) = std::fs::symlink_metadata(&f.src) {
            f.meta = Some(Meta {
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                size: m.size(),
                times: [
                    (m.atime(), m.atime_nsec()),
                    (m.ctime(), m.ctime_nsec()),
                    (m.mtime(), m.mtime_nsec()),
                ],
            });
        }
    }
    h.phase = Phase::Dispatched;
    h.dispatch_failed = false;
    if !h.save(call) {
        h.dispatch_failed = true;
        return FAILURE;
    }
    if let Err(e) = h.xfer.dispatch() {
        complain(call, Some(h.id), e);
        h.dispatch_failed = true;
        return FAILURE;
    }
    debug(1, || {
        format!("id {}: dispatched ({})", h.id, name_of(h.xtype))
    });
    if h.sync() {
        // SYNC: every byte is durable (under temporary names) before Dispatch returns; Wait
        // commits.
        if let Err(e) = h.xfer.wait_prepared() {
            complain(call, Some(h.id), plain(e));
            return FAILURE;
        }
    }
    SUCCESS
}

/// `int AXL_Test(int id)`: 0 once the transfer has finished (successfully or not: Wait tells),
/// also for a completed or cancelled one; -1 while it copies, or for an id never dispatched.
#[no_mangle]
pub extern "C" fn AXL_Test(id: c_int) -> c_int {
    guard("AXL_Test", FAILURE, || {
        with("AXL_Test", id, |h| test(h, true))
    })
}

/// [`AXL_Test`] of a locked handle; `loud`: complain about misuse.
fn test(h: &mut Handle, loud: bool) -> c_int {
    match h.phase {
        Phase::Dispatched if h.dispatch_failed || h.nothing || h.xfer.test().done => SUCCESS,
        Phase::Dispatched => FAILURE,
        Phase::Completed(_) | Phase::Canceled => SUCCESS,
        Phase::Created | Phase::Reloaded => {
            if loud {
                complain(
                    "AXL_Test",
                    Some(h.id),
                    "it was not dispatched (Dispatch or Resume it first)",
                );
            }
            FAILURE
        }
    }
}

/// Serial test of id `id`, quiet while busy (libaxl_mpi).
pub fn test_quiet(id: c_int) -> c_int {
    guard("AXL_Test", FAILURE, || {
        with("AXL_Test", id, |h| test(h, false))
    })
}

/// `int AXL_Wait(int id)`: blocks until the transfer is committed (0) or has failed (-1). The
/// commit renames every file into place at once, after all of them are durable.
#[no_mangle]
pub extern "C" fn AXL_Wait(id: c_int) -> c_int {
    guard("AXL_Wait", FAILURE, || {
        with("AXL_Wait", id, |h| {
            let ready = prepared(h) == SUCCESS;
            finish(h, ready, "AXL_Wait")
        })
    })
}

/// First half of a wait: block until the background run ended; 0 if everything is durable
/// (ready to commit). Misuse (wait before dispatch, after cancel) is -1 with a message.
pub fn wait_prepared(id: c_int) -> c_int {
    guard("AXL_Wait", FAILURE, || with("AXL_Wait", id, prepared))
}

fn prepared(h: &mut Handle) -> c_int {
    const CALL: &str = "AXL_Wait";
    match h.phase {
        Phase::Dispatched if h.dispatch_failed => FAILURE,
        Phase::Dispatched if h.nothing => SUCCESS,
        Phase::Dispatched => match h.xfer.wait_prepared() {
            Ok(_) => SUCCESS,
            Err(e) => {
                complain(CALL, Some(h.id), plain(e));
                FAILURE
            }
        },
        Phase::Completed(true) => SUCCESS,
        Phase::Completed(false) => {
            complain(CALL, Some(h.id), "it failed (see the earlier message)");
            FAILURE
        }
        Phase::Created => {
            complain(
                CALL,
                Some(h.id),
                "it was not dispatched: nothing to wait for",
            );
            FAILURE
        }
        Phase::Reloaded => {
            complain(
                CALL,
                Some(h.id),
                "it was re-created from its state file: AXL_Resume it first",
            );
            FAILURE
        }
        Phase::Canceled => {
            complain(CALL, Some(h.id), "it was cancelled");
            FAILURE
        }
    }
}

/// Second half: commit when `all_ok` (every rank is prepared), else record the failure (the
/// transfer stays resumable until Free). 0 once committed.
pub fn finish_wait(id: c_int, all_ok: bool) -> c_int {
    guard("AXL_Wait", FAILURE, || {
        with("AXL_Wait", id, |h| finish(h, all_ok, "AXL_Wait"))
    })
}

fn finish(h: &mut Handle, all_ok: bool, call: &str) -> c_int {
    match h.phase {
        Phase::Completed(ok) => return if ok && all_ok { SUCCESS } else { FAILURE },
        Phase::Dispatched => {}
        // Misuse was reported by wait_prepared; nothing changes.
        _ => return FAILURE,
    }
    let ok = all_ok
        && (h.nothing
            || match h.xfer.wait() {
                Ok(_) => copy_owners(h, call),
                Err(e) => {
                    complain(call, Some(h.id), plain(e));
                    false
                }
            });
    h.phase = Phase::Completed(ok);
    h.save(call);
    debug(1, || {
        format!(
            "id {}: completed, {}",
            h.id,
            if ok { "committed" } else { "failed" }
        )
    });
    if ok {
        SUCCESS
    } else {
        FAILURE
    }
}

/// `COPY_METADATA`: ferry always keeps modes and modification times; with the option on, the
/// owner and group of each file too (as AXL's Wait does). A failure fails the Wait.
fn copy_owners(h: &Handle, call: &str) -> bool {
    if !options().copy_metadata {
        return true;
    }
    let mut ok = true;
    for f in &h.files {
        let Some(m) = &f.meta else { continue };
        let Ok(d) = std::fs::symlink_metadata(&f.dst) else {
            continue;
        };
        if !d.is_file() || (d.uid() == m.uid && d.gid() == m.gid) {
            continue;
        }
        if let Err(e) = std::os::unix::fs::lchown(&f.dst, Some(m.uid), Some(m.gid)) {
            complain(
                call,
                Some(h.id),
                format!(
                    "COPY_METADATA: cannot give '{}' owner {}:{}: {e}",
                    f.dst.display(),
                    m.uid,
                    m.gid
                ),
            );
            ok = false;
        }
    }
    ok
}

/// `int AXL_Cancel(int id)`: stops a dispatched transfer and removes its temporary files; no
/// final file is created. Wait on it then fails, as in AXL.
#[no_mangle]
pub extern "C" fn AXL_Cancel(id: c_int) -> c_int {
    guard("AXL_Cancel", FAILURE, || with("AXL_Cancel", id, cancel))
}

fn cancel(h: &mut Handle) -> c_int {
    const CALL: &str = "AXL_Cancel";
    match h.phase {
        Phase::Dispatched | Phase::Reloaded => {}
        Phase::Canceled => return SUCCESS,
        Phase::Created => {
            complain(CALL, Some(h.id), "it was not dispatched: Free it instead");
            return FAILURE;
        }
        Phase::Completed(_) => {
            complain(
                CALL,
                Some(h.id),
                "it has completed: there is nothing to cancel",
            );
            return FAILURE;
        }
    }
    if h.phase == Phase::Dispatched && (h.dispatch_failed || h.nothing) {
        h.phase = Phase::Canceled;
        h.save(CALL);
        return SUCCESS;
    }
    match h.xfer.cancel() {
        Ok(()) => {
            h.phase = Phase::Canceled;
            if h.save(CALL) {
                SUCCESS
            } else {
                FAILURE
            }
        }
        Err(e) => {
            complain(CALL, Some(h.id), e);
            FAILURE
        }
    }
}

/// `int AXL_Free(int id)`: forget the transfer: its state file and ferry's journal are removed
/// (a transfer that failed is cancelled first, so no temporary file stays behind). Refused
/// while it copies (Wait or Cancel first) and for a re-created one not yet resumed.
#[no_mangle]
pub extern "C" fn AXL_Free(id: c_int) -> c_int {
    guard("AXL_Free", FAILURE, || free(id))
}

fn free(id: c_int) -> c_int {
    const CALL: &str = "AXL_Free";
    let Some(h) = handle(CALL, id) else {
        return FAILURE;
    };
    let mut h = lock(&h);
    let why = match h.phase {
        Phase::Dispatched if !h.dispatch_failed && h.xfer.running() => {
            Some("it is still copying: Wait for it or Cancel it first")
        }
        Phase::Reloaded => {
            Some("it was re-created from its state file: Resume and Wait it, or Cancel it, first")
        }
        _ => None,
    };
    if let Some(why) = why {
        complain(CALL, Some(id), why);
        return FAILURE;
    }
    if let Err(e) = h.xfer.free() {
        complain(CALL, Some(id), e);
        return FAILURE;
    }
    lock(&TABLE).handles.remove(&id);
    debug(1, || format!("id {id}: freed"));
    SUCCESS
}

/// `int AXL_Stop(void)`: cancel and free every transfer of this process, then those an earlier
/// run of the same program left behind (recorded on this host by a process that is gone, from
/// the same executable and working directory). 0 when all of them could be stopped.
#[no_mangle]
pub extern "C" fn AXL_Stop() -> c_int {
    guard("AXL_Stop", FAILURE, || {
        let ids: Vec<i32> = lock(&TABLE).handles.keys().copied().collect();
        let mut rc = SUCCESS;
        for id in ids {
            let needs_cancel = with("AXL_Stop", id, |h| {
                c_int::from(matches!(h.phase, Phase::Dispatched | Phase::Reloaded))
            });
            if needs_cancel == 1 && with("AXL_Stop", id, cancel) != SUCCESS {
                rc = FAILURE;
            }
            if free(id) != SUCCESS {
                rc = FAILURE;
            }
        }
        match ferry::xfer::stop_orphans() {
            Ok(n) => debug(1, || {
                format!("stop: {n} transfer(s) of an earlier run stopped")
            }),
            Err(e) => {
                complain(
                    "AXL_Stop",
                    None,
                    format!("a transfer of an earlier run: {e}"),
                );
                rc = FAILURE;
            }
        }
        rc
    })
}

/// Set this process's rank (messages name it); `libaxl_mpi`'s `AXL_Init_comm` calls it.
pub fn set_rank(rank: i32) {
    lock(&OPTIONS).rank = rank;
}
