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

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::failpoints;
use crate::fsio;
use crate::journal::{Idents, TempId};
use crate::manifest::{self, CommitRecord};
use crate::plan::{Entry, Kind, Plan};
use crate::preserve::Kept;
use crate::state::{self, names, TransferDir};

/// Entries of `kind` that rank `me` of `n` owns, in plan order.
fn owned(plan: &Plan, me: usize, n: usize, kind: Kind) -> impl Iterator<Item = usize> + '_ {
    plan.held_entries()
        .into_iter()
        .filter(move |&e| plan.entry(e).kind == kind && plan.owner(e, n) == me)
}

/// The directory holding entry `e`'s final name, with its depth below the anchor.
fn parent_at(plan: &Plan, e: usize) -> (PathBuf, u16) {
    let ent = plan.entry(e);
    (
        fsio::parent_of(&ent.dst).to_path_buf(),
        ent.dst_depth().saturating_sub(1),
    )
}

/// Make the directory entries of the temporary files this rank owns durable (before the
/// decision: afterwards a missing temporary file can only mean it was renamed).
pub fn sync_temp_dirs(plan: &Plan, me: usize, n: usize) -> Result<()> {
    let tree = fsio::Tree::new();
    let dirs: BTreeMap<PathBuf, u16> = owned(plan, me, n, Kind::File)
        .map(|e| parent_at(plan, e))
        .collect();
    for (d, depth) in dirs {
        tree.fsync_dir(&d, depth)?;
    }
    Ok(())
}

/// Log each `--preserve` warning; returns how many there were.
fn warn_all(warnings: Vec<Error>) -> u64 {
    for w in &warnings {
        log::warn!("{w}");
    }
    warnings.len() as u64
}

/// What the commit needs of `ent`'s source (read now, through handles from the source's anchor,
/// from the planned inode): with `--preserve` owner, group and extended attributes; without,
/// for a file with set-id bits, its owner and group (the bits are kept only with them). Returns
/// `None` if nothing is needed; a source whose owner cannot be read is one warning more.
fn source_of(src: &fsio::Tree, plan: &Plan, ent: &Entry, warnings: &mut u64) -> Option<Kept> {
    let setid = ent.kind == Kind::File && ent.mode & 0o6000 != 0;
    if !plan.preserve && !setid {
        return None;
    }
    let link = ent.kind == Kind::Symlink;
    match src.read_source(&ent.src, ent.depth, link, plan.preserve, ent.ino) {
        Ok((k, w)) => {
            *warnings += warn_all(w);
            Some(k)
        }
        Err(e) => {
            *warnings += warn_all(vec![e.context(format!(
                "owner, group and extended attributes of '{}' not kept",
                ent.dst.display()
            ))]);
            None
        }
    }
}

/// The metadata `ent` gets from `source` (see [`source_of`]).
fn meta_of<'a>(plan: &Plan, ent: &Entry, source: Option<&'a Kept>) -> fsio::Meta<'a> {
    fsio::Meta {
        mode: ent.mode,
        mtime: ent.mtime,
        kept: source.filter(|_| plan.preserve),
        owner: source.map(|k| (k.uid, k.gid)),
        file: ent.kind == Kind::File,
    }
}

fn is_symlink(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink
}

pub(crate) fn is_file(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
}

/// Rename the temporary files and symlinks this rank owns to their final names. Every owned
/// entry's directory is fsynced, also where an earlier run did the rename, so no rename the
/// commit record vouches for can be lost. Everything happens through directory handles opened
/// from the anchors (a directory swapped for a symlink is refused, never followed). Returns how
/// many `--preserve` warnings were logged.
pub fn finalize_entries(plan: &Plan, me: usize, n: usize, idents: &Idents) -> Result<u64> {
    let tree = fsio::Tree::new();
    let src = fsio::Tree::new();
    let mut warnings = 0;
    let mut dirs = BTreeMap::new();
    // Small files get their metadata without an fsync each; one syncfs per file system makes
    // them durable together, before any of them is renamed.
    let mut batch: Vec<(usize, PathBuf)> = Vec::new();
    let mut file_systems: HashMap<u64, (PathBuf, u16)> = HashMap::new();
    for e in owned(plan, me, n, Kind::File) {
        // A signal stops the renames too: the decision is durable, so a resume finishes them.
        crate::stop::check_signal()?;
        let ent = plan.entry(e);
        let depth = ent.dst_depth();
        let (dir, dir_depth) = parent_at(plan, e);
        dirs.insert(dir.clone(), dir_depth);
        let id = ident(idents, e, ent)?;
        let tmp = crate::engine::temp_path(plan, e, id.gen);
        let small = ent.size < crate::engine::SMALL_UNIT;
        // One open and one statx: the very file journaled, or a foreign one refused.
        let Some((f, k)) = tree.open_finished(&tmp, depth, (id.dev, id.ino))? else {
            // Renamed by an earlier run after the decision; check_finals looks at it.
            continue;
        };
        let source = source_of(&src, plan, ent, &mut warnings);
        let meta = meta_of(plan, ent, source.as_ref());
        let w = fsio::Tree::finish(&f, &tmp, &ent.dst, &meta, !small)?;
        drop(f);
        warnings += warn_all(w);
        if small {
            file_systems.entry(k.dev).or_insert((dir, dir_depth));
            batch.push((e, tmp));
            continue;
        }
        failpoints::io("commit::file_finished", &tmp)?;
        tree.rename(&tmp, &ent.dst, depth)?;
        failpoints::io("commit::renamed", &ent.dst)?;
    }
    for (dir, depth) in file_systems.values() {
        tree.sync_fs(dir, *depth)?;
    }
    for (e, tmp) in batch {
        crate::stop::check_signal()?;
        let ent = plan.entry(e);
        failpoints::io("commit::file_finished", &tmp)?;
        tree.rename(&tmp, &ent.dst, ent.dst_depth())?;
        failpoints::io("commit::renamed", &ent.dst)?;
    }
    for e in owned(plan, me, n, Kind::Symlink) {
        let ent = plan.entry(e);
        let depth = ent.dst_depth();
        let target = ent.target.as_ref().ok_or_else(|| {
            Error::internal("symlink without a target in the plan").with_path(&ent.src)
        })?;
        let (dir, dir_depth) = parent_at(plan, e);
        dirs.insert(dir, dir_depth);
        if tree.read_link(&ent.dst, depth)?.as_ref() == Some(target) {
            continue;
        }
        // A symlink's temporary name belongs to this attempt of this plan alone (its nonce).
        let tmp = crate::engine::temp_path(plan, e, 0);
        match tree.stat(&tmp, depth)? {
            // Left by an earlier attempt's commit (a symlink is all ferry ever makes there).
            Some(st) if !is_symlink(&st) => return Err(fsio::foreign_temp(&tmp, Some(&st))),
            Some(_) => {
                tree.remove_file(&tmp, depth)?;
            }
            None => {}
        }
        let kept = source_of(&src, plan, ent, &mut warnings);
        warnings +=
            warn_all(tree.symlink(target, &tmp, &ent.dst, depth, ent.mtime, kept.as_ref())?);
        tree.rename(&tmp, &ent.dst, depth)?;
    }
    for (d, depth) in &dirs {
        tree.fsync_dir(d, *depth)?;
    }
    failpoints::hit("commit::dirs_synced")?;
    Ok(warnings)
}

/// The temporary file the journals (or this attempt) record for file entry `e`.
fn ident(idents: &Idents, e: usize, ent: &Entry) -> Result<TempId> {
    idents.get(&(e as u32)).copied().ok_or_else(|| {
        Error::internal("a file to commit has no temporary file on record").with_path(&ent.dst)
    })
}

/// Check with a stat that every final name this rank owns is the very file ferry made and
/// journaled (a rename keeps the inode) with the planned size, and every symlink its target
/// (through directory handles opened afresh: a directory swapped for a symlink since is refused).
pub fn check_finals(plan: &Plan, me: usize, n: usize, idents: &Idents) -> Result<()> {
    let tree = fsio::Tree::new();
    let missing = |p: &Path, op: &str| Error::io(op, p, io::Error::from_raw_os_error(libc::ENOENT));
    for e in owned(plan, me, n, Kind::File) {
        let ent = plan.entry(e);
        // One statx: identity, type and size.
        let k = tree
            .key(&ent.dst, ent.dst_depth())?
            .ok_or_else(|| missing(&ent.dst, "stat"))?;
        let id = ident(idents, e, ent)?;
        if !k.regular || k.size != ent.size || !id.is(k.key) {
            return Err(Error::integrity(
                &ent.dst,
                format!(
                    "final file is not the file ferry copied (a {} of {} bytes, inode {}; \
                     planned a file of {} bytes, inode {}): it was replaced behind ferry's back, \
                     and nothing was committed",
                    if k.regular { "file" } else { "non-file" },
                    k.size,
                    k.key.1,
                    ent.size,
                    id.ino
                ),
            )
            .with_op("commit-check"));
        }
    }
    for e in owned(plan, me, n, Kind::Symlink) {
        let ent = plan.entry(e);
        let t = tree.read_link(&ent.dst, ent.dst_depth())?;
        if t.as_ref() != ent.target.as_ref() {
            return Err(Error::integrity(
                &ent.dst,
                "final symlink is missing or has another target",
            )
            .with_op("commit-check"));
        }
    }
    Ok(())
}

/// Give the directories this rank owns their modes and times (and with `--preserve` owners and
/// extended attributes, default ACLs included), deepest first, and make that durable, together
/// with each directory's own entry in its parent. Returns how many `--preserve` warnings were
/// logged.
pub fn finish_dirs(plan: &Plan, me: usize, n: usize) -> Result<u64> {
    let tree = fsio::Tree::new();
    let src = fsio::Tree::new();
    let mut warnings = 0;
    let mine: Vec<usize> = owned(plan, me, n, Kind::Dir).collect();
    let mut parents = BTreeMap::new();
    for &e in mine.iter().rev() {
        let ent = plan.entry(e);
        let source = source_of(&src, plan, ent, &mut warnings);
        let meta = meta_of(plan, ent, source.as_ref());
        warnings += warn_all(tree.finish_dir(&ent.dst, ent.dst_depth(), &meta)?);
        let (p, depth) = parent_at(plan, e);
        parents.insert(p, depth);
    }
    for (p, depth) in parents {
        tree.fsync_dir(&p, depth)?;
    }
    Ok(warnings)
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

/// Remove the source files and symlinks this rank owns (after the commit is durable), through
/// directory handles opened from the source anchors: a source directory swapped for a symlink
/// is refused, never followed. A source that is no longer the file that was copied (another
/// inode, size or mtime: the application wrote a new one there) is kept and returned, never
/// removed.
pub fn delete_source_files(
    td: &TransferDir,
    plan: &Plan,
    me: usize,
    n: usize,
) -> Result<Vec<PathBuf>> {
    let tree = fsio::Tree::new();
    let mut dirs = BTreeMap::new();
    let mut kept = Vec::new();
    // The committed CRC of each file, read from the commit record only if a source's change time
    // moved (a chmod, a hard link, a restored link count... or a rewrite with its mtime put back).
    let mut committed: Option<HashMap<PathBuf, u32>> = None;
    for kind in [Kind::File, Kind::Symlink] {
        for e in owned(plan, me, n, kind) {
            let ent = plan.entry(e);
            let src = &ent.src;
            failpoints::io("delete::source", src)?;
            let Some(st) = tree.stat(src, ent.depth)? else {
                continue;
            };
            let mut same = st.st_ino == ent.ino
                && (kind == Kind::Symlink
                    || (st.st_size as u64 == ent.size
                        && st.st_mtime == ent.mtime.0
                        && st.st_mtime_nsec as u32 == ent.mtime.1));
            // Its change time moved since it was planned: removed only if its bytes are still
            // those committed (a source rewritten in place with its mtime put back is another
            // version, and is kept).
            let ctime = (st.st_ctime, st.st_ctime_nsec as u32);
            if same && kind == Kind::File && ent.ctime != (0, 0) && ctime != ent.ctime {
                if committed.is_none() {
                    let rec: Option<CommitRecord> =
                        state::read_record(&td.file(names::COMMIT), "commit")?;
                    committed = Some(
                        rec.map(|r| {
                            r.manifest
                                .files
                                .into_iter()
                                .map(|f| (f.path, f.crc32))
                                .collect()
                        })
                        .unwrap_or_default(),
                    );
                }
                let want = committed.as_ref().and_then(|m| m.get(&ent.dst)).copied();
                let f = tree.open_read(src, ent.depth)?;
                same = want == Some(file_crc(&f, src)?);
            }
            if !same {
                log::warn!(
                    "kept source '{}': it is not the file that was copied any more",
                    src.display()
                );
                kept.push(src.clone());
                continue;
            }
            if tree.remove_file(src, ent.depth)? {
                dirs.insert(
                    fsio::parent_of(src).to_path_buf(),
                    ent.depth.saturating_sub(1),
                );
            }
        }
    }
    for (d, depth) in dirs {
        match tree.fsync_dir(&d, depth) {
            Err(e) if e.class == crate::ErrorClass::NotFound => {}
            r => r?,
        }
    }
    Ok(kept)
}

/// The CRC32 of an open file's bytes from its start.
fn file_crc(f: &std::fs::File, path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut r = f;
    loop {
        let k = r.read(&mut buf).map_err(|e| Error::io("read", path, e))?;
        if k == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..k]);
    }
}

/// Remove the source directories this rank owns, deepest first. A directory that still holds
/// something not in the plan is kept and returned.
pub fn delete_source_dirs(plan: &Plan, me: usize, n: usize) -> Result<Vec<PathBuf>> {
    let tree = fsio::Tree::new();
    let mut kept = Vec::new();
    // Rank 0 (which holds the whole plan), deepest first, so a directory goes after those in it
    // (in the local layout, each holder its own).
    let mine: Vec<usize> = plan
        .held_entries()
        .into_iter()
        .filter(|&e| {
            let ent = plan.entry(e);
            ent.kind == Kind::Dir
                && match (plan.layout, ent.holder) {
                    (crate::plan::Layout::Local, Some(h)) => h == me,
                    _ => me == 0 || n == 0,
                }
        })
        .collect();
    for &e in mine.iter().rev() {
        let ent = plan.entry(e);
        let src = &ent.src;
        failpoints::io("delete::dir", src)?;
        match tree.remove_dir(src, ent.depth) {
            Ok(true) => match tree.fsync_dir(fsio::parent_of(src), ent.depth.saturating_sub(1)) {
                Err(e) if e.class == crate::ErrorClass::NotFound => {}
                r => r?,
            },
            Ok(false) => {}
            Err(e) if e.errno == Some(libc::ENOTEMPTY) => {
                log::warn!(
                    "kept source directory '{}': it holds files that were not part of the transfer",
                    src.display()
                );
                kept.push(src.clone());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(kept)
}

/// Whether `st` is what ferry leaves at one of its temporary names when it is killed between
/// making the file and journaling it: a regular file with one link, mode 0600, of this user.
fn plausibly_left_by_ferry(st: &rustix::fs::Stat) -> bool {
    is_file(st)
        && st.st_nlink == 1
        && st.st_mode & 0o7777 == 0o600
        && st.st_uid == rustix::process::geteuid().as_raw()
}

/// Remove what earlier attempts `1..upto` of this plan left at entry `e`'s temporary names and
/// never journaled (a run killed between making a temporary file and journaling it), except the
/// attempt `keep` whose file the journals vouch for. Such a name carries this plan's random nonce,
/// the entry and the attempt, so only ferry makes it; it is removed only if it also looks like
/// what ferry makes (a regular file with one link, mode 0600, of this user): a hard link, a link, a FIFO or a file of
/// another user at that name is left alone with a warning. Returns how many were removed.
pub fn sweep_leftovers(
    tree: &fsio::Tree,
    plan: &Plan,
    e: usize,
    upto: u32,
    keep: Option<u32>,
) -> Result<usize> {
    let ent = plan.entry(e);
    let mut n = 0;
    let mut names: Vec<PathBuf> = (1..upto)
        .filter(|g| Some(*g) != keep)
        .map(|g| crate::engine::temp_path(plan, e, g))
        .collect();
    if plan.nonce.is_empty() {
        // A plan of a ferry before temporary identities: its one temporary name per entry.
        names.push(fsio::parent_of(&ent.dst).join(format!(".ferry-{}-{e}.tmp", plan.id)));
    }
    for tmp in names {
        match tree.stat(&tmp, ent.dst_depth()) {
            Ok(Some(st)) if plausibly_left_by_ferry(&st) => {
                if tree.remove_file(&tmp, ent.dst_depth())? {
                    n += 1;
                }
            }
            Ok(Some(st)) => log::warn!("{} (left in place)", fsio::foreign_temp(&tmp, Some(&st))),
            // A directory of the tree that is not there yet has no leftovers.
            Ok(None) | Err(_) => {}
        }
    }
    Ok(n)
}

/// Remove the temporary files of the entries this rank owns, and those in `made` (it made them
/// in this attempt), that are provably ferry's: the very inode `idents` records (cancel).
/// Returns how many.
pub fn remove_temps(
    plan: &Plan,
    me: usize,
    n: usize,
    idents: &Idents,
    made: &[(u32, TempId)],
) -> Result<usize> {
    let tree = fsio::Tree::new();
    let mut count = 0;
    let mut dirs = BTreeMap::new();
    let mut todo: BTreeMap<u32, TempId> = made.iter().copied().collect();
    for e in plan.held_entries() {
        if plan.entry(e).kind == Kind::File && plan.owner(e, n) == me {
            if let Some(id) = idents.get(&(e as u32)) {
                todo.insert(e as u32, *id);
            }
        }
    }
    for (e, id) in todo {
        let ent = plan.entry(e as usize);
        let tmp = crate::engine::temp_path(plan, e as usize, id.gen);
        let ours = tree
            .key(&tmp, ent.dst_depth())?
            .is_some_and(|k| k.regular && id.is(k.key));
        if ours && tree.remove_file(&tmp, ent.dst_depth())? {
            count += 1;
            let (d, depth) = parent_at(plan, e as usize);
            dirs.insert(d, depth);
        }
    }
    for (d, depth) in dirs {
        tree.fsync_dir(&d, depth)?;
    }
    failpoints::hit("cancel::temps_removed")?;
    Ok(count)
}
