//! Advisory locks: who runs a transfer (see `state::Lock`) and who writes into a destination
//! ([`DestLock`]). The only module that takes locks.
//!
//! Every lock is an open-file-description record lock (`fcntl(F_OFD_SETLK)`) on a regular file:
//! held by an open file and released by the kernel when its last descriptor closes, so a killed
//! run never leaves a stale lock; and, unlike `flock`, carried to the server on NFS (v3 through
//! lockd, v4 in the protocol), so runs on different nodes see each other. Locks are never taken
//! on directories for this (NFSv4 has no locks on directories), and an exclusive lock is only
//! asked for on a descriptor open for writing (NFS refuses it on a read-only one, EBADF).
//!
//! A lock that cannot be taken because the file system refuses locks is an error, never read as
//! "nobody holds it". `FERRY_DEST_LOCK=off` runs without destination locks, on a file system
//! that has none (Lustre mounted `noflock`), with a warning.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::{failpoints, fsio};

/// Who else may hold a lock at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Other shared holders (readers, members of a run).
    Shared,
    /// Nobody.
    Exclusive,
}

/// Bytes `start..start + len` of a file, `len` 0 meaning "to the end of any file".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// Length (0: every byte from `start` on).
    pub len: u64,
}

impl Range {
    /// The whole file.
    pub const ALL: Range = Range { start: 0, len: 0 };
}

fn flock(kind: Kind, r: Range) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all zeroes is a valid value of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        Kind::Shared => libc::F_RDLCK,
        Kind::Exclusive => libc::F_WRLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = r.start as libc::off_t;
    fl.l_len = r.len as libc::off_t;
    fl
}

fn setlk(f: &File, cmd: libc::c_int, kind: Kind, r: Range) -> io::Result<()> {
    let mut fl = flock(kind, r);
    loop {
        // SAFETY: `fl` is a valid `struct flock` that outlives the call; `l_pid` is 0 as OFD
        // locks require.
        if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Take a lock on `r` of `f` (named `path`) if no other open file holds a conflicting one:
/// `Ok(true)` taken, `Ok(false)` held by another. A file system that refuses the lock is an
/// error (class by errno: ENOLCK and EOPNOTSUPP are `usage`).
pub fn try_lock(f: &File, path: &Path, kind: Kind, r: Range) -> Result<bool> {
    match setlk(f, libc::F_OFD_SETLK, kind, r) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(refused(path, e)),
    }
}

/// Take a lock on `r` of `f`, waiting while another open file holds a conflicting one.
pub fn lock_wait(f: &File, path: &Path, kind: Kind, r: Range) -> Result<()> {
    setlk(f, libc::F_OFD_SETLKW, kind, r).map_err(|e| refused(path, e))
}

fn refused(path: &Path, e: io::Error) -> Error {
    let errno = e.raw_os_error();
    let mut err = Error::io("lock", path, e);
    if matches!(
        errno,
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EBADF)
    ) {
        err.class = crate::ErrorClass::Usage;
        err.message = format!(
            "the file system refuses a lock ferry needs ({}); on a file system without locks \
             (NFS without lockd, Lustre mounted noflock) set FERRY_DEST_LOCK=off to go on \
             without the destination guard, and make sure no other transfer writes there",
            err.message
        );
    }
    err
}

/// [`try_lock`] on a destination's guard file, behind the failpoint `locks::dest` (whose
/// `error(ENOLCK)` stands for a file system without locks).
fn guard_lock(f: &File, path: &Path, kind: Kind, r: Range) -> Result<bool> {
    if let Err(e) = failpoints::io("locks::dest", path) {
        return Err(match e.errno {
            Some(n) => refused(path, io::Error::from_raw_os_error(n)),
            None => e,
        });
    }
    try_lock(f, path, kind, r)
}

/// Open (creating, private, never through a symlink) a file that is only ever locked.
pub fn open_lock_file(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .ctx("open", p)
}

/// The name of the guard file in a destination directory's `.ferry` directory.
const GUARD: &str = ".dest.lock";

/// Locks on what a run writes, held for the run, so that a second transfer never writes the
/// same final names:
///
/// - each destination tree's root (see [`crate::plan::Plan::dest_roots`]): an exclusive lock
///   on all of `ROOT/.ferry/.dest.lock`;
/// - each single file written (a file copied alone, an AXL file pair): an exclusive lock on one
///   byte of `DIR/.ferry/.dest.lock` chosen by the file's name (a hash), so transfers of other
///   names into one directory go on side by side (SCR's ranks flushing into `ckpt.N/`), and a
///   second transfer of the same name, or of a tree into that directory, is refused;
/// - every directory above those, where such a guard file exists: a shared lock on its byte 0,
///   so a tree transfer into a directory that holds a running transfer is refused;
/// - on file systems that lock directories (every local one), an exclusive `flock` on each
///   tree root and shared ones on every directory above the trees and files, which also
///   refuses a tree transfer around a running one whose guard file it would not see.
///
/// A conflict is a `usage` error; a file system that refuses the locks is one too (see the
/// module's documentation for `FERRY_DEST_LOCK=off`).
#[derive(Debug)]
pub struct DestLock {
    /// `flock`s on directories.
    flocks: Vec<File>,
    /// Guard files held, with their paths, removed on release when nobody else holds them.
    guards: Vec<(File, PathBuf)>,
}

impl Drop for DestLock {
    /// Release the locks. A guard file nobody else holds any lock on is removed (and its
    /// `.ferry` directory, if that is then empty), so a destination keeps no file of ferry's
    /// once its transfers are done; one removed under a run that has just opened it is seen by
    /// that run (see [`take_guard`]), which opens the new one.
    fn drop(&mut self) {
        while let Some((g, p)) = self.guards.pop() {
            if let Ok(true) = try_lock(&g, &p, Kind::Exclusive, Range::ALL) {
                if still_named(&g, &p) {
                    let _ = std::fs::remove_file(&p);
                    let _ = std::fs::remove_dir(fsio::parent_of(&p));
                }
            }
        }
    }
}

/// Whether `path` still names the open file `f` (not removed, not replaced).
fn still_named(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Open the guard file of directory `d` and lock `r` of it: `Ok(None)` if another run holds a
/// conflicting lock. A guard removed by a run that released it between our open and our lock
/// is not the guard any more: open the new one.
fn take_guard(d: &Path, kind: Kind, r: Range) -> Result<Option<(File, PathBuf)>> {
    let mut last = None;
    for _ in 0..20 {
        let (g, gp) = match open_guard(d) {
            Ok(x) => x,
            Err(e) if e.class == crate::ErrorClass::NotFound => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        if !guard_lock(&g, &gp, kind, r)? {
            return Ok(None);
        }
        if still_named(&g, &gp) {
            return Ok(Some((g, gp)));
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::new(
            crate::ErrorClass::Transient,
            "the destination's lock file keeps being replaced; try again",
        )
        .with_op("lock")
        .with_path(d)
    }))
}

fn busy(d: &Path) -> Error {
    Error::usage(
        "another ferry transfer is writing into this destination (or into a tree that holds \
         it, or one inside it) right now; wait for it to end (`ferry list`) or choose another \
         destination",
    )
    .with_op("lock")
    .with_path(d)
}

/// Destination locks are switched off (`FERRY_DEST_LOCK=off`).
fn switched_off() -> bool {
    std::env::var_os("FERRY_DEST_LOCK").is_some_and(|v| v == "off" || v == "0")
}

/// The byte of a directory's guard file that stands for the final name `name` (FNV-1a, so every
/// ferry picks the same byte; 0 is kept for the shared locks of transfers below).
fn name_byte(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    1 + (h >> 2)
}

/// Open (making `.ferry` and the file if needed) the guard file of destination directory `d`.
/// Nothing is made through a symbolic link: `d` itself must be a directory (a link planted at a
/// destination is refused), and `.ferry` a private directory of this user, as a state directory
/// must be.
fn open_guard(d: &Path) -> Result<(File, PathBuf)> {
    use rustix::fs::{Mode, OFlags};
    let dir = d.join(".ferry");
    let p = dir.join(GUARD);
    let fl = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dfd = match rustix::fs::open(d, fl, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) if d.is_symlink() => {
            return Err(Error::new(
                crate::ErrorClass::Permission,
                "the destination is a symbolic link; refusing to write through it",
            )
            .with_op("lock")
            .with_path(d))
        }
        Err(e) => return Err(Error::io("open-dir", d, e.into())),
    };
    match rustix::fs::mkdirat(&dfd, ".ferry", Mode::from_raw_mode(0o700)) {
        Ok(()) => fsio::fsync_dir(d)?,
        Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(Error::io("mkdir", &dir, e.into())),
    }
    let sfd = match rustix::fs::openat(&dfd, ".ferry", fl, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            crate::state::check_private(&dir, "move it away, or set FERRY_DEST_LOCK=off")?;
            return Err(Error::io("open-dir", &dir, e.into()));
        }
    };
    crate::state::check_private_fd(&sfd, &dir, "move it away, or set FERRY_DEST_LOCK=off")?;
    let fd = rustix::fs::openat(
        &sfd,
        GUARD,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io::Error::from)
    .ctx("open", &p)?;
    Ok((File::from(fd), p))
}

/// An existing guard file of directory `d`, opened to read (`None` if there is none or it
/// cannot be opened: another user's).
fn existing_guard(d: &Path) -> Option<(File, PathBuf)> {
    let p = d.join(".ferry").join(GUARD);
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&p)
        .ok()
        .map(|f| (f, p))
}

/// A `flock` on directory `d` (local file systems only: an error, as on NFS, is passed over,
/// the guard files carry the lock there). `Ok(None)`: not taken.
fn dir_flock(d: &Path, exclusive: bool) -> Result<Option<File>> {
    let Ok(f) = File::open(d) else {
        return Ok(None);
    };
    let got = if exclusive {
        f.try_lock()
    } else {
        f.try_lock_shared()
    };
    match got {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Err(busy(d)),
        Err(std::fs::TryLockError::Error(e)) => {
            log::debug!("no flock on directory '{}' ({e})", d.display());
            Ok(None)
        }
    }
}

impl DestLock {
    /// Lock the trees `dirs` (creating them if `create`; else skipping those that do not exist
    /// yet).
    pub fn acquire(dirs: &[PathBuf], create: bool) -> Result<DestLock> {
        DestLock::acquire_with(dirs, &[], create)
    }

    /// [`DestLock::acquire`], and `files`, single files the run writes (their directories are
    /// made if `create`; else a file whose directory does not exist yet is skipped).
    pub fn acquire_with(dirs: &[PathBuf], files: &[PathBuf], create: bool) -> Result<DestLock> {
        if switched_off() {
            if !dirs.is_empty() || !files.is_empty() {
                log::warn!(
                    "FERRY_DEST_LOCK=off: a second transfer into the same destination is not \
                     refused"
                );
            }
            return Ok(DestLock {
                flocks: Vec::new(),
                guards: Vec::new(),
            });
        }
        let mut lock = DestLock {
            flocks: Vec::new(),
            guards: Vec::new(),
        };
        let mut mine: std::collections::BTreeSet<PathBuf> = Default::default();
        for d in dirs {
            if create {
                fsio::create_dirs(d)?;
            } else if !d.is_dir() {
                continue;
            }
            let Some(g) = take_guard(d, Kind::Exclusive, Range::ALL)? else {
                return Err(busy(d));
            };
            lock.guards.push(g);
            let f = dir_flock(d, true)?;
            lock.flocks.extend(f);
            mine.insert(d.clone());
        }
        for f in files {
            let d = fsio::parent_of(f);
            if create {
                fsio::create_dirs(d)?;
            } else if !d.is_dir() {
                continue;
            }
            let name = f.file_name().map(|n| n.as_bytes()).unwrap_or_default();
            let byte = Range {
                start: name_byte(name),
                len: 1,
            };
            let Some(g) = take_guard(d, Kind::Exclusive, byte)? else {
                return Err(busy(f));
            };
            lock.guards.push(g);
        }
        // Every directory above the trees, and each single file's directory and those above.
        let mut above: std::collections::BTreeSet<PathBuf> = Default::default();
        for d in dirs {
            above.extend(d.ancestors().skip(1).map(Path::to_path_buf));
        }
        for f in files {
            above.extend(f.ancestors().skip(1).map(Path::to_path_buf));
        }
        for d in above {
            if d.as_os_str().is_empty() || mine.contains(&d) {
                continue;
            }
            if let Some((g, gp)) = existing_guard(&d) {
                let zero = Range { start: 0, len: 1 };
                match guard_lock(&g, &gp, Kind::Shared, zero) {
                    // A guard already removed again guards nothing.
                    Ok(true) if still_named(&g, &gp) => lock.guards.push((g, gp)),
                    Ok(true) => {}
                    Ok(false) => return Err(busy(&d)),
                    Err(e) => log::debug!("no shared lock on '{}': {e}", gp.display()),
                }
            }
            let f = dir_flock(&d, false)?;
            lock.flocks.extend(f);
        }
        Ok(lock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_bytes_differ_and_spare_byte_zero() {
        let a = name_byte(b"rank_0.ckpt");
        let b = name_byte(b"rank_1.ckpt");
        assert_ne!(a, b);
        assert!(a >= 1 && b >= 1);
        assert_eq!(name_byte(b""), name_byte(b""));
    }

    #[test]
    fn ofd_locks_conflict_between_open_files_of_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let a = open_lock_file(&p).unwrap();
        let b = open_lock_file(&p).unwrap();
        let one = Range { start: 5, len: 1 };
        let other = Range { start: 6, len: 1 };
        assert!(try_lock(&a, &p, Kind::Exclusive, one).unwrap());
        assert!(!try_lock(&b, &p, Kind::Exclusive, one).unwrap());
        assert!(!try_lock(&b, &p, Kind::Shared, Range::ALL).unwrap());
        assert!(try_lock(&b, &p, Kind::Exclusive, other).unwrap());
        drop(a);
        assert!(try_lock(&b, &p, Kind::Exclusive, Range::ALL).unwrap());
    }
}
