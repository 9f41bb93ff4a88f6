//! The copy engine: one rank's units, copied by a pool of threads into temporary names.
//!
//! A unit is copied from its source file at its offset into the file's temporary name in the
//! destination directory (`.ferry-ID-N.tmp`, mode 0600, opened without following symlinks), its
//! CRC32 computed in the same pass, its data fsynced, and only then recorded in the rank's
//! journal. The source is checked against the plan before and after the copy: a source that
//! changed is an `integrity` error, never a silent mix of old and new bytes. Final names are never
//! written here; the commit module renames. Cancellation is noticed between buffers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::{Error, ErrorClass, IoContext, Result};
use crate::failpoints;
use crate::fsio;
use crate::journal::{Journal, UnitDone};
use crate::plan::{Entry, Plan};

/// Bytes moved per read/write call.
pub const BUF_SIZE: usize = 4 << 20;
/// How often a run looks for a cancel request.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Bytes done and total, shared by every rank in this process (for the progress bar).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes durable so far (including units finished by earlier runs).
    pub done: AtomicU64,
    /// Bytes in the plan.
    pub total: AtomicU64,
}

/// Notices `ferry cancel`: the request file appearing in the transfer's state directory.
#[derive(Debug)]
pub struct Stopper {
    request: PathBuf,
    stop: AtomicBool,
    last: Mutex<Instant>,
}

impl Stopper {
    /// Watch for `request` to appear.
    pub fn new(request: PathBuf) -> Stopper {
        Stopper {
            request,
            stop: AtomicBool::new(false),
            last: Mutex::new(Instant::now() - CANCEL_POLL),
        }
    }

    /// `Err(cancelled)` once a cancel was requested (looks at the disk at most every 100 ms).
    pub fn check(&self) -> Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(Error::cancelled());
        }
        let due = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= CANCEL_POLL {
                *last = Instant::now();
                true
            } else {
                false
            }
        };
        if due && !self.request.as_os_str().is_empty() && self.request.exists() {
            self.stop.store(true, Ordering::Relaxed);
            return Err(Error::cancelled());
        }
        Ok(())
    }

    /// A stopper that never stops (past the commit decision a cancel is refused).
    pub fn disabled() -> Stopper {
        Stopper {
            request: PathBuf::new(),
            stop: AtomicBool::new(false),
            last: Mutex::new(Instant::now()),
        }
    }

    /// Look at the disk now, whatever the time since the last look.
    pub fn check_now(&self) -> Result<()> {
        if !self.request.as_os_str().is_empty() && self.request.exists() {
            self.stop.store(true, Ordering::Relaxed);
        }
        self.check()
    }
}

/// The temporary name of entry `e`: beside its final name, so the rename stays in one directory.
pub fn temp_path(plan: &Plan, e: usize) -> PathBuf {
    let dst = &plan.entry(e).dst;
    fsio::parent_of(dst).join(format!(".ferry-{}-{e}.tmp", plan.id))
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
    /// Cancel watcher.
    pub stopper: &'a Stopper,
    /// Shared progress counter.
    pub progress: &'a Progress,
}

/// Copy `units` with `pool`; returns the journal records of the units done. On error the journal
/// is still flushed, so finished units need not be redone.
pub fn copy_units(job: &CopyJob, pool: &rayon::ThreadPool, units: &[u32]) -> Result<Vec<UnitDone>> {
    let done = Mutex::new(Vec::with_capacity(units.len()));
    let res = pool.install(|| {
        units.par_iter().with_max_len(1).try_for_each(|&u| {
            job.stopper.check()?;
            let (rec, created_in) = copy_unit(job, u)?;
            job.journal.record(rec, created_in.as_deref())?;
            job.progress.done.fetch_add(rec.len, Ordering::Relaxed);
            done.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
            Ok(())
        })
    });
    let flushed = job.journal.flush();
    res?;
    flushed?;
    Ok(done.into_inner().unwrap_or_else(|e| e.into_inner()))
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

/// Copy one unit; returns its record and, if this call created the temporary file, its directory.
fn copy_unit(job: &CopyJob, u: u32) -> Result<(UnitDone, Option<PathBuf>)> {
    let plan = job.plan;
    let unit = plan.unit(u);
    let e = plan.entry(unit.entry as usize);
    failpoints::io("copy::unit_start", &e.src)?;
    let src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&e.src)
        .ctx("open", &e.src)?;
    let md = src.metadata().ctx("stat", &e.src)?;
    if !same_as_planned(&md, e) {
        return Err(changed(e, &md));
    }
    let tmp = temp_path(plan, unit.entry as usize);
    let (dst, created) = fsio::open_temp(&tmp)?;
    let crc = BUF.with(|b| {
        let mut buf = b.borrow_mut();
        // Grown to the largest unit seen, at most BUF_SIZE: small files keep small buffers.
        let want = (unit.len as usize).clamp(1, BUF_SIZE);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        copy_range(
            job,
            &src,
            &e.src,
            &dst,
            &tmp,
            unit.offset,
            unit.len,
            &mut buf,
        )
    })?;
    failpoints::io("copy::unit_written", &tmp)?;
    fsio::sync_data(&dst, &tmp)?;
    failpoints::io("copy::unit_synced", &tmp)?;
    let after = src.metadata().ctx("stat", &e.src)?;
    if !same_as_planned(&after, e) {
        return Err(changed(e, &after));
    }
    let rec = UnitDone {
        unit: u,
        len: unit.len,
        crc,
    };
    Ok((rec, created.then(|| fsio::parent_of(&tmp).to_path_buf())))
}

#[allow(clippy::too_many_arguments)]
fn copy_range(
    job: &CopyJob,
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    offset: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        job.stopper.check()?;
        let want = ((end - pos) as usize).min(buf.len());
        let n = read_at_retry(src, src_path, &mut buf[..want], pos)?;
        if n == 0 {
            return Err(Error::integrity(
                src_path,
                format!("source ended at byte {pos}, the plan says {}", end),
            )
            .with_op("read"));
        }
        h.update(&buf[..n]);
        dst.write_all_at(&buf[..n], pos).ctx("write", dst_path)?;
        pos += n as u64;
    }
    Ok(h.finalize())
}

/// Read at an offset, retrying EINTR (the one transient error that is always safe to repeat here).
fn read_at_retry(f: &File, path: &Path, buf: &mut [u8], pos: u64) -> Result<usize> {
    loop {
        match f.read_at(buf, pos) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
}

/// Re-read `units` from their temporary files (or final names, once renamed) and compare CRCs.
pub fn verify_units(
    plan: &Plan,
    pool: &rayon::ThreadPool,
    units: &[u32],
    crcs: &HashMap<u32, u32>,
    stopper: &Stopper,
) -> Result<()> {
    pool.install(|| {
        units.par_iter().try_for_each(|&u| {
            stopper.check()?;
            let unit = plan.unit(u);
            let e = plan.entry(unit.entry as usize);
            let tmp = temp_path(plan, unit.entry as usize);
            let path = if tmp.exists() { tmp } else { e.dst.clone() };
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .ctx("open", &path)?;
            fsio::drop_cache(&f);
            let mut h = crc32fast::Hasher::new();
            let mut buf = vec![0u8; BUF_SIZE.min(unit.len.max(1) as usize)];
            let mut pos = unit.offset;
            let end = unit.offset + unit.len;
            while pos < end {
                let want = ((end - pos) as usize).min(buf.len());
                let n = read_at_retry(&f, &path, &mut buf[..want], pos)?;
                if n == 0 {
                    return Err(Error::integrity(
                        &path,
                        "destination is shorter than planned",
                    ));
                }
                h.update(&buf[..n]);
                pos += n as u64;
            }
            let want = crcs.get(&u).copied();
            if Some(h.finalize()) != want {
                // The journal vouches for bytes that are not there: drop the temporary file so a
                // resume copies the whole file again instead of trusting it.
                if path != e.dst {
                    fsio::remove_file(&path)?;
                }
                return Err(Error::new(
                    ErrorClass::Integrity,
                    format!(
                        "--verify: bytes {}..{} read back with another CRC32 than was written",
                        unit.offset, end
                    ),
                )
                .with_op("verify")
                .with_path(&path));
            }
            Ok(())
        })
    })
}

/// Shorthand used by the orchestration: an `Arc<Progress>` or a private one.
pub fn progress_or_default(p: Option<&Arc<Progress>>) -> Arc<Progress> {
    p.cloned().unwrap_or_default()
}
