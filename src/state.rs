//! The state directory: where a transfer's past, present and future are kept.
//!
//! `STATE_DIR/ID/` holds the plan, one journal per rank and attempt, the commit decision, the
//! commit record, cancel and outcome records, and the lock. Every record here is framed
//! (`ferry-KIND 1 LEN CRC32` header line, then the body) and written through
//! [`fsio::write_atomic`], so it is either absent, or whole and verified: a record that fails its
//! check is reported as `integrity` naming the file, never silently ignored. This module also
//! keeps the per-user registry that finds a transfer by id alone, and the lock that makes one run
//! the only owner of a transfer. It never copies data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorClass, IoContext, Result};
use crate::{fsio, locks};

/// File names inside a transfer directory.
pub mod names {
    /// The plan.
    pub const PLAN: &str = "plan";
    /// The commit decision (rank 0, after every rank's data is durable).
    pub const DECISION: &str = "decision";
    /// The commit record with the manifest: the one proof of completion.
    pub const COMMIT: &str = "commit";
    /// A request from `ferry cancel` to a live run.
    pub const CANCEL_REQUEST: &str = "cancel-request";
    /// The transfer was cancelled.
    pub const CANCELLED: &str = "cancelled";
    /// How the last run ended, if it failed.
    pub const OUTCOME: &str = "outcome";
    /// The last run stopped on purpose once every unit was durable, before the decision (the
    /// library API's dispatch); removed when the next run starts.
    pub const PREPARED: &str = "prepared";
    /// `--verify-hdf5` was asked for (and how far): every run checks before the decision.
    pub const VERIFY_HDF5: &str = "verify-hdf5";
    /// Sources removed after the commit (`--delete-source`).
    pub const SOURCES_REMOVED: &str = "sources-removed";
    /// The lock a live run holds (rank 0).
    pub const LOCK: &str = "lock";
    /// Every rank of a live run holds a shared lock on this file.
    pub const MEMBERS: &str = "members";
    /// Left by `ferry forget` so the id is never used again.
    pub const FORGOTTEN: &str = "forgotten";
    /// Left by the first rank of a live run that stops (signal or error), so its peers stop
    /// too; removed when the next run starts.
    pub const STOP: &str = "stop";
}

/// A transfer's state directory (`STATE_DIR/ID`).
///
/// Once [pinned](TransferDir::pin), the directory is held open (`O_NOFOLLOW | O_DIRECTORY`,
/// owner and mode checked on the descriptor, and those of `STATE_DIR` too), and every file in it
/// is reached through that descriptor (`/proc/self/fd/N/NAME`): swapping `STATE_DIR` or the
/// directory for a link, or for another directory, after the check changes nothing ferry reads,
/// writes or removes. Errors still name the directory's own path.
#[derive(Debug, Clone)]
pub struct TransferDir {
    /// The directory.
    pub path: PathBuf,
    /// The transfer id (its name).
    pub id: String,
    at: Option<std::sync::Arc<Pinned>>,
}

impl PartialEq for TransferDir {
    fn eq(&self, other: &TransferDir) -> bool {
        (&self.path, &self.id) == (&other.path, &other.id)
    }
}

impl Eq for TransferDir {}

/// An open transfer directory; its `/proc/self/fd` path maps back to `path` in messages.
#[derive(Debug)]
struct Pinned {
    fd: std::os::fd::OwnedFd,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        pinned_paths()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.fd.as_raw_fd());
    }
}

fn pinned_paths() -> &'static std::sync::Mutex<std::collections::HashMap<i32, PathBuf>> {
    static M: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<i32, PathBuf>>> =
        std::sync::OnceLock::new();
    M.get_or_init(Default::default)
}

/// `path` as the user knows it: a path through a pinned transfer directory's descriptor
/// (`/proc/self/fd/N/...`) is shown under the directory's own path.
pub fn shown(path: &Path) -> PathBuf {
    let Ok(rest) = path.strip_prefix("/proc/self/fd") else {
        return path.to_path_buf();
    };
    let mut parts = rest.iter();
    let Some(fd) = parts.next().and_then(|n| n.to_str()?.parse::<i32>().ok()) else {
        return path.to_path_buf();
    };
    match pinned_paths()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&fd)
    {
        Some(dir) => dir.join(parts.as_path()),
        None => path.to_path_buf(),
    }
}

/// The path that reaches open file `fd` itself (`/proc/self/fd/N`), whatever is at its name now.
pub fn fd_path(fd: std::os::fd::BorrowedFd<'_>) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Whether this system reaches open files through `/proc/self/fd`.
pub fn proc_fd() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

impl TransferDir {
    /// The transfer `id` under `state_dir`.
    pub fn new(state_dir: &Path, id: &str) -> TransferDir {
        TransferDir {
            path: state_dir.join(id),
            id: id.to_string(),
            at: None,
        }
    }

    /// The transfer `id` whose directory is `path`.
    pub fn from_path(path: PathBuf, id: String) -> TransferDir {
        TransferDir { path, id, at: None }
    }

    /// Hold the directory open and check it and its state directory on the descriptors: each a
    /// real directory (not a link) of this user, writable by no one else (see
    /// [`check_private`]). From then on every file in it is reached through the descriptor. A
    /// directory that does not exist yet is not an error (nothing is pinned).
    pub fn pin(&mut self, hint: &str) -> Result<()> {
        self.pin_as(hint, true)
    }

    /// [`TransferDir::pin`] for a command that only reads (`ferry status`): links are refused
    /// the same way, but the directory may be another user's (an administrator looking at a
    /// user's transfer).
    pub fn pin_to_read(&mut self) -> Result<()> {
        self.pin_as("", false)
    }

    fn pin_as(&mut self, hint: &str, private: bool) -> Result<()> {
        use rustix::fs::{Mode, OFlags};
        use std::os::fd::AsRawFd;
        if self.at.is_some() {
            return Ok(());
        }
        let state_dir = fsio::parent_of(&self.path);
        if !proc_fd() {
            return if private {
                check_private(state_dir, hint)
            } else {
                Ok(())
            };
        }
        let check = |fd: &std::os::fd::OwnedFd, dir: &Path| {
            if private {
                check_private_fd(fd, dir, hint)
            } else {
                Ok(())
            }
        };
        let fl = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let sfd = match rustix::fs::open(state_dir, fl, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                check_private(state_dir, hint)?;
                return Err(Error::io("open-dir", state_dir, e.into()));
            }
        };
        check(&sfd, state_dir)?;
        let tfd = match rustix::fs::openat(&sfd, self.id.as_str(), fl, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => {
                check_private(&self.path, hint)?;
                return Err(Error::io("open-dir", &self.path, e.into()));
            }
        };
        check(&tfd, &self.path)?;
        pinned_paths()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tfd.as_raw_fd(), self.path.clone());
        self.at = Some(std::sync::Arc::new(Pinned { fd: tfd }));
        Ok(())
    }

    /// Whether the directory is held open (see [`TransferDir::pin`]).
    pub fn pinned(&self) -> bool {
        self.at.is_some()
    }

    /// [`TransferDir::pin`] a directory that must exist (a rank joining a run, a command acting
    /// on the transfer): a missing one is an error, never a fall-back to its path.
    pub fn pin_existing(&mut self, hint: &str) -> Result<()> {
        self.pin(hint)?;
        if self.at.is_none() && proc_fd() {
            return Err(Error::new(
                ErrorClass::NotFound,
                format!("the state of transfer {} is gone", self.id),
            )
            .with_op("open-dir")
            .with_path(&self.path));
        }
        Ok(())
    }

    /// Remove the transfer's directory and what it holds: the files through the descriptor,
    /// then the (then empty) directory itself. A directory that cannot be pinned (swapped for a
    /// link, another user's) is left alone with the error; nothing is removed through a link.
    pub fn remove(&self, hint: &str) -> Result<()> {
        let mut td = self.clone();
        td.pin(hint)?;
        if !td.pinned() {
            if !proc_fd() && self.path.is_dir() {
                // No /proc: checked by path just now (`pin`), removed by path.
                return fs::remove_dir_all(&self.path).ctx("remove-dir", &self.path);
            }
            return Ok(()); // gone already
        }
        let dir = td.dir();
        for ent in fs::read_dir(&dir).ctx("read-dir", &self.path)? {
            let ent = ent.ctx("read-dir", &self.path)?;
            fsio::remove_file(&ent.path())?;
        }
        match fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("rmdir", &self.path, e)),
        }
    }

    /// The directory, as ferry reaches it: through its descriptor once pinned.
    pub fn dir(&self) -> PathBuf {
        match &self.at {
            Some(p) => fd_path(std::os::fd::AsFd::as_fd(&p.fd)),
            None => self.path.clone(),
        }
    }

    /// A file in this transfer's directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// The journal of `rank` in `attempt`.
    pub fn journal(&self, attempt: u32, rank: usize) -> PathBuf {
        self.dir().join(format!("journal.a{attempt}.r{rank}"))
    }

    /// Every journal file, with its attempt number, sorted.
    pub fn journals(&self) -> Result<Vec<(u32, PathBuf)>> {
        let mut out = Vec::new();
        let dir = self.dir();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("read-dir", &self.path, e)),
        };
        for ent in rd {
            let ent = ent.ctx("read-dir", &self.path)?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix("journal.a") else {
                continue;
            };
            let Some((a, r)) = rest.split_once(".r") else {
                continue;
            };
            if let (Ok(a), Ok(_)) = (a.parse::<u32>(), r.parse::<usize>()) {
                out.push((a, ent.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether a plan exists here.
    pub fn exists(&self) -> bool {
        self.file(names::PLAN).exists()
    }

    /// Whether `ferry forget` removed this transfer.
    pub fn forgotten(&self) -> bool {
        self.file(names::FORGOTTEN).exists()
    }
}

/// [`check_private`] on an open directory `fd` (named `dir`).
pub(crate) fn check_private_fd(fd: &std::os::fd::OwnedFd, dir: &Path, hint: &str) -> Result<()> {
    let st = rustix::fs::fstat(fd)
        .map_err(io::Error::from)
        .ctx("stat", dir)?;
    let me = rustix::process::geteuid().as_raw();
    let why = if st.st_uid != me {
        Some(format!(
            "belongs to uid {}, not to this user (uid {me})",
            st.st_uid
        ))
    } else if st.st_mode & 0o022 != 0 {
        Some(format!(
            "is writable by others (mode {:o})",
            st.st_mode & 0o7777
        ))
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::new(
            ErrorClass::Permission,
            format!(
                "the directory for transfer state {why}; refusing to keep state there ({hint})"
            ),
        )
        .with_op("stat")
        .with_path(dir)),
    }
}

/// Check that `dir`, which holds transfer state, is a real directory (not a symbolic link) of
/// the user who runs ferry, writable by no one else: otherwise someone else could change (or,
/// through a link, redirect) a transfer's plan and records. `hint` says what to do instead.
pub fn check_private(dir: &Path, hint: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(dir).ctx("lstat", dir)?;
    let me = rustix::process::geteuid().as_raw();
    let why = if md.file_type().is_symlink() {
        let to = fs::read_link(dir).unwrap_or_default();
        Some(format!("is a symbolic link (to '{}')", to.display()))
    } else if !md.is_dir() {
        Some("is not a directory".to_string())
    } else if md.uid() != me {
        Some(format!(
            "belongs to uid {}, not to this user (uid {me})",
            md.uid()
        ))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by others (mode {:o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    // A file where the directory should be is a mistake of the command line, not an intrusion.
    let class = if md.is_file() {
        ErrorClass::Usage
    } else {
        ErrorClass::Permission
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::new(
            class,
            format!(
                "the directory for transfer state {why}; refusing to keep state there ({hint})"
            ),
        )
        .with_op("lstat")
        .with_path(dir)),
    }
}

/// Create the state directory tree privately (0700).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            fsio::create_dirs(parent)?;
        }
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => fsio::fsync_dir(fsio::parent_of(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).ctx("mkdir", dir),
    }
}

/// Frame a record body: `ferry-KIND 1 LEN CRC\n` then the body.
pub fn frame(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut out = frame_header(kind, body.len() as u64, crc32fast::hash(body)).into_bytes();
    out.extend_from_slice(body);
    out
}

/// The first line of a framed record: kind, format, body length and CRC32.
fn frame_header(kind: &str, len: u64, crc: u32) -> String {
    format!("ferry-{kind} 1 {len} {crc:08x}\n")
}

/// Check a framed record and return its body; anything else is an `integrity` error naming `path`.
pub fn unframe<'a>(kind: &str, bytes: &'a [u8], path: &Path) -> Result<&'a [u8]> {
    let bad = |why: &str| {
        Error::integrity(
            path,
            format!("state file is unreadable ({why}); it was not trusted"),
        )
        .with_op("read-state")
    };
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad("no header"))?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("bad header"))?;
    let mut parts = header.split(' ');
    let magic = format!("ferry-{kind}");
    if parts.next() != Some(magic.as_str()) {
        return Err(bad(&format!("not a {kind} record")));
    }
    match parts.next().map(|v| v.parse::<u64>()) {
        Some(Ok(1)) => {}
        Some(Ok(v)) if v > 1 => return Err(Error::newer_format(path, kind, v, 1, false)),
        _ => return Err(bad("unknown version")),
    }
    let len: usize = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad length"))?;
    let crc = parts
        .next()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or_else(|| bad("bad checksum field"))?;
    let body = &bytes[nl + 1..];
    if body.len() != len {
        return Err(bad(&format!("{} bytes, header says {len}", body.len())));
    }
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch"));
    }
    Ok(body)
}

/// Write a record durably and atomically.
pub fn write_record<T: Serialize>(path: &Path, kind: &str, value: &T) -> Result<()> {
    let body = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal(format!("encode {kind}: {e}")))?;
    fsio::write_atomic(path, &frame(kind, &body))
}

/// Write a (large) record durably and atomically without holding its encoding in memory: it
/// is encoded twice, once to learn its length and CRC for the header, once into the file.
/// Returns the CRC32 of the body (the same as [`frame`] puts in the header).
pub fn write_record_streamed<T: Serialize>(path: &Path, kind: &str, value: &T) -> Result<u32> {
    /// Counts and checksums what passes through it on the way to `W`.
    struct Measure<W>(u64, crc32fast::Hasher, W);
    impl<W: Write> Write for Measure<W> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = self.2.write(b)?;
            self.0 += n as u64;
            self.1.update(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.2.flush()
        }
    }
    let encode = |w: &mut dyn Write| -> io::Result<(u64, u32)> {
        let mut m = Measure(0, crc32fast::Hasher::new(), io::BufWriter::new(w));
        serde_json::to_writer(&mut m, value).map_err(io::Error::other)?;
        m.flush()?;
        Ok((m.0, m.1.finalize()))
    };
    let (len, crc) =
        encode(&mut io::sink()).map_err(|e| Error::internal(format!("encode {kind}: {e}")))?;
    fsio::write_atomic_with(path, &mut |w| {
        w.write_all(frame_header(kind, len, crc).as_bytes())?;
        // The encoding is deterministic; checked, since the header vouches for it.
        match encode(w)? {
            (l, c) if (l, c) == (len, crc) => Ok(()),
            _ => Err(io::Error::other("the record encoded differently twice")),
        }
    })?;
    Ok(crc)
}

/// Read a record; `None` if it does not exist, `integrity` if it does not check out.
pub fn read_record<T: DeserializeOwned>(path: &Path, kind: &str) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let body = unframe(kind, &bytes, path)?;
    serde_json::from_slice(body).map(Some).map_err(|e| {
        Error::integrity(
            path,
            format!("state file is unreadable ({e}); it was not trusted"),
        )
        .with_op("read-state")
    })
}

/// The time now, RFC 3339 in UTC to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// `user@host` of this process.
pub fn who() -> (String, String) {
    let uid = rustix::process::getuid().as_raw();
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| user_name(uid))
        .unwrap_or_else(|| format!("uid{uid}"));
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    (user, host)
}

/// The login name of `uid` from the password database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: getpwuid_r writes only into `pwd` and `buf` (whose length it is given) and sets
    // `result` to null or to `&pwd`; pw_name then points into `buf`, valid while `buf` lives.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// 64 random bits: the process's random hasher keys, the time, the pid and, where it can be read,
/// `/dev/urandom`.
fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    let mut r = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut r))
        .is_ok()
    {
        h.write(&r);
    }
    h.finish()
}

/// A fresh transfer id: time of day plus random bits (`20261122T054417-3fa9c1`).
pub fn new_id() -> String {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp: String = stamp
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    format!("{stamp}-{:06x}", random_u64() & 0xff_ffff)
}

/// A fresh random token for a plan (16 hex digits), part of its temporary names.
pub fn new_nonce() -> String {
    format!("{:016x}", random_u64())
}

/// Ids are file names: letters, digits, `.`, `_`, `-`; 1 to 64 of them, not starting with `.`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "'{id}' is not a valid transfer id (1-64 of A-Z a-z 0-9 . _ -, not starting with .)"
        )))
    }
}

/// The lock a live run holds on its transfer (an exclusive `flock` on `ID/lock`, released by the
/// kernel when the process dies, so a killed run never leaves a stale lock).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

fn open_lock(td: &TransferDir) -> Result<File> {
    locks::open_lock_file(&td.file(names::LOCK))
}

impl Lock {
    /// Take the transfer's lock or fail with a `usage` error naming the holder.
    pub fn acquire(td: &TransferDir) -> Result<Lock> {
        let mut f = open_lock(td)?;
        let lp = td.file(names::LOCK);
        // `ferry status` holds a shared lock for an instant; do not mistake it for a run.
        for _ in 0..50 {
            match locks::try_lock(&f, &lp, locks::Kind::Exclusive, locks::Range::ALL)? {
                true => {
                    if members_alive(td, 50) {
                        return Err(Error::new(
                            ErrorClass::Usage,
                            format!(
                                "ranks of an earlier run of transfer {} are still running; wait \
                                 for them to end (their launcher stops them) and try again",
                                td.id
                            ),
                        )
                        .with_path(&td.path));
                    }
                    let (user, host) = who();
                    let _ = f.set_len(0);
                    let _ = f.rewind();
                    let _ = write!(f, "pid {} on {host} by {user}", std::process::id());
                    return Ok(Lock { _file: f });
                }
                false => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        let holder = lock_holder(&mut f);
        Err(Error::new(
            ErrorClass::Usage,
            format!(
                "transfer {} is in use by another ferry run ({holder}); wait for it to end or \
                 `ferry cancel {}`",
                td.id, td.id
            ),
        )
        .with_path(&td.path))
    }
}

fn lock_holder(f: &mut File) -> String {
    let mut s = String::new();
    let _ = f.rewind();
    let _ = f.read_to_string(&mut s);
    if s.is_empty() {
        "holder unknown".into()
    } else {
        s
    }
}

/// If a live run holds the transfer's lock, who it is; if only ranks of a run are still alive
/// (rank 0 is gone, the others not yet), says so.
pub fn live_holder(td: &TransferDir) -> Option<String> {
    let lp = td.file(names::LOCK);
    if let Ok(mut f) = File::open(&lp) {
        if let Ok(false) = locks::try_lock(&f, &lp, locks::Kind::Shared, locks::Range::ALL) {
            return Some(lock_holder(&mut f));
        }
    }
    members_alive(td, 1).then(|| "ranks of a run, without rank 0".to_string())
}

/// Whether some rank of a run still holds its shared lock on `members` (looked at `tries` times,
/// 20 ms apart).
fn members_alive(td: &TransferDir, tries: u32) -> bool {
    // Opened for writing: an exclusive lock on a read-only descriptor is refused on NFS (EBADF),
    // which must never read as "nobody is alive".
    let p = td.file(names::MEMBERS);
    let f = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        Err(e) => {
            log::warn!(
                "cannot open '{}' to see whether ranks of a run are alive: {e}; assuming they are",
                p.display()
            );
            return true;
        }
    };
    for i in 0..tries {
        match locks::try_lock(&f, &p, locks::Kind::Exclusive, locks::Range::ALL) {
            Ok(true) => return false,
            Ok(false) if i + 1 < tries => std::thread::sleep(std::time::Duration::from_millis(20)),
            Ok(false) => return true,
            Err(e) => {
                log::warn!(
                    "cannot lock '{}' to see whether ranks of a run are alive: {e}; assuming they are",
                    p.display()
                );
                return true;
            }
        }
    }
    false
}

/// A rank's membership in a live run: a shared lock on `members`, held until the rank is done, so
/// no new run starts and status does not say `interrupted` while any rank still works.
#[derive(Debug)]
pub struct Member {
    _file: File,
}

impl Member {
    /// Join the run of `td` (blocks only while a new run checks for stragglers).
    pub fn join(td: &TransferDir) -> Result<Member> {
        let p = td.file(names::MEMBERS);
        let f = locks::open_lock_file(&p)?;
        locks::lock_wait(&f, &p, locks::Kind::Shared, locks::Range::ALL)?;
        Ok(Member { _file: f })
    }
}

/// The per-user registry of transfers (id → state directory), so `ferry status ID` works without
/// `--state-dir`. It is a convenience: the state directory alone is the truth.
pub mod registry {
    use super::*;

    /// `$FERRY_HOME`, else `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`.
    pub fn dir() -> Option<PathBuf> {
        if let Some(h) = std::env::var_os("FERRY_HOME") {
            return Some(PathBuf::from(h));
        }
        if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
            return Some(PathBuf::from(x).join("ferry"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/ferry"))
    }

    fn entry(id: &str) -> Option<PathBuf> {
        dir().map(|d| d.join("transfers").join(id))
    }

    /// Reserve id `td.id` for `td` in the registry: an id registered for another state
    /// directory that still exists (even forgotten) is a `usage` error, so ids are never reused.
    /// The reservation is atomic (a hard link of a complete file), so two runs racing for one id
    /// cannot both win. Without a registry (no home directory) this does nothing.
    pub fn reserve(td: &TransferDir) -> Result<()> {
        let Some(p) = entry(&td.id) else {
            return Ok(());
        };
        if create_private_dir(fsio::parent_of(&p)).is_err() {
            log::debug!(
                "no registry for transfer {}: its directory cannot be made",
                td.id
            );
            return Ok(());
        }
        let tmp = p.with_file_name(format!(".{}.new-{}", td.id, std::process::id()));
        fsio::write_atomic(&tmp, crate::pathser::encode(&td.path).as_bytes())?;
        let linked = fs::hard_link(&tmp, &p);
        let _ = fsio::remove_file(&tmp);
        match linked {
            Ok(()) => fsio::fsync_dir(fsio::parent_of(&p)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match lookup(&td.id) {
                Some(old) if old == td.path => Ok(()),
                Some(old) if old.is_dir() => Err(Error::usage(format!(
                    "transfer id {} is already used (state in '{}'); ids are never reused",
                    td.id,
                    old.display()
                ))),
                // A stale entry (its state directory is gone): take it over.
                _ => fsio::write_atomic(&p, crate::pathser::encode(&td.path).as_bytes()),
            },
            Err(e) => {
                log::debug!("could not record transfer {} in the registry: {e}", td.id);
                Ok(())
            }
        }
    }

    /// Where transfer `id` keeps its state, if registered.
    pub fn lookup(id: &str) -> Option<PathBuf> {
        let s = fs::read_to_string(entry(id)?).ok()?;
        crate::pathser::decode(s.trim_end_matches('\n')).ok()
    }

    /// Every registered transfer.
    pub fn all() -> Vec<TransferDir> {
        let Some(d) = dir() else { return Vec::new() };
        let Ok(rd) = fs::read_dir(d.join("transfers")) else {
            return Vec::new();
        };
        let mut out: Vec<TransferDir> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                if validate_id(&id).is_err() {
                    return None;
                }
                let path = lookup(&id)?;
                Some(TransferDir::from_path(path, id))
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Drop transfer `id` from the registry.
    pub fn remove(id: &str) {
        if let Some(p) = entry(id) {
            let _ = fsio::remove_file(&p);
        }
    }
}

/// Find transfer `id`: in `--state-dir`, else `$FERRY_STATE_DIR`, else the registry, else
/// `./.ferry`. An unknown id is a `usage` error saying where ferry looked. The directory found is
/// checked and held open (see [`TransferDir::pin`]).
pub fn locate(id: &str, state_dir: Option<&Path>) -> Result<TransferDir> {
    let mut td = find(id, state_dir)?;
    td.pin("give a private directory of yours with --state-dir")?;
    Ok(td)
}

/// [`locate`] for a command that only reads (see [`TransferDir::pin_to_read`]).
pub fn locate_to_read(id: &str, state_dir: Option<&Path>) -> Result<TransferDir> {
    let mut td = find(id, state_dir)?;
    td.pin_to_read()?;
    Ok(td)
}

fn find(id: &str, state_dir: Option<&Path>) -> Result<TransferDir> {
    validate_id(id)?;
    let mut looked = Vec::new();
    let mut candidates = Vec::new();
    if let Some(d) = state_dir {
        candidates.push(TransferDir::new(d, id));
    } else {
        if let Some(d) = std::env::var_os("FERRY_STATE_DIR") {
            candidates.push(TransferDir::new(Path::new(&d), id));
        }
        if let Some(p) = registry::lookup(id) {
            candidates.push(TransferDir::from_path(p, id.to_string()));
        }
        candidates.push(TransferDir::new(Path::new(".ferry"), id));
    }
    for td in candidates {
        if td.forgotten() {
            return Err(Error::usage(format!(
                "transfer {id} was forgotten (ferry forget); its id is not reused"
            ))
            .with_path(&td.path));
        }
        if td.path.is_dir() {
            return Ok(td);
        }
        looked.push(td.path.display().to_string());
    }
    Err(Error::usage(format!(
        "no such transfer '{id}' (looked in {}); pass --state-dir DIR",
        looked.join(", ")
    )))
}

/// All transfers in `state_dir`, sorted by id.
pub fn list_dir(state_dir: &Path) -> Result<Vec<TransferDir>> {
    let rd = match fs::read_dir(state_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read-dir", state_dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.ctx("read-dir", state_dir)?;
        let Some(id) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let td = TransferDir::new(state_dir, &id);
        if validate_id(&id).is_ok() && ent.path().is_dir() && !td.forgotten() {
            out.push(td);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The commit decision: every rank's data is durable under temporary names; renames may start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    /// When it was taken.
    pub time: String,
    /// The attempt that took it.
    pub attempt: u32,
}

/// The transfer was cancelled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cancelled {
    /// When.
    pub time: String,
    /// `user@host`.
    pub by: String,
}

/// How the last run ended, when it failed (removed when a new run starts).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// When.
    pub time: String,
    /// The error, as every rank agreed on it.
    pub error: Error,
}

/// The sources were removed after the commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourcesRemoved {
    /// When.
    pub time: String,
    /// Source directories left in place because they held files not in the plan.
    #[serde(with = "crate::pathser::vec")]
    pub kept: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_must_be_kept_in_a_private_directory_of_this_user() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let d = base.path().join("state");
        create_private_dir(&d).unwrap();
        check_private(&d, "hint").unwrap();
        // Open to others.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_private(&d, "hint").unwrap_err();
        assert_eq!(err.class, ErrorClass::Permission);
        assert!(err.to_string().contains("writable by others"), "{err}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        // A symlink in its place (a planted DST/.ferry).
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let err = check_private(&link, "hint").unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // Someone else's (only root can make one here).
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&d, Some(4321), None).unwrap();
            let err = check_private(&d, "hint").unwrap_err();
            assert!(err.to_string().contains("belongs to uid 4321"), "{err}");
        }
    }

    #[test]
    fn framed_records_detect_damage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rec");
        write_record(
            &p,
            "decision",
            &Decision {
                time: "t".into(),
                attempt: 3,
            },
        )
        .unwrap();
        let back: Decision = read_record(&p, "decision").unwrap().unwrap();
        assert_eq!(back.attempt, 3);
        let mut bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x20;
        fs::write(&p, &bytes).unwrap();
        let e = read_record::<Decision>(&p, "decision").unwrap_err();
        assert_eq!(e.class, ErrorClass::Integrity);
        assert_eq!(e.path.as_deref(), Some(p.as_path()));
        fs::write(&p, &bytes[..n / 2]).unwrap();
        assert!(read_record::<Decision>(&p, "decision").is_err());
        assert!(read_record::<Decision>(&d.path().join("none"), "decision")
            .unwrap()
            .is_none());
    }

    #[test]
    fn ids() {
        let a = new_id();
        validate_id(&a).unwrap();
        assert_ne!(a, new_id());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lock_is_exclusive_and_visible() {
        let d = tempfile::tempdir().unwrap();
        let td = TransferDir::new(d.path(), "t1");
        create_private_dir(&td.path).unwrap();
        assert!(live_holder(&td).is_none());
        let l = Lock::acquire(&td).unwrap();
        assert!(live_holder(&td).unwrap().contains("pid"));
        let e = Lock::acquire(&td).unwrap_err();
        assert_eq!(e.class, ErrorClass::Usage);
        drop(l);
        assert!(live_holder(&td).is_none());
        drop(Lock::acquire(&td).unwrap());
        // A rank of a run still at work, its rank 0 gone: still live, no new run may start.
        let m = Member::join(&td).unwrap();
        assert!(live_holder(&td).unwrap().contains("without rank 0"));
        assert_eq!(Lock::acquire(&td).unwrap_err().class, ErrorClass::Usage);
        drop(m);
        Lock::acquire(&td).unwrap();
    }
}
