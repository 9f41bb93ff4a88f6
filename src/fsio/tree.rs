//! Writing inside a transfer's trees through directory handles, never through a symlink.
//!
//! Every name ferry creates, renames, changes or removes in a destination tree (and, with
//! `--delete-source`, in a source tree) is reached from its *anchor* — the directory the user
//! named (the destination root, or the directory holding a single file) — one component at a
//! time, each directory opened with `O_NOFOLLOW | O_DIRECTORY`, and the final operation is made
//! relative to the handle of its parent (`openat`, `renameat`, `unlinkat`, `fchmod` on an open
//! descriptor...). A symlink planted at a directory below the anchor, before the run or while it
//! runs, is met as such and refused with `permission`, naming the path; it is never followed.
//! The anchor itself may be reached through links: the user chose it.
//!
//! Each entry of the plan knows its `depth`: how many components of its path lie below its
//! anchor (a root directory 0, a file in it 1, ...). Handles of parent directories are cached
//! while one phase runs; an operation whose cached handle has gone stale (the directory was
//! removed or renamed) is tried once more from the anchor, which meets a link put in its place.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::{fsync_dir_fd, sync_all, syncs, timestamps};
use crate::error::{Error, ErrorClass, IoContext, Result};
use crate::failpoints;
use crate::preserve::Kept;

/// How many directory handles a [`Tree`] keeps open.
const CACHE_MAX: usize = 256;

/// What a file or directory gets when it is finished: its mode and modification time always,
/// with `--preserve` also what [`Kept`] holds.
pub struct Meta<'a> {
    /// Permission bits (set last, after an owner change that would clear set-id bits).
    pub mode: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Owner, group and extended attributes to set first (`--preserve`).
    pub kept: Option<&'a Kept>,
    /// A regular file's source owner and group, if known: its set-user-ID (set-group-ID) bit is
    /// kept only if the copy has the same owner (group); unknown, both are dropped.
    pub owner: Option<(u32, u32)>,
    /// Whether the set-id rule applies (regular files).
    pub file: bool,
}

/// Directory handles of one phase of a run (see the module documentation).
#[derive(Default)]
pub struct Tree {
    cache: Mutex<HashMap<PathBuf, Arc<OwnedFd>>>,
}

/// The error for a directory below an anchor that is a symbolic link.
pub fn linked_dir(path: &Path) -> Error {
    let to = std::fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_default();
    Error::new(
        ErrorClass::Permission,
        format!(
            "this directory inside the transfer's tree is a symbolic link (to '{to}'); ferry \
             never writes through one: remove it, or copy to another place"
        ),
    )
    .with_path(path)
    .with_op("open-dir")
}

fn split(path: &Path) -> Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) if !p.as_os_str().is_empty() => Ok((p, n)),
        _ => Err(Error::internal("a path without a parent directory in the plan").with_path(path)),
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// Whether `e` says an operation met a name that is not where (or what) it was: the handle
/// may be stale.
fn maybe_stale(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

impl Tree {
    /// A tree with no handle open yet.
    pub fn new() -> Tree {
        Tree::default()
    }

    /// The directory `dir`, whose last `below` components lie below its anchor. `fresh`
    /// ignores cached handles.
    fn open_dir(&self, dir: &Path, below: usize, fresh: bool) -> Result<Arc<OwnedFd>> {
        if !fresh {
            if let Some(fd) = self.cached(dir) {
                return Ok(fd);
            }
        }
        let mut anchor = dir;
        for _ in 0..below {
            anchor = anchor.parent().ok_or_else(|| {
                Error::internal("a plan entry deeper than its path").with_path(dir)
            })?;
        }
        let mut fd = Arc::new(
            rustix::fs::open(anchor, dir_flags(), Mode::empty())
                .map_err(io::Error::from)
                .ctx("open-dir", anchor)?,
        );
        let mut cur = anchor.to_path_buf();
        let rest = dir.strip_prefix(anchor).unwrap_or(Path::new(""));
        for name in rest.iter() {
            cur.push(name);
            fd = Arc::new(open_below(&fd, name, &cur)?);
        }
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(dir.to_path_buf(), fd.clone());
        Ok(fd)
    }

    /// [`Tree::open_dir`], `None` if the directory (or one above it) does not exist.
    fn existing_dir(&self, dir: &Path, below: usize) -> Result<Option<Arc<OwnedFd>>> {
        match self.open_dir(dir, below, false) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.class == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn cached(&self, dir: &Path) -> Option<Arc<OwnedFd>> {
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.get(dir).cloned()
    }

    /// Run `f` with the handle of `path`'s parent and `path`'s name (`path` lies `depth`
    /// components below its anchor). A failure that may come from a stale handle is tried once
    /// more from the anchor.
    fn at<T>(
        &self,
        path: &Path,
        depth: u16,
        op: &str,
        f: impl Fn(BorrowedFd<'_>, &OsStr) -> io::Result<T>,
    ) -> Result<T> {
        let (parent, name) = split(path)?;
        let below = depth.saturating_sub(1) as usize;
        let fd = self.open_dir(parent, below, false)?;
        match f(fd.as_fd(), name) {
            Err(e) if maybe_stale(&e) => {
                let fd = self.open_dir(parent, below, true)?;
                f(fd.as_fd(), name).ctx(op, path)
            }
            r => r.ctx(op, path),
        }
    }

    /// The directory `dir` itself (`depth` components below its anchor), opened without
    /// following a link unless it is the anchor.
    pub fn dir(&self, dir: &Path, depth: u16) -> Result<Arc<OwnedFd>> {
        self.open_dir(dir, depth as usize, true)
    }

    /// Create every directory of `dirs` (with its depth) that is missing, and the anchors'
    /// missing ancestors (by path), then make the new names durable, one fsync per parent.
    /// Directories made below an anchor are private (0700) until their final mode is set.
    pub fn create_dirs<'a>(
        &self,
        dirs: impl IntoIterator<Item = (&'a Path, u16)>,
    ) -> Result<usize> {
        let mut parents: HashMap<PathBuf, Arc<OwnedFd>> = HashMap::new();
        let mut made = 0;
        for (dir, depth) in dirs {
            let mut anchor = dir;
            for _ in 0..depth {
                anchor = super::parent_of(anchor);
            }
            made += super::create_dirs(anchor)?.len();
            let rest = dir.strip_prefix(anchor).unwrap_or(Path::new(""));
            if rest.as_os_str().is_empty() {
                continue;
            }
            let mut cur = anchor.to_path_buf();
            let mut fd = Arc::new(
                rustix::fs::open(anchor, dir_flags(), Mode::empty())
                    .map_err(io::Error::from)
                    .ctx("open-dir", anchor)?,
            );
            for name in rest.iter() {
                let parent = cur.clone();
                cur.push(name);
                match rustix::fs::mkdirat(&*fd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {
                        made += 1;
                        parents.insert(parent, fd.clone());
                    }
                    // Made before, or by another rank at this moment (it makes it durable too).
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(Error::io("mkdir", &cur, e.into())),
                }
                fd = Arc::new(open_below(&fd, name, &cur)?);
            }
        }
        for (p, fd) in parents {
            failpoints::io("fsio::fsync_dir", &p)?;
            fsync_dir_fd(fd.as_fd(), &p)?;
        }
        Ok(made)
    }

    /// Create the temporary file `tmp` (mode 0600, `O_EXCL`, never through a link). A name that
    /// is taken already holds a file ferry did not make in this attempt: it is left untouched
    /// and the run stops with `integrity` (see [`foreign_temp`]).
    pub fn create_temp(&self, tmp: &Path, depth: u16) -> Result<File> {
        let fl = OFlags::RDWR
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NONBLOCK
            | OFlags::CREATE
            | OFlags::EXCL;
        match self.at(tmp, depth, "create", |d, n| {
            Ok(File::from(rustix::fs::openat(d, n, fl, Mode::from(0o600))?))
        }) {
            Err(e) if e.errno == Some(libc::EEXIST) => {
                let what = self.stat(tmp, depth).ok().flatten();
                Err(foreign_temp(tmp, what.as_ref()))
            }
            r => r,
        }
    }

    /// Open the existing temporary file (or, once renamed, final name) `tmp` as the very file
    /// `expect` names (hashed device, inode), for reading and writing. Anything else at that name
    /// is left untouched and refused (see [`foreign_temp`]); a missing name is `not-found`.
    pub fn open_temp(&self, tmp: &Path, depth: u16, expect: (u32, u64)) -> Result<(File, FileKey)> {
        self.open_ident(tmp, depth, expect, OFlags::RDWR)
    }

    /// [`Tree::open_temp`] for reading only (`--verify`, HDF5 checks: a final name may be
    /// read-only).
    pub fn open_temp_read(&self, tmp: &Path, depth: u16, expect: (u32, u64)) -> Result<File> {
        Ok(self.open_ident(tmp, depth, expect, OFlags::RDONLY)?.0)
    }

    fn open_ident(
        &self,
        tmp: &Path,
        depth: u16,
        expect: (u32, u64),
        mode: OFlags,
    ) -> Result<(File, FileKey)> {
        let fl = mode | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let f = self.at(tmp, depth, "open", |d, n| {
            Ok(File::from(rustix::fs::openat(d, n, fl, Mode::empty())?))
        });
        let f = match f {
            Ok(f) => f,
            // A symlink at the name (ELOOP), or something ferry may not open, is not its file.
            Err(e)
                if matches!(
                    e.errno,
                    Some(libc::ELOOP) | Some(libc::EACCES) | Some(libc::ENXIO)
                ) =>
            {
                let what = self.stat(tmp, depth).ok().flatten();
                return Err(foreign_temp(tmp, what.as_ref()));
            }
            Err(e) => return Err(e),
        };
        let k = key_of(f.as_fd(), tmp)?;
        if k.regular && k.key == expect {
            return Ok((f, k));
        }
        let st = rustix::fs::fstat(&f).ok();
        Err(foreign_temp(tmp, st.as_ref()))
    }

    /// Open the regular file `path` for reading, not following a symlink at it or at any
    /// directory below its anchor.
    pub fn open_read(&self, path: &Path, depth: u16) -> Result<File> {
        let fl = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        self.at(path, depth, "open", |d, n| {
            Ok(File::from(rustix::fs::openat(d, n, fl, Mode::empty())?))
        })
    }

    /// `lstat` of `path`; `None` if it does not exist.
    pub fn stat(&self, path: &Path, depth: u16) -> Result<Option<rustix::fs::Stat>> {
        match self.at(path, depth, "stat", |d, n| {
            Ok(rustix::fs::statat(d, n, AtFlags::SYMLINK_NOFOLLOW)?)
        }) {
            Ok(st) => Ok(Some(st)),
            Err(e) if e.class == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The [`FileKey`] of `path` itself (a link's own); `None` if it does not exist.
    pub fn key(&self, path: &Path, depth: u16) -> Result<Option<FileKey>> {
        let r = self.at(path, depth, "stat", |d, n| {
            match rustix::fs::statx(d, n, AtFlags::SYMLINK_NOFOLLOW, want()) {
                Ok(x) => Ok(key_of_statx(&x)),
                Err(Errno::NOSYS) | Err(Errno::INVAL) => Ok(key_of_stat(&rustix::fs::statat(
                    d,
                    n,
                    AtFlags::SYMLINK_NOFOLLOW,
                )?)),
                Err(e) => Err(e.into()),
            }
        });
        match r {
            Ok(k) => Ok(Some(k)),
            Err(e) if e.class == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The target of the symlink `path`; `None` if it is missing or not a symlink.
    pub fn read_link(&self, path: &Path, depth: u16) -> Result<Option<PathBuf>> {
        match self.at(path, depth, "readlink", |d, n| {
            Ok(rustix::fs::readlinkat(d, n, Vec::new())?)
        }) {
            Ok(t) => Ok(Some(PathBuf::from(OsString::from_vec(t.into_bytes())))),
            Err(e) if matches!(e.errno, Some(libc::ENOENT) | Some(libc::EINVAL)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Rename `from` to `to`, both in one directory (`to` replaced atomically, a symlink at `to`
    /// replaced, never followed). The caller fsyncs the directory, in a batch.
    pub fn rename(&self, from: &Path, to: &Path, depth: u16) -> Result<()> {
        failpoints::io("fsio::rename", to)?;
        #[cfg(feature = "failpoints")]
        let _model = crate::powerloss::op_guard();
        let from_name = from.file_name().unwrap_or_default();
        self.at(to, depth, "rename", |d, n| {
            Ok(rustix::fs::renameat(d, from_name, d, n)?)
        })
    }

    /// Remove the temporary file `path` only if it is the very file `expect` names (hashed
    /// device, inode): anything else there is left alone. Returns whether it was removed.
    pub fn remove_temp(&self, path: &Path, depth: u16, expect: (u32, u64)) -> Result<bool> {
        match self.key(path, depth)? {
            Some(k) if k.regular && k.key == expect => self.remove_file(path, depth),
            _ => Ok(false),
        }
    }

    /// Remove a file or symlink; a missing one is not an error. Returns whether something was
    /// removed. The caller fsyncs the directory when the removal must be durable.
    pub fn remove_file(&self, path: &Path, depth: u16) -> Result<bool> {
        #[cfg(feature = "failpoints")]
        let _model = crate::powerloss::op_guard();
        #[cfg(feature = "failpoints")]
        crate::powerloss::before_unlink(path);
        let (parent, name) = split(path)?;
        let Some(fd) = self.existing_dir(parent, depth.saturating_sub(1) as usize)? else {
            return Ok(false);
        };
        match rustix::fs::unlinkat(&*fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(Error::io("unlink", path, e.into())),
        }
    }

    /// Remove the empty directory `path`. `Ok(false)` if it is missing; an error with
    /// `ENOTEMPTY` if it holds something.
    pub fn remove_dir(&self, path: &Path, depth: u16) -> Result<bool> {
        let (parent, name) = split(path)?;
        let Some(fd) = self.existing_dir(parent, depth.saturating_sub(1) as usize)? else {
            return Ok(false);
        };
        match rustix::fs::unlinkat(&*fd, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(Error::io("rmdir", path, e.into())),
        }
    }

    /// Make the entries of directory `dir` (`depth` below its anchor) durable.
    pub fn fsync_dir(&self, dir: &Path, depth: u16) -> Result<()> {
        failpoints::io("fsio::fsync_dir", dir)?;
        let fd = self.open_dir(dir, depth as usize, false)?;
        fsync_dir_fd(fd.as_fd(), dir)
    }

    /// Make everything written to the file system holding directory `dir` durable: file data,
    /// new names, renames (`syncfs(2)`; since Linux 5.8 it reports writeback errors). One call
    /// replaces an fsync per file when a rank has written many small files; like an fsync, a
    /// failure is never retried and trusted.
    pub fn sync_fs(&self, dir: &Path, depth: u16) -> Result<()> {
        failpoints::io("fsio::syncfs", dir)?;
        let fd = self.open_dir(dir, depth as usize, false)?;
        if syncs() {
            rustix::fs::syncfs(&*fd)
                .map_err(io::Error::from)
                .ctx("fsync", dir)?;
        }
        #[cfg(feature = "failpoints")]
        crate::powerloss::fs_synced();
        Ok(())
    }

    /// Open the finished temporary file `tmp` to give it its final metadata ([`Tree::finish`]):
    /// the file and its key if it is the very file `expect` names; `None` if there is nothing
    /// at `tmp` (renamed by an earlier run); anything else is refused (see [`foreign_temp`]).
    pub fn open_finished(
        &self,
        tmp: &Path,
        depth: u16,
        expect: (u32, u64),
    ) -> Result<Option<(File, FileKey)>> {
        // Read-only: enough for fchmod, fchown, futimens and fsync, and it opens ferry's own
        // temporary after its final mode (0444, say) was set, for a user who is not root.
        match self.open_ident(tmp, depth, expect, OFlags::RDONLY) {
            Ok(x) => Ok(Some(x)),
            Err(e) if e.class == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Give the finished temporary file `f` (named `tmp`, opened by [`Tree::open_finished`])
    /// what `meta` says — with `--preserve` its owner and extended attributes first, then its
    /// mode and time — and with `sync` make it durable; without, the caller makes a batch
    /// durable with `sync_fs` before the renames. Returns one warning, naming `final_name`, for
    /// each thing `--preserve` could not keep.
    pub fn finish(
        f: &File,
        tmp: &Path,
        final_name: &Path,
        meta: &Meta,
        sync: bool,
    ) -> Result<Vec<Error>> {
        let warnings = set_meta(f.as_fd(), tmp, final_name, meta)?;
        if sync {
            sync_all(f, tmp)?;
        }
        Ok(warnings)
    }

    /// Give directory `dir` what `meta` says and make it durable (its contents are in place).
    pub fn finish_dir(&self, dir: &Path, depth: u16, meta: &Meta) -> Result<Vec<Error>> {
        let fd = self.dir(dir, depth)?;
        let warnings = set_meta(fd.as_fd(), dir, dir, meta)?;
        failpoints::io("fsio::fsync_dir", dir)?;
        fsync_dir_fd(fd.as_fd(), dir)?;
        Ok(warnings)
    }

    /// Owner and group of the source `path` (`depth` below its anchor; a symlink's own with
    /// `link`) and with `xattrs` its extended attributes, read through directory handles from
    /// the very inode `ino` that was planned (0: not known). Returns them with warnings for
    /// attributes that could not be read; an error if the source is gone, reached through a
    /// link, or another file now.
    pub fn read_source(
        &self,
        path: &Path,
        depth: u16,
        link: bool,
        xattrs: bool,
        ino: u64,
    ) -> Result<(Kept, Vec<Error>)> {
        let (st, fd) = if link {
            let st = self.at(path, depth, "stat", |d, n| {
                Ok(rustix::fs::statat(d, n, AtFlags::SYMLINK_NOFOLLOW)?)
            })?;
            (st, None)
        } else {
            let fl = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
            let fd = self.at(path, depth, "open", |d, n| {
                Ok(rustix::fs::openat(d, n, fl, Mode::empty())?)
            })?;
            let st = rustix::fs::fstat(&fd)
                .map_err(io::Error::from)
                .ctx("stat", path)?;
            (st, Some(fd))
        };
        if ino != 0 && st.st_ino != ino {
            return Err(Error::integrity(
                path,
                "the source is not the file that was copied any more (another inode)",
            )
            .with_op("stat"));
        }
        let fd = fd.as_ref().filter(|_| xattrs).map(|f| f.as_fd());
        Ok(Kept::of(fd, &st, path))
    }

    /// Make the symlink `path` → `target` with modification time `mtime` and, with `kept`, the
    /// owner and group kept. Returns the warnings (naming `final_name`) of what could not be kept.
    pub fn symlink(
        &self,
        target: &Path,
        path: &Path,
        final_name: &Path,
        depth: u16,
        mtime: (i64, u32),
        kept: Option<&Kept>,
    ) -> Result<Vec<Error>> {
        self.at(path, depth, "symlink", |d, n| {
            Ok(rustix::fs::symlinkat(target, d, n)?)
        })?;
        let mut warnings = Vec::new();
        if let Some(k) = kept {
            warnings.extend(self.at(path, depth, "chown", |d, n| {
                Ok(k.chown_with(final_name, |uid, gid| {
                    rustix::fs::chownat(d, n, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                }))
            })?);
        }
        let ts = timestamps(mtime);
        self.at(path, depth, "utimes", |d, n| {
            Ok(rustix::fs::utimensat(d, n, &ts, AtFlags::SYMLINK_NOFOLLOW)?)
        })?;
        Ok(warnings)
    }
}

/// What tells one file from another beyond its name: its device and birth time (hashed) and its
/// inode, with its type and size.
#[derive(Debug, Clone, Copy)]
pub struct FileKey {
    /// (hash of device and birth time, inode): what the journal records.
    pub key: (u32, u64),
    /// Its device number.
    pub dev: u64,
    /// A regular file.
    pub regular: bool,
    /// Its size.
    pub size: u64,
}

fn key_of_statx(x: &rustix::fs::Statx) -> FileKey {
    let dev = rustix::fs::makedev(x.stx_dev_major, x.stx_dev_minor);
    let born = (x.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0)
        .then_some((x.stx_btime.tv_sec, x.stx_btime.tv_nsec));
    FileKey {
        key: (crate::journal::dev_hash(born), x.stx_ino),
        dev,
        regular: rustix::fs::FileType::from_raw_mode(x.stx_mode as u32)
            == rustix::fs::FileType::RegularFile,
        size: x.stx_size,
    }
}

fn key_of_stat(st: &rustix::fs::Stat) -> FileKey {
    FileKey {
        key: (crate::journal::dev_hash(None), st.st_ino),
        dev: st.st_dev,
        regular: is_regular(st),
        size: st.st_size as u64,
    }
}

fn want() -> rustix::fs::StatxFlags {
    rustix::fs::StatxFlags::BASIC_STATS | rustix::fs::StatxFlags::BTIME
}

/// The [`FileKey`] of an open file (`statx`; `fstat` where the kernel has no `statx`).
pub fn key_of(fd: BorrowedFd<'_>, path: &Path) -> Result<FileKey> {
    match rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, want()) {
        Ok(x) => Ok(key_of_statx(&x)),
        Err(Errno::NOSYS) | Err(Errno::INVAL) => rustix::fs::fstat(fd)
            .map(|st| key_of_stat(&st))
            .map_err(io::Error::from)
            .ctx("stat", path),
        Err(e) => Err(Error::io("stat", path, e.into())),
    }
}

fn is_regular(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
}

/// The error for a name where ferry expected its own temporary file (or, after a rename, its
/// final file) and found another one: a file of someone else, a hard link, a symlink, a FIFO, a
/// file of another transfer or of an attempt the journals do not vouch for. It is never written,
/// trusted, renamed or removed.
pub fn foreign_temp(path: &Path, st: Option<&rustix::fs::Stat>) -> Error {
    let what = match st {
        Some(st) => format!(
            "a {} of uid {} with {} link(s), inode {},",
            match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                rustix::fs::FileType::RegularFile => "file",
                rustix::fs::FileType::Directory => "directory",
                rustix::fs::FileType::Symlink => "symlink",
                rustix::fs::FileType::Fifo => "FIFO",
                rustix::fs::FileType::Socket => "socket",
                _ => "device",
            },
            st.st_uid,
            st.st_nlink,
            st.st_ino
        ),
        None => "something".to_string(),
    };
    Error::integrity(
        path,
        format!(
            "{what} is at this name, and it is not the file ferry made there (the journal \
             records another inode, or none); ferry never writes, trusts, renames or removes it: \
             move it away, then `ferry resume` (which copies that file again)"
        ),
    )
    .with_op("open")
}

/// Open `name` in directory `fd` as a directory without following a symlink (`path` names it
/// in errors).
fn open_below(fd: &OwnedFd, name: &OsStr, path: &Path) -> Result<OwnedFd> {
    match rustix::fs::openat(fd, name, dir_flags() | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(f) => Ok(f),
        Err(e) => {
            let link = rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink
            });
            if link {
                Err(linked_dir(path))
            } else {
                Err(Error::io("open-dir", path, e.into()))
            }
        }
    }
}

/// Owner, group and extended attributes (with `--preserve`; warnings name `shown`), then mode,
/// then time, on the open file or directory `path`.
fn set_meta(fd: BorrowedFd<'_>, path: &Path, shown: &Path, meta: &Meta) -> Result<Vec<Error>> {
    let mut warnings = Vec::new();
    if let Some(k) = meta.kept {
        warnings.extend(k.chown_with(shown, |uid, gid| rustix::fs::fchown(fd, uid, gid)));
        warnings.extend(k.set_xattrs(fd, shown));
    }
    let mut mode = meta.mode & 0o7777;
    if meta.file && mode & 0o6000 != 0 {
        // A set-id bit belongs with its owner: a copy owned by someone else must not run as them.
        let st = rustix::fs::fstat(fd)
            .map_err(io::Error::from)
            .ctx("stat", path)?;
        let drop = match meta.owner {
            Some((uid, gid)) => {
                let u = if st.st_uid != uid { 0o4000 } else { 0 };
                let g = if st.st_gid != gid { 0o2000 } else { 0 };
                (u | g) & mode
            }
            None => mode & 0o6000,
        };
        if drop != 0 {
            mode &= !drop;
            let owner = meta
                .owner
                .map_or("unknown".to_string(), |(u, g)| format!("{u}:{g}"));
            warnings.push(
                Error::new(
                    ErrorClass::Permission,
                    format!(
                        "set-id bits {drop:04o} dropped: the copy belongs to {}:{}, the source \
                         to {owner} (they are kept only with their owner; --preserve keeps owners \
                         where permitted)",
                        st.st_uid, st.st_gid
                    ),
                )
                .with_op("chmod")
                .with_path(shown),
            );
        }
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
        .map_err(io::Error::from)
        .ctx("chmod", path)?;
    rustix::fs::futimens(fd, &timestamps(meta.mtime))
        .map_err(io::Error::from)
        .ctx("utimes", path)?;
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn temporaries_are_made_exclusively_and_reopened_only_as_the_same_inode() {
        use std::os::unix::fs::MetadataExt;
        // (A new file that reuses the inode number of a removed one is not the same file where
        // the file system keeps birth times.)
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        let tree = Tree::new();
        let mut f = tree.create_temp(&p, 1).unwrap();
        f.write_all(b"abc").unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        let id = tree.key(&p, 1).unwrap().unwrap().key;
        assert_eq!(id.1, md.ino());
        // Taken: never opened, never removed.
        let e = tree.create_temp(&p, 1).unwrap_err();
        assert_eq!(e.class, ErrorClass::Integrity);
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        // The same inode reopens without truncating; another file at the name does not.
        tree.open_temp(&p, 1, id).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        std::fs::remove_file(&p).unwrap();
        std::fs::write(d.path().join("other"), b"xyz").unwrap();
        std::fs::hard_link(d.path().join("other"), &p).unwrap();
        let e = tree.open_temp(&p, 1, id).unwrap_err();
        assert_eq!(e.class, ErrorClass::Integrity);
        assert_eq!(std::fs::read(d.path().join("other")).unwrap(), b"xyz");
        // A FIFO at the name neither blocks nor passes.
        std::fs::remove_file(&p).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            Mode::from(0o600),
            0,
        )
        .unwrap();
        assert!(tree.open_temp(&p, 1, id).is_err());
        assert!(p.exists());
    }
}
