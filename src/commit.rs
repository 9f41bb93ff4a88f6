//! The second phase of the commit: temporary names become final names, the commit record is
//! written, and only then sources are removed.
//!
//! Everything here runs after rank 0 durably recorded the decision (every unit of the plan is
//! durable under a temporary name). Each rank finalises the entries it owns ([`Plan::owner`]):
//! a file gets its mode and times, is fsynced (small files: all of them at once, with one
//! `syncfs`) and renamed over its final name, and the directory is fsynced; a symlink is made under a temporary name and renamed likewise. Then each rank
//! checks with a stat that each of its final names has its planned size (or target), so a file
//! replaced behind ferry's back is reported as `integrity` and never committed. Directories get
//! their modes and times deepest first, once their contents are in place. The commit record,
//! with the manifest, is written by rank 0 alone. Removal of sources happens only after it.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::error::{Error, IoContext, Result};
use crate::failpoints;
use crate::fsio;
use crate::manifest::{self, CommitRecord};
use crate::plan::{Kind, Plan};
use crate::state::{self, names, TransferDir};

/// Entries of `kind` that rank `me` of `n` owns, in plan order.
fn owned(plan: &Plan, me: usize, n: usize, kind: Kind) -> impl Iterator<Item = usize> + '_ {
    plan.held_entries()
        .into_iter()
        .filter(move |&e| plan.entry(e).kind == kind && plan.owner(e, n) == me)
}

/// Make the directory entries of the temporary files this rank owns durable (before the
/// decision: afterwards a missing temporary file can only mean it was renamed).
pub fn sync_temp_dirs(plan: &Plan, me: usize, n: usize) -> Result<()> {
    let dirs: BTreeSet<PathBuf> = owned(plan, me, n, Kind::File)
        .map(|e| fsio::parent_of(&plan.entry(e).dst).to_path_buf())
        .collect();
    for d in dirs {
        fsio::fsync_dir(&d)?;
    }
    Ok(())
}

/// Rename the temporary files and symlinks this rank owns to their final names. Every owned
/// entry's directory is fsynced, also where an earlier run did the rename, so no rename the
/// commit record vouches for can be lost.
pub fn finalize_entries(plan: &Plan, me: usize, n: usize) -> Result<()> {
    let mut dirs = BTreeSet::new();
    // Small files get their metadata without an fsync each; one syncfs per file system makes
    // them durable together, before any of them is renamed.
    let mut batch: Vec<(usize, PathBuf)> = Vec::new();
    let mut file_systems: HashMap<u64, PathBuf> = HashMap::new();
    for e in owned(plan, me, n, Kind::File) {
        // A signal stops the renames too: the decision is durable, so a resume finishes them.
        crate::stop::check_signal()?;
        let ent = plan.entry(e);
        dirs.insert(fsio::parent_of(&ent.dst).to_path_buf());
        let tmp = crate::engine::temp_path(plan, e);
        match fs::symlink_metadata(&tmp) {
            Ok(md) if md.is_file() => {
                let small = ent.size < crate::engine::SMALL_UNIT;
                fsio::finish_file(&tmp, ent.mode, ent.mtime, !small)?;
                if small {
                    file_systems
                        .entry(md.dev())
                        .or_insert_with(|| fsio::parent_of(&tmp).to_path_buf());
                    batch.push((e, tmp));
                    continue;
                }
                failpoints::io("commit::file_finished", &tmp)?;
                fsio::rename(&tmp, &ent.dst)?;
                failpoints::io("commit::renamed", &ent.dst)?;
            }
            Ok(_) => {
                return Err(Error::integrity(
                    &tmp,
                    "temporary name is not a regular file",
                ))
            }
            // Renamed by an earlier run after the decision; check_finals looks at it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", &tmp, e)),
        }
    }
    for dir in file_systems.values() {
        fsio::sync_fs(dir)?;
    }
    for (e, tmp) in batch {
        crate::stop::check_signal()?;
        failpoints::io("commit::file_finished", &tmp)?;
        fsio::rename(&tmp, &plan.entry(e).dst)?;
        failpoints::io("commit::renamed", &plan.entry(e).dst)?;
    }
    for e in owned(plan, me, n, Kind::Symlink) {
        let ent = plan.entry(e);
        let target = ent.target.as_ref().ok_or_else(|| {
            Error::internal("symlink without a target in the plan").with_path(&ent.src)
        })?;
        dirs.insert(fsio::parent_of(&ent.dst).to_path_buf());
        if fs::read_link(&ent.dst).ok().as_ref() == Some(target) {
            continue;
        }
        let tmp = crate::engine::temp_path(plan, e);
        fsio::remove_file(&tmp)?;
        std::os::unix::fs::symlink(target, &tmp).ctx("symlink", &tmp)?;
        fsio::set_times_nofollow(&tmp, ent.mtime)?;
        fsio::rename(&tmp, &ent.dst)?;
    }
    for d in &dirs {
        fsio::fsync_dir(d)?;
    }
    failpoints::hit("commit::dirs_synced")
}

/// Check with a stat that every final name this rank owns holds what the plan says.
pub fn check_finals(plan: &Plan, me: usize, n: usize) -> Result<()> {
    for e in owned(plan, me, n, Kind::File) {
        let ent = plan.entry(e);
        let md = fs::symlink_metadata(&ent.dst).ctx("stat", &ent.dst)?;
        if !md.is_file() || md.len() != ent.size {
            return Err(Error::integrity(
                &ent.dst,
                format!(
                    "final file is not what was copied (a {} of {} bytes, planned a file of {}); \
                     it was changed behind ferry's back — resume redoes it",
                    if md.is_file() { "file" } else { "non-file" },
                    md.len(),
                    ent.size
                ),
            )
            .with_op("commit-check"));
        }
    }
    for e in owned(plan, me, n, Kind::Symlink) {
        let ent = plan.entry(e);
        let t = fs::read_link(&ent.dst).ctx("readlink", &ent.dst)?;
        if Some(&t) != ent.target.as_ref() {
            return Err(
                Error::integrity(&ent.dst, "final symlink has another target")
                    .with_op("commit-check"),
            );
        }
    }
    Ok(())
}

/// Give the directories this rank owns their modes and times, deepest first, and make that
/// durable, together with each directory's own entry in its parent.
pub fn finish_dirs(plan: &Plan, me: usize, n: usize) -> Result<()> {
    let mine: Vec<usize> = owned(plan, me, n, Kind::Dir).collect();
    let mut parents = BTreeSet::new();
    for &e in mine.iter().rev() {
        let ent = plan.entry(e);
        fsio::set_mode_and_times(&ent.dst, Some(ent.mode), ent.mtime)?;
        fsio::fsync_dir(&ent.dst)?;
        parents.insert(fsio::parent_of(&ent.dst).to_path_buf());
    }
    for p in parents {
        fsio::fsync_dir(&p)?;
    }
    Ok(())
}

/// Rank 0: write the commit record with the manifest (atomically, durably).
pub fn write_commit(
    td: &TransferDir,
    plan: &Plan,
    crcs: &HashMap<u32, u32>,
    attempt: u32,
    ranks: usize,
) -> Result<CommitRecord> {
    let m = manifest::build(plan, crcs)?;
    let rec = CommitRecord {
        id: plan.id.clone(),
        time: state::now(),
        attempt,
        ranks,
        manifest: m,
    };
    failpoints::hit("commit::before_record")?;
    state::write_record(&td.file(names::COMMIT), "commit", &rec)?;
    failpoints::hit("commit::record_written")?;
    Ok(rec)
}

/// Remove the source files and symlinks this rank owns (after the commit is durable). A source
/// that is no longer the file that was copied (another inode, size or mtime: the application
/// wrote a new one there) is kept and returned, never removed.
pub fn delete_source_files(plan: &Plan, me: usize, n: usize) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs = BTreeSet::new();
    let mut kept = Vec::new();
    for kind in [Kind::File, Kind::Symlink] {
        for e in owned(plan, me, n, kind) {
            let ent = plan.entry(e);
            let src = &ent.src;
            failpoints::io("delete::source", src)?;
            let md = match fs::symlink_metadata(src) {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", src, e)),
            };
            let same = md.ino() == ent.ino
                && (kind == Kind::Symlink
                    || (md.len() == ent.size
                        && md.mtime() == ent.mtime.0
                        && md.mtime_nsec() as u32 == ent.mtime.1));
            if !same {
                log::warn!(
                    "kept source '{}': it is not the file that was copied any more",
                    src.display()
                );
                kept.push(src.clone());
                continue;
            }
            if fsio::remove_file(src)? {
                dirs.insert(fsio::parent_of(src).to_path_buf());
            }
        }
    }
    for d in dirs {
        match fsio::fsync_dir(&d) {
            Err(e) if e.class == crate::ErrorClass::NotFound => {}
            r => r?,
        }
    }
    Ok(kept)
}

/// Remove the source directories this rank owns, deepest first. A directory that still holds
/// something not in the plan is kept and returned.
pub fn delete_source_dirs(plan: &Plan, me: usize, n: usize) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    let mine: Vec<usize> = owned(plan, me, n, Kind::Dir).collect();
    for &e in mine.iter().rev() {
        let src = &plan.entry(e).src;
        failpoints::io("delete::dir", src)?;
        match fs::remove_dir(src) {
            Ok(()) => match fsio::fsync_dir(fsio::parent_of(src)) {
                Err(e) if e.class == crate::ErrorClass::NotFound => {}
                r => r?,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                log::warn!(
                    "kept source directory '{}': it holds files that were not part of the transfer",
                    src.display()
                );
                kept.push(src.clone());
            }
            Err(e) => return Err(Error::io("rmdir", src, e)),
        }
    }
    Ok(kept)
}

/// Remove the temporary files of the entries this rank owns (cancel). Returns how many.
pub fn remove_temps(plan: &Plan, me: usize, n: usize) -> Result<usize> {
    let mut count = 0;
    let mut dirs = BTreeSet::new();
    for e in plan.held_entries() {
        if plan.entry(e).kind == Kind::Dir || plan.owner(e, n) != me {
            continue;
        }
        let tmp = crate::engine::temp_path(plan, e);
        if fsio::remove_file(&tmp)? {
            count += 1;
            dirs.insert(fsio::parent_of(&tmp).to_path_buf());
        }
    }
    for d in dirs {
        fsio::fsync_dir(&d)?;
    }
    failpoints::hit("cancel::temps_removed")?;
    Ok(count)
}
