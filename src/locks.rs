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
use std::os::fd::{AsRawFd, OwnedFd};
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

/// `F_RDLCK`, `F_WRLCK`, or `F_UNLCK` for no kind (a release).
fn flock(kind: Option<Kind>, r: Range) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all zeroes is a valid value of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        Some(Kind::Shared) => libc::F_RDLCK,
        Some(Kind::Exclusive) => libc::F_WRLCK,
        None => libc::F_UNLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = r.start as libc::off_t;
    fl.l_len = r.len as libc::off_t;
    fl
}

fn setlk(f: &File, cmd: libc::c_int, kind: Option<Kind>, r: Range) -> io::Result<()> {
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
    match setlk(f, libc::F_OFD_SETLK, Some(kind), r) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(refused(path, e)),
    }
}

/// Take a lock on `r` of `f`, waiting while another open file holds a conflicting one.
pub fn lock_wait(f: &File, path: &Path, kind: Kind, r: Range) -> Result<()> {
    setlk(f, libc::F_OFD_SETLKW, Some(kind), r).map_err(|e| refused(path, e))
}

fn refused(path: &Path, e: io::Error) -> Error {
    let errno = e.raw_os_error();
    let mut err = Error::io("lock", path, e);
    if matches!(
        errno,
        Some(libc::ENOLCK)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS)
            | Some(libc::EBADF)
            | Some(libc::EINVAL)
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
/// module's documentation for `FERRY_DEST_LOCK=off`). Paths are taken as given: the caller
/// resolves links above them (see `transfer::dest_lock`).
///
/// On release, the last holder of a guard file removes it (through its directory's descriptor);
/// the then empty `.ferry` directory stays, so the directory holding it keeps the mtime the
/// commit gave it.
#[derive(Debug)]
pub struct DestLock {
    /// `flock`s on directories.
    flocks: Vec<File>,
    /// Guard files held.
    guards: Vec<Guard>,
}

/// One guard file held: its `.ferry` directory, the file, its path (for messages), and whether
/// it is open for writing (only then can this run remove it).
#[derive(Debug)]
struct Guard {
    dir: OwnedFd,
    file: File,
    path: PathBuf,
    writable: bool,
}

impl Guard {
    /// Whether the guard's name still names this very file (not removed, not replaced).
    fn named(&self) -> bool {
        named(&self.dir, &self.file)
    }
}

fn named(dir: &OwnedFd, f: &File) -> bool {
    use rustix::fs::AtFlags;
    match (
        rustix::fs::fstat(f),
        rustix::fs::statat(dir, GUARD, AtFlags::SYMLINK_NOFOLLOW),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// How often, 2 ms apart, a held guard is looked at again before a run is refused as busy (half
/// a second): a run that releases a guard holds all of it for the few calls that remove it, and
/// on a loaded node it may be descheduled in between; a run really holding it holds it far
/// longer.
const RETRIES: u32 = 250;

/// How often, 2 ms apart, a run ending beside others tries to take its guard whole to remove it
/// (the last of them to end removes it).
const DROP_TRIES: u32 = 10;

fn pause() {
    std::thread::sleep(std::time::Duration::from_millis(2));
}

impl Drop for DestLock {
    /// Release the locks; the last holder of a guard file removes it. A run that opened it
    /// meanwhile sees that its name is gone once it has its lock, and opens the new one.
    fn drop(&mut self) {
        self.flocks.clear();
        // Let go of this run's own ranges first, so runs ending together do not each see the
        // others and all leave the file.
        for g in &self.guards {
            let _ = setlk(&g.file, libc::F_OFD_SETLK, None, Range::ALL);
        }
        for g in self.guards.drain(..) {
            if !g.writable {
                continue;
            }
            for _ in 0..DROP_TRIES {
                match try_lock(&g.file, &g.path, Kind::Exclusive, Range::ALL) {
                    Ok(true) => {
                        if g.named() {
                            let _ =
                                rustix::fs::unlinkat(&g.dir, GUARD, rustix::fs::AtFlags::empty());
                        }
                        break;
                    }
                    // Still held by another run (it removes the file when it ends), or gone.
                    Ok(false) if g.named() => pause(),
                    _ => break,
                }
            }
        }
    }
}

/// What locking a guard came to.
enum Got {
    Held,
    /// Another run holds a conflicting lock.
    Busy,
    /// The file was removed (by a run that released it) before we had our lock.
    Gone,
}

/// Lock `r` of guard `g`, looking again for a while if it is held: a run that releases a guard
/// holds all of it for the few calls that remove it.
fn lock_guard(g: &Guard, kind: Kind, r: Range) -> Result<Got> {
    for i in 0..=RETRIES {
        if guard_lock(&g.file, &g.path, kind, r)? {
            return Ok(if g.named() { Got::Held } else { Got::Gone });
        }
        if !g.named() {
            return Ok(Got::Gone);
        }
        if i < RETRIES {
            pause();
        }
    }
    Ok(Got::Busy)
}

/// What taking a directory's guard came to.
enum Taken {
    Held(Guard),
    Busy,
    /// No guard there: `.ferry` is not this user's (see [`open_guard`]).
    NoGuard,
}

/// Open the guard file of directory `d` (making it) and lock `r` of it; a guard removed by a
/// run that released it between our open and our lock is not the guard any more: the new one
/// is opened.
fn take_guard(d: &Path, kind: Kind, r: Range, make: bool) -> Result<Taken> {
    for _ in 0..RETRIES {
        let g = match open_guard(d, make) {
            Ok(Some(g)) => g,
            Ok(None) => return Ok(Taken::NoGuard),
            // `.ferry` removed under us (by hand): make it again.
            Err(e) if e.class == crate::ErrorClass::NotFound => continue,
            Err(e) => return Err(e),
        };
        match lock_guard(&g, kind, r)? {
            Got::Held => return Ok(Taken::Held(g)),
            Got::Busy => return Ok(Taken::Busy),
            Got::Gone => continue,
        }
    }
    Err(Error::new(
        crate::ErrorClass::Transient,
        "the destination's lock file keeps being replaced; try again",
    )
    .with_op("lock")
    .with_path(d))
}

fn busy(d: &Path) -> Error {
    Error::usage(
        "another ferry transfer is writing into this destination (or into a tree that holds          it, or one inside it) right now; wait for it to end (`ferry list`) or choose another          destination",
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
    1 + (crate::plan::fnv1a(name) >> 2)
}

/// Open (making `.ferry` and the file if needed) the guard file of destination directory `d`.
/// Nothing is made through a symbolic link: `d` itself must be a directory (a link planted at a
/// destination is refused). A `.ferry` that is not a private directory of this user (another
/// user's, in a shared directory; a link) is not used: `Ok(None)`, with a warning, and the
/// directory `flock`s are the only guard there. Without `make`, nothing is made: no guard there
/// is `Ok(None)` too (a check before a run has made anything).
fn open_guard(d: &Path, make: bool) -> Result<Option<Guard>> {
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
    if make {
        match rustix::fs::mkdirat(&dfd, ".ferry", Mode::from_raw_mode(0o700)) {
            Ok(()) => fsio::fsync_dir(d)?,
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(Error::io("mkdir", &dir, e.into())),
        }
    }
    let not_ours = |why: String| {
        log::warn!(
            "'{}' {why}: no lock file of ferry's there, so a second transfer into '{}' is only              refused on this node",
            dir.display(),
            d.display()
        );
        Ok(None)
    };
    let sfd = match rustix::fs::openat(&dfd, ".ferry", fl, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) if !make => return Ok(None),
        Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
            return not_ours("is not a directory".into())
        }
        Err(e) => return Err(Error::io("open-dir", &dir, e.into())),
    };
    if let Err(e) = crate::state::check_private_fd(&sfd, &dir, "") {
        return not_ours(e.message);
    }
    let create = if make {
        OFlags::CREATE
    } else {
        OFlags::empty()
    };
    let fd = match rustix::fs::openat(
        &sfd,
        GUARD,
        OFlags::RDWR | create | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => fd,
        // Nobody holds a guard that does not exist.
        Err(rustix::io::Errno::NOENT) if !make => return Ok(None),
        Err(e) => return Err(Error::io("open", &p, e.into())),
    };
    Ok(Some(Guard {
        dir: sfd,
        file: File::from(fd),
        path: p,
        writable: true,
    }))
}

/// An existing guard file of directory `d` (`None` if there is none or it cannot be opened),
/// opened for writing where it may be, so that this run can remove it if it ends last.
fn existing_guard(d: &Path) -> Option<Guard> {
    use rustix::fs::{Mode, OFlags};
    let fl = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let sfd = rustix::fs::open(d.join(".ferry"), fl, Mode::empty()).ok()?;
    let open = |rw: OFlags| {
        rustix::fs::openat(
            &sfd,
            GUARD,
            rw | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let (fd, writable) = match open(OFlags::RDWR) {
        Ok(fd) => (fd, true),
        Err(_) => (open(OFlags::RDONLY).ok()?, false),
    };
    Some(Guard {
        dir: sfd,
        file: File::from(fd),
        path: d.join(".ferry").join(GUARD),
        writable,
    })
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
    /// Lock the trees `dirs` (creating them if `create`; else only looking: nothing is made,
    /// and a tree or guard file that does not exist yet is passed over).
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
        // First what lies above, where nothing is made: a run refused here has touched nothing
        // (not even a `.ferry` inside a tree another run is filling).
        let mine: std::collections::BTreeSet<&Path> = dirs.iter().map(PathBuf::as_path).collect();
        let file_dirs: std::collections::BTreeSet<&Path> =
            files.iter().map(|f| fsio::parent_of(f)).collect();
        let mut above: std::collections::BTreeSet<&Path> = Default::default();
        for d in dirs {
            above.extend(d.ancestors().skip(1));
        }
        for d in &file_dirs {
            above.extend(d.ancestors().skip(1));
        }
        for d in above {
            if d.as_os_str().is_empty() || mine.contains(d) {
                continue;
            }
            // A guard removed meanwhile guards nothing; one made again since is looked at.
            for _ in 0..RETRIES {
                let Some(g) = existing_guard(d) else { break };
                let zero = Range { start: 0, len: 1 };
                match lock_guard(&g, Kind::Shared, zero)? {
                    Got::Held => {
                        lock.guards.push(g);
                        break;
                    }
                    Got::Gone => continue,
                    Got::Busy => return Err(busy(d)),
                }
            }
            let f = dir_flock(d, false)?;
            lock.flocks.extend(f);
        }
        for d in &file_dirs {
            if !mine.contains(d) {
                let f = dir_flock(d, false)?;
                lock.flocks.extend(f);
            }
        }
        for d in dirs {
            if create {
                fsio::create_dirs(d)?;
            } else if !d.is_dir() {
                continue;
            }
            let f = dir_flock(d, true)?;
            lock.flocks.extend(f);
            match take_guard(d, Kind::Exclusive, Range::ALL, create)? {
                Taken::Held(g) => lock.guards.push(g),
                Taken::Busy => return Err(busy(d)),
                Taken::NoGuard => {}
            }
        }
        // Single files by directory: one guard file each, one byte per name.
        let mut by_dir: std::collections::BTreeMap<&Path, Vec<&PathBuf>> = Default::default();
        for f in files {
            by_dir.entry(fsio::parent_of(f)).or_default().push(f);
        }
        for (d, names) in by_dir {
            if create {
                fsio::create_dirs(d)?;
            } else if !d.is_dir() {
                continue;
            }
            let byte = |f: &Path| Range {
                start: name_byte(f.file_name().map(|n| n.as_bytes()).unwrap_or_default()),
                len: 1,
            };
            let g = match take_guard(d, Kind::Exclusive, byte(names[0]), create)? {
                Taken::Held(g) => g,
                Taken::Busy => return Err(busy(names[0])),
                Taken::NoGuard => continue,
            };
            for f in &names[1..] {
                match lock_guard(&g, Kind::Exclusive, byte(f))? {
                    Got::Held => {}
                    Got::Busy => return Err(busy(f)),
                    // Removed by hand under a held lock: this run holds what it can.
                    Got::Gone => log::warn!("'{}' was removed while held", g.path.display()),
                }
            }
            lock.guards.push(g);
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

    /// Runs of other names in one directory, starting and ending all the time (SCR's ranks
    /// flushing into one `ckpt.N/`): none is ever refused because another was just releasing
    /// (and removing) the guard file, and the last one leaves no guard file behind.
    #[test]
    fn runs_of_other_names_in_one_directory_never_refuse_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ckpt");
        std::fs::create_dir_all(&d).unwrap();
        let runs: Vec<_> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|n| {
                let f = d.join(n);
                std::thread::spawn(move || {
                    for _ in 0..150 {
                        let l = DestLock::acquire_with(&[], std::slice::from_ref(&f), true);
                        drop(l.unwrap());
                    }
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap();
        }
        assert!(!d.join(".ferry").join(GUARD).exists());
        // And a tree into that directory, once they are gone, takes it whole.
        drop(DestLock::acquire(std::slice::from_ref(&d), false).unwrap());
        let held = DestLock::acquire_with(&[], &[d.join("a")], true).unwrap();
        let e = DestLock::acquire(std::slice::from_ref(&d), false).unwrap_err();
        assert!(e.to_string().contains("another ferry transfer"), "{e}");
        drop(held);
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
