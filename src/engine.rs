//! The copy engine: one rank's units, copied by a pool of threads into temporary names.
//!
//! A unit is copied from its source file at its offset into the file's temporary name in the
//! destination directory (`.ferry-ID-N.tmp`, mode 0600, opened without following symlinks) —
//! large units by `copy_file_range` (falling back to read and write), their CRC32 computed piece
//! by piece from the page cache as they are copied — its data fsynced (small units: in batches,
//! by `syncfs`), and only then recorded in the rank's journal. The source is checked against the plan before and after the copy: a source that
//! changed is an `integrity` error, never a silent mix of old and new bytes. Final names are never
//! written here; the commit module renames. Cancellation is noticed between buffers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::{Error, ErrorClass, IoContext, Result};
use crate::failpoints;
use crate::fsio;
use crate::journal::{Idents, Journal, TempId, UnitDone};
use crate::plan::{Entry, Plan};
use crate::retry::RetryPolicy;
pub use crate::stop::Stopper;

/// Bytes moved per read/write call.
pub const BUF_SIZE: usize = 4 << 20;
/// Units shorter than this are not fsynced one by one: a rank makes them durable in batches, with
/// one `syncfs` of the destination file system per batch (no fsync storm for many small files).
pub const SMALL_UNIT: u64 = 8 << 20;
/// A batch of small units is synced once it holds this many bytes...
const BATCH_BYTES: u64 = 128 << 20;
/// ...or this many units...
const BATCH_UNITS: usize = 1024;
/// ...or its oldest unit is this old.
const BATCH_AGE: Duration = Duration::from_millis(500);
/// Bytes done and total, shared by every rank in this process (for the progress bar).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes durable so far (including units finished by earlier runs).
    pub done: AtomicU64,
    /// Bytes in the plan.
    pub total: AtomicU64,
}

/// The temporary name of entry `e` made by attempt `gen`: beside its final name, so the rename
/// stays in one directory, and unique to this plan (its random nonce), entry and attempt.
pub fn temp_path(plan: &Plan, e: usize, gen: u32) -> PathBuf {
    let dst = &plan.entry(e).dst;
    let name = if plan.nonce.is_empty() {
        format!(".ferry-{}-{e}-{gen}.tmp", plan.id)
    } else {
        format!(".ferry-{}-{}-{e}-{gen}.tmp", plan.id, plan.nonce)
    };
    fsio::parent_of(dst).join(name)
}

/// The temporary files a rank may write in this attempt: those the journals vouch for (and those
/// rank 0 made for files that several ranks copy), and those it creates itself. A temporary file
/// is opened only as the very inode recorded for it; a name that is taken by anything else is
/// never written, trusted or removed.
pub struct Temps {
    attempt: u32,
    known: Mutex<Idents>,
    created: Mutex<Vec<(u32, TempId)>>,
    /// Held while a file cut into several units gets its temporary file, so two copy threads
    /// of this rank never both try to make it.
    making: Mutex<()>,
}

impl Temps {
    /// The table of attempt `attempt`, knowing `known`.
    pub fn new(attempt: u32, known: Idents) -> Temps {
        Temps {
            attempt,
            known: Mutex::new(known),
            created: Mutex::new(Vec::new()),
            making: Mutex::new(()),
        }
    }

    /// Add what another rank made or the journals vouch for.
    pub fn learn(&self, idents: impl IntoIterator<Item = (u32, TempId)>) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(idents);
    }

    /// The temporary file of entry `e`, if known.
    pub fn get(&self, e: u32) -> Option<TempId> {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&e)
            .copied()
    }

    /// The temporary files this rank created in this attempt.
    pub fn created(&self) -> Vec<(u32, TempId)> {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Open entry `e`'s temporary file for writing a unit whose source is `src` (its `fstat`):
    /// the known one, checked by inode, or a new one made with `O_EXCL` under this attempt's
    /// name. Returns the file, its name, if this call made it its identity, and its device.
    fn open(
        &self,
        plan: &Plan,
        tree: &fsio::Tree,
        e: usize,
        src: &std::fs::Metadata,
        several_units: bool,
    ) -> Result<(File, PathBuf, Option<TempId>, u64)> {
        let ent = plan.entry(e);
        let _making = several_units.then(|| self.making.lock().unwrap_or_else(|p| p.into_inner()));
        let src_id = crate::journal::src_hash_of_meta(src);
        if let Some(id) = self.get(e as u32) {
            let tmp = temp_path(plan, e, id.gen);
            if id.src != src_id {
                return Err(Error::integrity(
                    &ent.src,
                    "the source changed since its temporary file was started (another inode, \
                     size, mtime or ctime); `ferry resume` copies the whole file again from the \
                     source as it is then",
                )
                .with_op("copy"));
            }
            let (f, k) = tree.open_temp(&tmp, ent.dst_depth(), id.key())?;
            return Ok((f, tmp, None, k.dev));
        }
        let tmp = temp_path(plan, e, self.attempt);
        let f = tree.create_temp(&tmp, ent.dst_depth())?;
        let k = fsio::key_of(std::os::fd::AsFd::as_fd(&f), &tmp)?;
        let id = TempId {
            gen: self.attempt,
            ino: k.key.1,
            dev: k.key.0,
            src: src_id,
        };
        self.learn([(e as u32, id)]);
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((e as u32, id));
        Ok((f, tmp, Some(id), k.dev))
    }

    /// Make entry `e`'s temporary file before the copy (rank 0, for a file several ranks copy),
    /// its source read as it is now through `src_tree`, and note it in `journal` (the caller
    /// flushes the journal before any rank writes into it).
    pub fn make(
        &self,
        plan: &Plan,
        tree: &fsio::Tree,
        src_tree: &fsio::Tree,
        journal: &Journal,
        e: usize,
    ) -> Result<TempId> {
        let ent = plan.entry(e);
        let src = src_tree.open_read(&ent.src, ent.depth)?;
        let md = src.metadata().ctx("stat", &ent.src)?;
        let (_, _, made, _) = self.open(plan, tree, e, &md, true)?;
        let id = made.ok_or_else(|| Error::internal("a temporary file made twice"))?;
        let dir = fsio::parent_of(&ent.dst);
        journal.note_created(e as u32, id, (dir, ent.dst_depth().saturating_sub(1)))?;
        Ok(id)
    }
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A pool of `threads` workers that know their rank (for logs and failpoints).
pub fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    let (rank, size) = crate::comm::thread_rank();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("r{rank}-copy{i}"))
        .start_handler(move |_| crate::comm::set_thread_rank(rank, size))
        .build()
        .map_err(|e| Error::internal(format!("cannot start copy threads: {e}")))
}

/// Everything a rank needs to copy its units.
pub struct CopyJob<'a> {
    /// The plan.
    pub plan: &'a Plan,
    /// This rank's journal.
    pub journal: &'a Journal,
    /// Signal, peer and cancel watcher.
    pub stopper: &'a Stopper,
    /// Shared progress counter.
    pub progress: &'a Progress,
    /// How transient read and write errors are retried.
    pub retry: RetryPolicy,
    /// Handles of the destination directories (temporary files are made through them).
    pub tree: &'a fsio::Tree,
    /// Handles of the source directories (sources are opened through them).
    pub src_tree: &'a fsio::Tree,
    /// The temporary files this rank may write.
    pub temps: &'a Temps,
}

/// Copy `units` with `pool`; returns the journal records of the units done. On error the journal
/// is still flushed, so finished units need not be redone, and the peers are told to stop.
pub fn copy_units(job: &CopyJob, pool: &rayon::ThreadPool, units: &[u32]) -> Result<Vec<UnitDone>> {
    let done = Mutex::new(Vec::with_capacity(units.len()));
    let batch = SyncBatch::default();
    let res = pool.install(|| {
        par_units(units, job.stopper, |u| match copy_unit(job, u)? {
            Copied::Synced(rec, made) => {
                let created_in = made.as_ref().map(|(_, _, d, depth)| (d.as_path(), *depth));
                job.journal.record(
                    rec,
                    made.as_ref().map(|(e, id, _, _)| (*e, *id)),
                    created_in,
                )?;
                job.progress.done.fetch_add(rec.len, Ordering::Relaxed);
                done.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
                Ok(())
            }
            Copied::Unsynced(rec, made, dev, tmp, depth) => {
                if let Some(recs) = batch.add(rec, made, dev, tmp, depth) {
                    done.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(batch.sync(job, recs)?);
                }
                Ok(())
            }
        })
    });
    // Small units still waiting for their sync are made durable and journaled now — also after
    // an error or a stop, so what was copied need not be redone (if that sync fails too, they are
    // simply not journaled, and the resume redoes them). Not after a failed sync: see
    // `SyncBatch::sync`.
    let pending = batch.take();
    let res = match (res, batch.sync(job, pending)) {
        (Ok(()), Ok(recs)) => {
            done.lock().unwrap_or_else(|e| e.into_inner()).extend(recs);
            Ok(())
        }
        (Ok(()), Err(e)) => Err(e),
        (Err(e), synced) => {
            if let Err(also) = synced {
                log::debug!("the units copied before the error were not journaled: {also}");
            }
            Err(e)
        }
    };
    // After a failure, the temporary files made in this attempt are journaled even where none
    // of their units is, so a resume can prove them ferry's and remove them.
    if res.is_err() {
        for (e, id) in job.temps.created() {
            let ent = job.plan.entry(e as usize);
            let dir = (fsio::parent_of(&ent.dst), ent.dst_depth().saturating_sub(1));
            if let Err(also) = job.journal.note_created(e, id, dir) {
                log::debug!("temporary files made before the error not journaled: {also}");
                break;
            }
        }
    }
    let flushed = job.journal.flush();
    res?;
    flushed?;
    Ok(done.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// A temporary file a unit's copy created: its entry, identity, directory and that directory's
/// depth below its anchor.
type Made = (u32, TempId, PathBuf, u16);

/// What copying a unit left: synced on its own (with the temporary file it created, if it did),
/// or written but waiting for its batch's `syncfs` (with the temporary file it created, the file
/// system it is on, a path there and that path's depth).
enum Copied {
    Synced(UnitDone, Option<Made>),
    Unsynced(UnitDone, Option<(u32, TempId)>, u64, PathBuf, u16),
}

/// Small units written but not yet durable.
#[derive(Default)]
struct SyncBatch {
    pending: Mutex<Pending>,
    /// The first failed sync of this run: written data may be lost, and Linux reports a writeback
    /// error once (a second `syncfs` returns 0 with the data still gone; before Linux 5.8 not
    /// even once), so after one failure nothing written before it is ever journaled.
    failed: Mutex<Option<Error>>,
}

#[derive(Default)]
struct Pending {
    recs: Vec<UnitDone>,
    created: Vec<(u32, TempId)>,
    bytes: u64,
    since: Option<Instant>,
    /// One directory (with its depth below its anchor) on each file system the units were
    /// written to (by device number).
    fs: HashMap<u64, (PathBuf, u16)>,
}

impl SyncBatch {
    /// Add a written unit; returns the batch to sync if it is full or old enough.
    fn add(
        &self,
        rec: UnitDone,
        made: Option<(u32, TempId)>,
        dev: u64,
        tmp: PathBuf,
        depth: u16,
    ) -> Option<Pending> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.recs.push(rec);
        p.created.extend(made);
        p.bytes += rec.len;
        p.since.get_or_insert_with(Instant::now);
        p.fs.entry(dev)
            .or_insert_with(|| (fsio::parent_of(&tmp).to_path_buf(), depth.saturating_sub(1)));
        let due = p.bytes >= BATCH_BYTES
            || p.recs.len() >= BATCH_UNITS
            || p.since.is_some_and(|t| t.elapsed() >= BATCH_AGE);
        due.then(|| std::mem::take(&mut *p))
    }

    /// Everything pending.
    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Make a batch durable (one `syncfs` per file system it touched: data, temporary names),
    /// then journal it; returns its records.
    fn sync(&self, job: &CopyJob, p: Pending) -> Result<Vec<UnitDone>> {
        if p.recs.is_empty() {
            return Ok(Vec::new());
        }
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &*failed {
            return Err(e.clone());
        }
        for (dir, depth) in p.fs.values() {
            if let Err(e) = job.tree.sync_fs(dir, *depth) {
                *failed = Some(e.clone());
                return Err(e);
            }
        }
        drop(failed);
        // (The temporary names are only rebuilt for the failpoints' sake.)
        #[cfg(feature = "failpoints")]
        for r in &p.recs {
            let e = job.plan.unit(r.unit).entry as usize;
            let gen = job.temps.get(e as u32).map_or(0, |id| id.gen);
            failpoints::io("copy::unit_synced", &temp_path(job.plan, e, gen))?;
        }
        job.journal.record_synced(&p.recs, &p.created)?;
        job.progress.done.fetch_add(p.bytes, Ordering::Relaxed);
        Ok(p.recs)
    }
}

/// Run `f` on every unit with the pool's threads until one fails or the run must stop. The error
/// returned is a thread's own before any echo of a peer's, and it is published to the peers, so
/// every rank stops within a poll interval instead of at the end of its share.
fn par_units(units: &[u32], stopper: &Stopper, f: impl Fn(u32) -> Result<()> + Sync) -> Result<()> {
    let own: Mutex<Option<crate::Error>> = Mutex::new(None);
    let res = units.par_iter().with_max_len(1).try_for_each(|&u| {
        stopper.check()?;
        f(u).inspect_err(|e| {
            if !e.is_echo() {
                let mut own = own.lock().unwrap_or_else(|p| p.into_inner());
                if own.is_none() {
                    stopper.tell_peers(e);
                    *own = Some(e.clone());
                }
            }
        })
    });
    match own.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => res,
    }
}

fn same_as_planned(md: &fs::Metadata, e: &Entry) -> bool {
    md.len() == e.size && md.mtime() == e.mtime.0 && md.mtime_nsec() as u32 == e.mtime.1
}

fn changed(e: &Entry, md: &fs::Metadata) -> Error {
    Error::integrity(
        &e.src,
        format!(
            "source changed since it was planned (size {} → {}, mtime {} → {}); \
             cancel this transfer and copy again",
            e.size,
            md.len(),
            e.mtime.0,
            md.mtime()
        ),
    )
    .with_op("copy")
}

/// Copy one unit into its temporary file. A large unit is fsynced here; a small one is left for
/// its batch's `syncfs`.
fn copy_unit(job: &CopyJob, u: u32) -> Result<Copied> {
    let plan = job.plan;
    let unit = plan.unit(u);
    let e = plan.entry(unit.entry as usize);
    failpoints::io("copy::unit_start", &e.src)?;
    // Through the source's directory handles: a source directory swapped for a link is refused.
    let src = job
        .retry
        .run("open", || job.src_tree.open_read(&e.src, e.depth))?;
    let md = src.metadata().ctx("stat", &e.src)?;
    if !same_as_planned(&md, e) {
        return Err(changed(e, &md));
    }
    let several = plan.units_of(unit.entry as usize).len() > 1;
    let (dst, tmp, made, dev) =
        job.temps
            .open(plan, job.tree, unit.entry as usize, &md, several)?;
    let crc = BUF.with(|b| {
        let mut buf = b.borrow_mut();
        // Grown to the largest unit seen, at most BUF_SIZE: small files keep small buffers.
        let want = (unit.len as usize).clamp(1, BUF_SIZE);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        copy_range(
            job,
            (&src, &e.src),
            (&dst, &tmp),
            unit.offset,
            unit.len,
            &mut buf,
        )
    })?;
    failpoints::io("copy::unit_written", &tmp)?;
    let small = unit.len < SMALL_UNIT;
    if !small {
        // A run that must stop abandons the unit rather than wait for its fsync.
        job.stopper.check()?;
        fsio::sync_data(&dst, &tmp)?;
        failpoints::io("copy::unit_synced", &tmp)?;
    }
    let after = src.metadata().ctx("stat", &e.src)?;
    // The change time catches a rewrite during this unit even if the writer restored the mtime;
    // the inode and device a file replaced by rename.
    if !same_as_planned(&after, e)
        || (after.ctime(), after.ctime_nsec()) != (md.ctime(), md.ctime_nsec())
        || (after.ino(), after.dev()) != (md.ino(), md.dev())
    {
        return Err(changed(e, &after));
    }
    let rec = UnitDone {
        unit: u,
        len: unit.len,
        crc,
    };
    let made = made.map(|id| (unit.entry, id));
    if small {
        return Ok(Copied::Unsynced(rec, made, dev, tmp, e.dst_depth()));
    }
    Ok(Copied::Synced(
        rec,
        made.map(|(entry, id)| {
            (
                entry,
                id,
                fsio::parent_of(&tmp).to_path_buf(),
                e.dst_depth().saturating_sub(1),
            )
        }),
    ))
}

/// Open a file for reading without following a symlink at its name.
fn open_nofollow(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx("open", path)
}

/// Copy bytes `offset..offset + len` of `src` to the same offset of `dst`; returns their CRC32.
/// Large units go through `copy_file_range` (the kernel moves the bytes, one memory copy instead
/// of two), each piece then read back from the destination's page cache for its CRC; small
/// units, file systems without it (EXDEV across file systems, EINVAL, EOPNOTSUPP, ENOSYS) and
/// `FERRY_NO_COPY_FILE_RANGE=1` use read and write, the CRC computed on the bytes read.
fn copy_range(
    job: &CopyJob,
    (src, src_path): (&File, &Path),
    (dst, dst_path): (&File, &Path),
    offset: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut pos = offset;
    let end = offset + len;
    let large = len >= SMALL_UNIT;
    let mut kernel = large && kernel_copy_allowed();
    while pos < end {
        job.stopper.check()?;
        let want = ((end - pos) as usize).min(buf.len());
        let n = if kernel {
            match kernel_copy(&job.retry, (src, src_path), dst, pos, want)? {
                Some(n) if n > 0 => {
                    // The CRC of what the destination now holds, from its page cache.
                    let back = &mut buf[..n];
                    dst.read_exact_at(back, pos).ctx("read", dst_path)?;
                    h.update(back);
                    Some(n)
                }
                Some(n) => Some(n),
                None => {
                    kernel = false;
                    None
                }
            }
        } else {
            None
        };
        let n = match n {
            Some(n) => n,
            None => {
                let n = read_at(&job.retry, src, src_path, &mut buf[..want], pos)?;
                if n > 0 {
                    h.update(&buf[..n]);
                    let chunk = &buf[..n];
                    job.retry.run("write", || {
                        dst.write_all_at(chunk, pos).ctx("write", dst_path)
                    })?;
                }
                n
            }
        };
        if n == 0 {
            return Err(Error::integrity(
                src_path,
                format!("source ended at byte {pos}, the plan says {}", end),
            )
            .with_op("read"));
        }
        if large {
            fsio::start_writeback(dst, pos, n as u64);
        }
        pos += n as u64;
    }
    Ok(h.finalize())
}

/// Whether `copy_file_range` may be tried: not after it was found unsupported in this process,
/// nor with `FERRY_NO_COPY_FILE_RANGE=1`.
fn kernel_copy_allowed() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !KERNEL_COPY_UNSUPPORTED.load(Ordering::Relaxed)
        && !*OFF.get_or_init(|| {
            std::env::var_os("FERRY_NO_COPY_FILE_RANGE").is_some_and(|v| !v.is_empty() && v != "0")
        })
}

static KERNEL_COPY_UNSUPPORTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// One `copy_file_range` of up to `want` bytes at `pos`; `Ok(None)` if the file systems cannot
/// do it, or if the error may be the destination's (ENOSPC, EDQUOT, EFBIG, EROFS, EPERM, ...):
/// the caller then copies the same piece, and the rest of the unit, by read and write, which
/// meets the error again and names the side it belongs to. Other errors are read errors of the
/// source, retried as [`read_at`] retries them.
fn kernel_copy(
    retry: &RetryPolicy,
    (src, src_path): (&File, &Path),
    dst: &File,
    pos: u64,
    want: usize,
) -> Result<Option<usize>> {
    retry.run("read", || {
        failpoints::io("copy::read", src_path)?;
        loop {
            let (mut from, mut to) = (pos, pos);
            match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), want) {
                Ok(n) => return Ok(Some(n)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOSYS,
                ) => {
                    KERNEL_COPY_UNSUPPORTED.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
                // Which side failed is not known: the read/write path finds out and names it.
                Err(
                    rustix::io::Errno::NOSPC
                    | rustix::io::Errno::DQUOT
                    | rustix::io::Errno::FBIG
                    | rustix::io::Errno::ROFS
                    | rustix::io::Errno::BADF
                    | rustix::io::Errno::PERM
                    | rustix::io::Errno::ACCESS,
                ) => return Ok(None),
                Err(e) => return Err(Error::io("read", src_path, e.into())),
            }
        }
    })
}

/// Read at an offset: EINTR is repeated at once, other transient errors (EAGAIN, ETIMEDOUT, EIO
/// on a read) by `retry`, with backoff.
fn read_at(retry: &RetryPolicy, f: &File, path: &Path, buf: &mut [u8], pos: u64) -> Result<usize> {
    retry.run("read", || {
        failpoints::io("copy::read", path)?;
        loop {
            match f.read_at(buf, pos) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read", path, e)),
            }
        }
    })
}

/// The CRC32 of bytes `offset..offset + len` of `f`; `None` if the file is shorter.
fn crc_of(
    retry: &RetryPolicy,
    f: &File,
    path: &Path,
    offset: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<Option<u32>> {
    let mut h = crc32fast::Hasher::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = read_at(retry, f, path, &mut buf[..want], pos)?;
        if n == 0 {
            return Ok(None);
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(Some(h.finalize()))
}

/// Re-read `units` from their temporary files (or final names, once renamed) and compare CRCs
/// with those computed while copying; then re-read the same bytes of the source, so a source
/// rewritten in place (even with its size and mtime kept) is caught before the commit. Each file
/// read is the very inode `idents` names. A unit whose bytes read back wrong gets its entry voided
/// in `journal` (durably, this attempt's records included) and is listed in `voided`, whose
/// temporary files the caller removes ([`remove_voided`]) once every rank is done reading, so a
/// resume copies that file again into a new temporary file and never trusts a hole.
#[allow(clippy::too_many_arguments)]
pub fn verify_units(
    plan: &Plan,
    pool: &rayon::ThreadPool,
    units: &[u32],
    crcs: &HashMap<u32, u32>,
    idents: &Idents,
    journal: &Journal,
    stopper: &Stopper,
    retry: RetryPolicy,
    voided: &mut Vec<(u32, PathBuf)>,
) -> Result<()> {
    let tree = fsio::Tree::new();
    // Entries whose staged bytes read back wrong, with the file read.
    let bad: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());
    let res = pool.install(|| {
        par_units(units, stopper, |u| {
            let unit = plan.unit(u);
            let e = plan.entry(unit.entry as usize);
            let id = idents.get(&unit.entry).ok_or_else(|| {
                Error::internal("a unit to verify has no temporary file on record")
                    .with_path(&e.dst)
            })?;
            let tmp = temp_path(plan, unit.entry as usize, id.gen);
            let (f, path) = match tree.open_temp_read(&tmp, e.dst_depth(), id.key()) {
                Ok(f) => (f, tmp),
                Err(err) if err.class == ErrorClass::NotFound => {
                    // Renamed already (a resume after the decision): the final name must be the
                    // very file.
                    let f = tree.open_temp_read(&e.dst, e.dst_depth(), id.key())?;
                    (f, e.dst.clone())
                }
                Err(err) => return Err(err),
            };
            fsio::drop_cache(&f);
            let mut buf = vec![0u8; BUF_SIZE.min(unit.len.max(1) as usize)];
            let end = unit.offset + unit.len;
            let want = crcs.get(&u).copied();
            let got = crc_of(&retry, &f, &path, unit.offset, unit.len, &mut buf)?;
            if got.is_none() || got != want {
                bad.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((unit.entry, path.clone()));
                let what = if got.is_none() {
                    "is shorter than planned".to_string()
                } else {
                    format!(
                        "bytes {}..{end} read back with another CRC32 than was written",
                        unit.offset
                    )
                };
                return Err(Error::new(
                    ErrorClass::Integrity,
                    format!(
                        "--verify: the staged copy {what}; nothing was committed for it, and \
                         `ferry resume` copies this file again from the source"
                    ),
                )
                .with_op("verify")
                .with_path(&path));
            }
            let s = open_nofollow(&e.src)?;
            if crc_of(&retry, &s, &e.src, unit.offset, unit.len, &mut buf)? != want {
                return Err(Error::integrity(
                    &e.src,
                    format!(
                        "--verify: source bytes {}..{} changed since they were copied (its size \
                         and mtime did not show it); cancel this transfer and copy again once the \
                         source is final",
                        unit.offset, end
                    ),
                )
                .with_op("verify"));
            }
            Ok(())
        })
    });
    // The journal vouches for bytes that are not there: void those entries now (durably); the
    // caller drops their temporary files once every rank has read what it verifies (another
    // rank may be reading another unit of the same file), so a resume copies each whole file
    // again.
    let bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    if !bad.is_empty() {
        let entries: Vec<u32> = bad.iter().map(|(e, _)| *e).collect();
        journal.void_all(&entries)?;
    }
    *voided = bad;
    res
}

/// Remove the temporary files of entries [`verify_units`] voided (`bad`), if each is still the
/// one ferry made: after every rank is done reading.
pub fn remove_voided(plan: &Plan, bad: &[(u32, PathBuf)], idents: &Idents) -> Result<()> {
    let tree = fsio::Tree::new();
    for (e, path) in bad {
        let ent = plan.entry(*e as usize);
        if let (true, Some(id)) = (*path != ent.dst, idents.get(e)) {
            tree.remove_temp(path, ent.dst_depth(), id.key())?;
        }
    }
    Ok(())
}

/// Shorthand used by the orchestration: an `Arc<Progress>` or a private one.
pub fn progress_or_default(p: Option<&Arc<Progress>>) -> Arc<Progress> {
    p.cloned().unwrap_or_default()
}
