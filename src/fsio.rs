//! Durability: the only module that calls `fsync`, `fdatasync`, `rename` or makes a file's
//! existence durable.
//!
//! The recipe for everything ferry must not lose is the classic one: write under a temporary name,
//! fsync the data, rename to the final name, fsync the parent directory. This module offers that
//! recipe ([`write_atomic`]) and its pieces ([`sync_data`], [`rename`], [`fsync_dir`]) to the
//! state files, and through [`Tree`] — directory handles that never follow a symlink below a
//! transfer's anchor, with `syncfs` for many small files at once — to the engine, the journal
//! and the commit; no other module may rename or sync. A failed fsync is
//! returned as an error and never retried: the caller stops and resume redoes the work.
//! Nothing here runs in `Drop`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{IoContext, Result};
use crate::failpoints;

mod tree;
pub use tree::{foreign_temp, key_of, linked_dir, FileKey, Meta, Tree};

static SEQ: AtomicU64 = AtomicU64::new(0);
static SYNC_ENABLED: AtomicBool = AtomicBool::new(true);

/// Switch every fsync, directory fsync and syncfs of this process off (`false`) or back on. Only
/// for measuring what durability costs (`benches/e2e.rs`): with them off nothing ferry writes
/// survives a crash as promised. ferry itself never calls this.
#[doc(hidden)]
pub fn set_sync_enabled(on: bool) {
    SYNC_ENABLED.store(on, Ordering::SeqCst);
}

fn syncs() -> bool {
    SYNC_ENABLED.load(Ordering::Relaxed)
}

/// Make a file's data (and its size) durable.
pub fn sync_data(f: &File, path: &Path) -> Result<()> {
    failpoints::io("fsio::sync_data", path)?;
    if syncs() {
        f.sync_data().ctx("fsync", path)?;
    }
    #[cfg(feature = "failpoints")]
    crate::powerloss::file_synced(path);
    Ok(())
}

/// Start writing `len` bytes at `offset` of `f` back to the device, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Not a durability step — only [`sync_data`] or
/// [`Tree::sync_fs`] make data durable — but it keeps a large unit's dirty pages flowing to the disk
/// while the next buffers are copied, so its fsync finds little left to do.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
    if !syncs() {
        return;
    }
    // SAFETY: sync_file_range(2) on an open descriptor we own; it only schedules I/O.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(f),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Make a file's data and metadata (mode, times) durable.
pub fn sync_all(f: &File, path: &Path) -> Result<()> {
    failpoints::io("fsio::sync_all", path)?;
    if syncs() {
        f.sync_all().ctx("fsync", path)?;
    }
    #[cfg(feature = "failpoints")]
    crate::powerloss::file_synced(path);
    Ok(())
}

/// Make a directory's entries durable (new names, renames, removals inside it).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    failpoints::io("fsio::fsync_dir", dir)?;
    let d = File::open(dir).ctx("open-dir", dir)?;
    fsync_dir_fd(d.as_fd(), dir)
}

/// Make the entries of the open directory `fd` (named `dir`) durable; the caller has passed the
/// `fsio::fsync_dir` failpoint.
fn fsync_dir_fd(fd: std::os::fd::BorrowedFd<'_>, dir: &Path) -> Result<()> {
    if syncs() {
        rustix::fs::fsync(fd)
            .map_err(io::Error::from)
            .ctx("fsync-dir", dir)?;
    }
    #[cfg(feature = "failpoints")]
    crate::powerloss::dir_synced(dir);
    Ok(())
}

/// Rename `from` to `to` (atomic on POSIX). The caller fsyncs the parent directory, in a batch.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    failpoints::io("fsio::rename", to)?;
    #[cfg(feature = "failpoints")]
    let _model = crate::powerloss::op_guard();
    fs::rename(from, to).ctx("rename", to)
}

/// Write `bytes` to `path` atomically and durably: after this returns the file holds exactly
/// `bytes` and survives a crash; before, it holds its old content (or does not exist).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, &mut |w| w.write_all(bytes))
}

/// [`write_atomic`] for content produced by `fill` (through a buffer), so a large record need
/// not be held in memory whole.
pub fn write_atomic_with(
    path: &Path,
    fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let tmp = sibling_tmp(path);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .ctx("create", &tmp)?;
    let res = (|| {
        let mut w = io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w).ctx("write", &tmp)?;
        let f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", &tmp)?;
        sync_all(&f, &tmp)?;
        rename(&tmp, path)?;
        fsync_dir(parent_of(path))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// A temporary name beside `path`, unique within this process.
fn sibling_tmp(path: &Path) -> PathBuf {
    let mut name: OsString = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Remove leftovers of interrupted [`write_atomic`] calls in `dir` (names `*.tmp-<pid>-<n>`).
/// One that may still be in use — its process is alive here and it is younger than a minute
/// (another process, e.g. `ferry cancel`, writing a record at this moment) — is left alone.
pub fn clean_atomic_leftovers(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).ctx("read-dir", dir),
    };
    for ent in rd {
        let ent = ent.ctx("read-dir", dir)?;
        let name = ent.file_name().into_vec();
        if is_atomic_tmp_name(&name) && !maybe_in_use(&name, &ent.path()) {
            remove_file(&ent.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether the writer of an atomic-write leftover may still be writing it (see
/// [`clean_atomic_leftovers`]).
fn maybe_in_use(name: &[u8], path: &Path) -> bool {
    let s = String::from_utf8_lossy(name);
    let pid = s
        .rfind(".tmp-")
        .and_then(|at| s[at + 5..].split('-').next()?.parse::<i32>().ok());
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let alive = pid.is_some_and(|p| p > 0 && unsafe { libc::kill(p, 0) } == 0);
    let young = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(60));
    alive && young
}

fn is_atomic_tmp_name(name: &[u8]) -> bool {
    let s = String::from_utf8_lossy(name);
    match s.rfind(".tmp-") {
        Some(at) => {
            let tail = &s[at + 5..];
            let mut parts = tail.split('-');
            matches!((parts.next(), parts.next(), parts.next()),
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit()))
        }
        None => false,
    }
}

/// Create `dir` and any missing ancestors, then make the new names durable with one fsync per
/// parent directory. Returns the directories this call created. (Below a transfer's anchors,
/// directories are made through [`Tree::create_dirs`] instead.)
pub fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || is_dir_or_link_to_dir(d)? {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    let mut parents = std::collections::BTreeSet::new();
    let mut created = Vec::new();
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {
                parents.insert(parent_of(d).to_path_buf());
                created.push(d.to_path_buf());
            }
            // Another rank made it first; it makes it durable too.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx("mkdir", d),
        }
    }
    // Deepest first: a parent's own entry is made durable by its parent's fsync, later.
    for p in parents.iter().rev() {
        fsync_dir(p)?;
    }
    Ok(created)
}

/// Whether `d` is a directory (or a symlink to one); an existing non-directory is `ENOTDIR`.
fn is_dir_or_link_to_dir(d: &Path) -> Result<bool> {
    match fs::symlink_metadata(d) {
        Ok(m) if m.is_dir() => Ok(true),
        Ok(m) if m.file_type().is_symlink() => match fs::metadata(d) {
            Ok(t) if t.is_dir() => Ok(true),
            _ => Err(io::Error::from_raw_os_error(libc::ENOTDIR)).ctx("mkdir", d),
        },
        Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)).ctx("mkdir", d),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).ctx("stat", d),
    }
}

/// Remove a file or symlink; a missing one is not an error. Returns whether something was removed.
/// The caller fsyncs the parent directory when the removal must be durable.
pub fn remove_file(path: &Path) -> Result<bool> {
    #[cfg(feature = "failpoints")]
    let _model = crate::powerloss::op_guard();
    #[cfg(feature = "failpoints")]
    crate::powerloss::before_unlink(path);
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).ctx("unlink", path),
    }
}

/// A modification time `mtime` (seconds, nanoseconds) to set, the access time left alone.
fn timestamps(mtime: (i64, u32)) -> rustix::fs::Timestamps {
    use rustix::fs::{Timespec, UTIME_OMIT};
    rustix::fs::Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1 as _,
        },
    }
}

/// Set the modification time of `path` itself (a symlink's own, not its target's); the access
/// time is left alone.
pub fn set_times_nofollow(path: &Path, mtime: (i64, u32)) -> Result<()> {
    use rustix::fs::{AtFlags, CWD};
    rustix::fs::utimensat(CWD, path, &timestamps(mtime), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io::Error::from)
        .ctx("utimes", path)
}

/// Ask the kernel to drop cached pages of `f` so a re-read comes from the device.
pub fn drop_cache(f: &File) {
    let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_whole_and_leaves_no_tmp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rec");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_atomic_writes_are_recognised() {
        let d = tempfile::tempdir().unwrap();
        // A pid above any pid_max: its writer is gone.
        fs::write(d.path().join("commit.tmp-99999999-4"), b"x").unwrap();
        fs::write(d.path().join("data.tmp-x"), b"keep").unwrap();
        fs::write(d.path().join("plan"), b"keep").unwrap();
        // A live process's fresh one may be mid-write (a cancel request while a run starts).
        let mine = format!("cancel-request.tmp-{}-1", std::process::id());
        fs::write(d.path().join(&mine), b"keep").unwrap();
        assert_eq!(clean_atomic_leftovers(d.path()).unwrap(), 1);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 3);
        assert!(d.path().join(mine).exists());
    }

    #[test]
    fn create_dirs_reports_what_it_made() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        let made = create_dirs(&deep).unwrap();
        assert_eq!(made.len(), 3);
        assert!(create_dirs(&deep).unwrap().is_empty());
        fs::write(d.path().join("f"), b"").unwrap();
        let err = create_dirs(&d.path().join("f/g")).unwrap_err();
        assert_eq!(err.class, crate::ErrorClass::Usage);
    }
}
