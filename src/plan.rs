//! The collective transfer plan: what is copied where, cut into units, and which rank copies what.
//!
//! A plan is built once (by walking the sources) and written to the state directory before any
//! data moves; every later run of the same transfer reads it back, so resume never re-walks the
//! sources. Entries are directories, regular files and symlinks with the metadata to restore;
//! files larger than the chunk size become several units so several ranks can copy one file.
//! The assignment of units to ranks is not stored: it is a pure function of the plan, the units
//! still to do and the number of ranks, so a resume may use another rank count (shared layout).
//! This module reads the source tree but never writes anything.

use std::collections::{BinaryHeap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorClass, IoContext, Result};

/// The plan format version written into plan files.
pub const FORMAT: u32 = 1;

/// How the sources are visible to the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Every rank sees every source; work is balanced by bytes, big files are split.
    Shared,
    /// Each rank holds its own files; a rank copies only what it holds.
    Local,
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shared" => Ok(Layout::Shared),
            "local" => Ok(Layout::Local),
            _ => Err(format!("unknown layout '{s}' (use shared or local)")),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Shared => "shared",
            Layout::Local => "local",
        })
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A directory (created, its mode and mtime restored once its contents are in place).
    Dir,
    /// A regular file (copied in units).
    File,
    /// A symbolic link (recreated with the same target, never followed).
    Symlink,
}

/// One thing to create at the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Directory, file or symlink.
    pub kind: Kind,
    /// Absolute source path.
    #[serde(with = "crate::pathser")]
    pub src: PathBuf,
    /// Absolute destination path.
    #[serde(with = "crate::pathser")]
    pub dst: PathBuf,
    /// Size in bytes (files).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Symlink target.
    #[serde(
        with = "crate::pathser::opt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub target: Option<PathBuf>,
    /// Local layout: the rank that holds the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<usize>,
    /// Inode of the source when planned (a source is removed only if it is still this file).
    #[serde(default)]
    pub ino: u64,
    /// Device of the source when planned (0 in plans written before it).
    #[serde(default)]
    pub dev: u64,
    /// Change time of the source when planned (seconds, nanoseconds; zero in older plans).
    #[serde(default)]
    pub ctime: (i64, u32),
    /// How many components of `src` lie below the directory the user named, its *anchor*: a
    /// root directory 0, a file in it 1. Every directory below an anchor is opened without
    /// following a symlink (`fsio::Tree`). Plans written before it: 1.
    #[serde(default = "one")]
    pub depth: u16,
    /// The root directory this entry belongs to lies inside the destination the user named
    /// (several sources copied into DST): its `dst` has one more component below its anchor.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_dest: bool,
}

fn one() -> u16 {
    1
}

impl Entry {
    /// Components of `dst` below its anchor (see [`Entry::depth`]).
    pub fn dst_depth(&self) -> u16 {
        self.depth + self.in_dest as u16
    }
}

/// A piece of one file: the smallest thing a rank copies and journals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// Index of the file entry.
    pub entry: u32,
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes (0 only for an empty file's single unit).
    pub len: u64,
}

/// The collective transfer plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Plan format version.
    pub format: u32,
    /// The transfer id.
    pub id: String,
    /// Shared or local.
    pub layout: Layout,
    /// Files above this size are split into units of this size.
    pub chunk_size: u64,
    /// Ranks of the run that made the plan (the local layout needs the same count on resume).
    pub ranks: usize,
    /// When the plan was made (RFC 3339, UTC).
    pub created: String,
    /// Who made it.
    pub user: String,
    /// Where it was made.
    pub host: String,
    /// The sources as typed (with `{rank}` if used).
    pub sources: Vec<String>,
    /// The destination as typed.
    pub dest: String,
    /// Remove sources once committed.
    pub delete_source: bool,
    /// Re-read and compare destination units before the commit.
    pub verify: bool,
    /// `--preserve`: keep owners, groups and extended attributes too.
    #[serde(default)]
    pub preserve: bool,
    /// Copy threads per rank.
    pub threads: usize,
    /// A random token of this plan, part of every temporary name (`.ferry-ID-NONCE-E-G.tmp`):
    /// two transfers of one id (every AXL transfer with a state file is `xfer`) never share a
    /// temporary name. Empty in plans written before it.
    #[serde(default)]
    pub nonce: String,
    /// Everything to create, parents before children (in a slice: only the entries held).
    pub entries: Vec<Entry>,
    /// The file pieces to copy (in a slice: only the units held).
    pub units: Vec<Unit>,
    /// In a rank's slice: the plan-wide index of each held entry, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entry_ids: Vec<u32>,
    /// In a rank's slice: the plan-wide index of each held unit, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unit_ids: Vec<u32>,
    /// In a rank's slice: the figures of the whole plan. `None` for the whole plan itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<Totals>,
}

/// A rank's slice of a plan, borrowing the plan's entries; it serializes exactly as the
/// [`Plan`] that [`Plan::slice`] returns (the field names and order are the same).
#[derive(Debug, Serialize)]
pub struct SliceView<'a> {
    format: u32,
    id: &'a str,
    layout: Layout,
    chunk_size: u64,
    ranks: usize,
    created: &'a str,
    user: &'a str,
    host: &'a str,
    sources: &'a [String],
    dest: &'a str,
    delete_source: bool,
    verify: bool,
    preserve: bool,
    threads: usize,
    nonce: &'a str,
    entries: Vec<&'a Entry>,
    units: Vec<Unit>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entry_ids: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unit_ids: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    whole: Option<Totals>,
}

/// The figures of a whole plan, carried by each rank's slice of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Entries in the plan.
    pub entries: usize,
    /// Units in the plan.
    pub units: usize,
    /// Regular files.
    pub files: usize,
    /// Directories.
    pub dirs: usize,
    /// Symlinks.
    pub symlinks: usize,
    /// Bytes of all units.
    pub bytes: u64,
}

impl Plan {
    /// Total bytes of all units (of the whole plan, also in a slice).
    pub fn bytes_total(&self) -> u64 {
        match self.whole {
            Some(t) => t.bytes,
            None => self.units.iter().map(|u| u.len).sum(),
        }
    }

    /// Count entries of a kind (in the whole plan, also in a slice).
    pub fn count(&self, kind: Kind) -> usize {
        match (self.whole, kind) {
            (Some(t), Kind::File) => t.files,
            (Some(t), Kind::Dir) => t.dirs,
            (Some(t), Kind::Symlink) => t.symlinks,
            (None, _) => self.entries.iter().filter(|e| e.kind == kind).count(),
        }
    }

    /// Entries in the whole plan.
    pub fn n_entries(&self) -> usize {
        self.whole.map_or(self.entries.len(), |t| t.entries)
    }

    /// Units in the whole plan.
    pub fn n_units(&self) -> usize {
        self.whole.map_or(self.units.len(), |t| t.units)
    }

    /// Whether this is one rank's slice rather than the whole plan.
    pub fn is_slice(&self) -> bool {
        self.whole.is_some()
    }

    /// Entry `e` (plan-wide index). In a slice, only held entries may be asked for: asking for
    /// another is a bug in who was sent what.
    pub fn entry(&self, e: usize) -> &Entry {
        if self.whole.is_none() {
            return &self.entries[e];
        }
        match self.entry_ids.binary_search(&(e as u32)) {
            Ok(i) => &self.entries[i],
            Err(_) => panic!("entry {e} is not in this rank's slice of the plan"),
        }
    }

    /// Unit `u` (plan-wide index); in a slice, only a held one.
    pub fn unit(&self, u: u32) -> Unit {
        if self.whole.is_none() {
            return self.units[u as usize];
        }
        match self.unit_ids.binary_search(&u) {
            Ok(i) => self.units[i],
            Err(_) => panic!("unit {u} is not in this rank's slice of the plan"),
        }
    }

    /// The destination directories rank `me` of `nranks` writes whole trees into: the top-level
    /// directory entries it holds (shared layout: rank 0, for all; local layout: each rank, for
    /// its own). A run locks them so that two transfers never fill one tree at once.
    pub fn dest_roots(&self, me: usize, nranks: usize) -> Vec<PathBuf> {
        let held = self.held_entries();
        let mine: Vec<&Entry> = held
            .iter()
            .map(|&e| self.entry(e))
            .filter(|e| match (self.layout, e.holder) {
                (Layout::Local, Some(h)) => h == me,
                _ => me == 0 || nranks == 0,
            })
            .collect();
        let dirs: std::collections::HashSet<&Path> = mine
            .iter()
            .filter(|e| e.kind == Kind::Dir)
            .map(|e| e.dst.as_path())
            .collect();
        mine.iter()
            .filter(|e| e.kind == Kind::Dir && !e.dst.parent().is_some_and(|p| dirs.contains(p)))
            .map(|e| e.dst.clone())
            .collect()
    }

    /// Plan-wide indices of the entries held (all of them in the whole plan).
    pub fn held_entries(&self) -> Vec<usize> {
        if self.whole.is_none() {
            (0..self.entries.len()).collect()
        } else {
            self.entry_ids.iter().map(|&e| e as usize).collect()
        }
    }

    /// The plan-wide indices of entry `e`'s units, in offset order (units are made entry by
    /// entry, so they are contiguous and found by binary search).
    pub fn units_of(&self, e: usize) -> Vec<u32> {
        let e = e as u32;
        let lo = self.units.partition_point(|u| u.entry < e);
        let hi = self.units.partition_point(|u| u.entry <= e);
        if self.whole.is_none() {
            (lo as u32..hi as u32).collect()
        } else {
            self.unit_ids[lo..hi].to_vec()
        }
    }

    /// The slice of this (whole) plan holding `entries` and `units` (plan-wide indices; the
    /// entries of the units are added), for one rank.
    pub fn slice(
        &self,
        entries: &std::collections::BTreeSet<u32>,
        units: &std::collections::BTreeSet<u32>,
    ) -> Plan {
        let mut ents: std::collections::BTreeSet<u32> = entries.clone();
        ents.extend(units.iter().map(|&u| self.units[u as usize].entry));
        Plan {
            entries: ents
                .iter()
                .map(|&e| self.entries[e as usize].clone())
                .collect(),
            units: units.iter().map(|&u| self.units[u as usize]).collect(),
            entry_ids: ents.into_iter().collect(),
            unit_ids: units.iter().copied().collect(),
            whole: Some(Totals {
                entries: self.entries.len(),
                units: self.units.len(),
                files: self.count(Kind::File),
                dirs: self.count(Kind::Dir),
                symlinks: self.count(Kind::Symlink),
                bytes: self.bytes_total(),
            }),
            ..self.header()
        }
    }

    /// What [`Plan::slice`] makes, borrowed from this plan: it encodes to the same bytes
    /// without copying the entries (rank 0 encodes every rank's slice of a large plan).
    pub fn slice_view<'a>(
        &'a self,
        entries: &std::collections::BTreeSet<u32>,
        units: &std::collections::BTreeSet<u32>,
    ) -> SliceView<'a> {
        let mut ents: std::collections::BTreeSet<u32> = entries.clone();
        ents.extend(units.iter().map(|&u| self.units[u as usize].entry));
        SliceView {
            format: self.format,
            id: &self.id,
            layout: self.layout,
            chunk_size: self.chunk_size,
            ranks: self.ranks,
            created: &self.created,
            user: &self.user,
            host: &self.host,
            sources: &self.sources,
            dest: &self.dest,
            delete_source: self.delete_source,
            verify: self.verify,
            preserve: self.preserve,
            threads: self.threads,
            nonce: &self.nonce,
            entries: ents.iter().map(|&e| &self.entries[e as usize]).collect(),
            units: units.iter().map(|&u| self.units[u as usize]).collect(),
            entry_ids: ents.into_iter().collect(),
            unit_ids: units.iter().copied().collect(),
            whole: self.header().whole,
        }
    }

    /// The plan without entries and units (what a rank needs before it gets its slice).
    pub fn header(&self) -> Plan {
        Plan {
            format: self.format,
            id: self.id.clone(),
            layout: self.layout,
            chunk_size: self.chunk_size,
            ranks: self.ranks,
            created: self.created.clone(),
            user: self.user.clone(),
            host: self.host.clone(),
            sources: self.sources.clone(),
            dest: self.dest.clone(),
            delete_source: self.delete_source,
            verify: self.verify,
            preserve: self.preserve,
            threads: self.threads,
            nonce: self.nonce.clone(),
            entries: Vec::new(),
            units: Vec::new(),
            entry_ids: Vec::new(),
            unit_ids: Vec::new(),
            whole: Some(Totals {
                entries: self.n_entries(),
                units: self.n_units(),
                files: self.count(Kind::File),
                dirs: self.count(Kind::Dir),
                symlinks: self.count(Kind::Symlink),
                bytes: self.bytes_total(),
            }),
        }
    }

    /// Add another slice's entries and units to this slice.
    pub fn absorb(&mut self, other: Plan) {
        let mut ents: std::collections::BTreeMap<u32, Entry> = self
            .entry_ids
            .drain(..)
            .zip(self.entries.drain(..))
            .collect();
        ents.extend(other.entry_ids.into_iter().zip(other.entries));
        let mut units: std::collections::BTreeMap<u32, Unit> =
            self.unit_ids.drain(..).zip(self.units.drain(..)).collect();
        units.extend(other.unit_ids.into_iter().zip(other.units));
        (self.entry_ids, self.entries) = ents.into_iter().unzip();
        (self.unit_ids, self.units) = units.into_iter().unzip();
    }

    /// The rank that finalises entry `e` (renames it, restores metadata, removes a file's
    /// source): its holder in the local layout; otherwise the rank chosen by the directory that
    /// holds it (a hash of that path). So every file of a directory is renamed by one rank,
    /// which alone fsyncs that directory: the commit issues O(directories) directory fsyncs in
    /// all, spread over the ranks, not one per rank and directory. (Copying is balanced by
    /// bytes on its own; source directories are removed by rank 0, deepest first.)
    pub fn owner(&self, e: usize, nranks: usize) -> usize {
        let ent = self.entry(e);
        match (self.layout, ent.holder) {
            (Layout::Local, Some(h)) => h,
            _ => {
                let dir = crate::fsio::parent_of(&ent.dst);
                (fnv1a(dir.as_os_str().as_bytes()) % nranks.max(1) as u64) as usize
            }
        }
    }

    /// Assign `todo` units to `nranks` ranks. Shared: greedy by bytes (largest first, to the rank
    /// with the fewest bytes, then fewest units), so loads differ by at most one unit. Local: each
    /// unit to its holder; the rank count must equal the planning run's.
    pub fn assign(&self, todo: &[u32], nranks: usize) -> Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); nranks];
        match self.layout {
            Layout::Local => {
                if nranks != self.ranks {
                    return Err(Error::usage(format!(
                        "transfer {} uses the local layout and was planned on {} ranks; \
                         each rank's sources are visible to that rank only, so it must be \
                         resumed on {} ranks, not {}",
                        self.id, self.ranks, self.ranks, nranks
                    )));
                }
                for &u in todo {
                    let e = &self.entries[self.units[u as usize].entry as usize];
                    out[e.holder.unwrap_or(0)].push(u);
                }
            }
            Layout::Shared => {
                let mut order: Vec<u32> = todo.to_vec();
                order.sort_by_key(|&u| (std::cmp::Reverse(self.units[u as usize].len), u));
                let mut heap: BinaryHeap<std::cmp::Reverse<(u64, usize, usize)>> =
                    (0..nranks).map(|r| std::cmp::Reverse((0, 0, r))).collect();
                for u in order {
                    let std::cmp::Reverse((bytes, count, r)) =
                        heap.pop().ok_or_else(|| Error::internal("no ranks"))?;
                    out[r].push(u);
                    let len = self.units[u as usize].len;
                    heap.push(std::cmp::Reverse((bytes + len, count + 1, r)));
                }
            }
        }
        for v in &mut out {
            v.sort_by_key(|&u| (self.units[u as usize].entry, self.units[u as usize].offset));
        }
        Ok(out)
    }
}

/// Refuse a destination path the system cannot create: longer than PATH_MAX (with `temp` bytes
/// for a temporary name beside it) or with a component longer than NAME_MAX.
fn check_length(dst: &Path, temp: usize) -> Result<()> {
    let bytes = dst.as_os_str().len();
    let parent = parent_len(dst);
    if bytes >= PATH_MAX || parent + 1 + temp >= PATH_MAX {
        return Err(Error::usage(format!(
            "destination path is {bytes} bytes long; the system allows {} (PATH_MAX, with room \
             for ferry's temporary name beside it): choose a shorter destination",
            PATH_MAX - 1 - temp.min(PATH_MAX - 1)
        ))
        .with_path(dst));
    }
    if let Some(c) = dst.components().find(|c| c.as_os_str().len() > NAME_MAX) {
        return Err(Error::usage(format!(
            "a name in the destination path is {} bytes long; the system allows {NAME_MAX} \
             (NAME_MAX)",
            c.as_os_str().len()
        ))
        .with_path(dst));
    }
    Ok(())
}

fn parent_len(p: &Path) -> usize {
    p.parent().map(|q| q.as_os_str().len()).unwrap_or(0)
}

/// Cut file entries into units of at most `chunk` bytes (an empty file is one empty unit).
pub fn make_units(entries: &[Entry], chunk: u64) -> Vec<Unit> {
    let mut units = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind != Kind::File {
            continue;
        }
        if e.size == 0 {
            units.push(Unit {
                entry: i as u32,
                offset: 0,
                len: 0,
            });
            continue;
        }
        let mut off = 0;
        while off < e.size {
            let len = chunk.min(e.size - off);
            units.push(Unit {
                entry: i as u32,
                offset: off,
                len,
            });
            off += len;
        }
    }
    units
}

/// Replace `{rank}` in a path template.
pub fn subst_rank(template: &OsStr, rank: usize) -> PathBuf {
    let bytes = template.as_bytes();
    let pat = b"{rank}";
    let r = rank.to_string();
    let mut out = Vec::with_capacity(bytes.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(pat) {
            out.extend_from_slice(r.as_bytes());
            i += pat.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Whether a path template names `{rank}`.
pub fn has_rank(template: &OsStr) -> bool {
    template.as_bytes().windows(6).any(|w| w == b"{rank}")
}

/// Make `p` absolute and free of `.`/`..` and symlinks in its existing part (the part that does
/// not exist yet is appended lexically).
pub fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .ctx("getcwd", Path::new("."))?
            .join(p)
    };
    let mut existing = abs.clone();
    let mut rest: Vec<OsString> = Vec::new();
    loop {
        match fs::canonicalize(&existing) {
            Ok(c) => {
                let mut out = c;
                for part in rest.iter().rev() {
                    match Path::new(part).components().next() {
                        Some(Component::ParentDir) => {
                            out.pop();
                        }
                        Some(Component::CurDir) | None => {}
                        _ => out.push(part),
                    }
                }
                return Ok(out);
            }
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => {
                    // `..` at the end or the root itself: normalise lexically.
                    return Ok(abs.components().collect());
                }
            },
        }
    }
}

fn time_of(secs: i64, nsec: i64) -> (i64, u32) {
    (secs, nsec.clamp(0, 999_999_999) as u32)
}

fn entry_from(
    kind: Kind,
    src: &Path,
    dst: &Path,
    md: &fs::Metadata,
    holder: Option<usize>,
    depth: u16,
) -> Entry {
    Entry {
        kind,
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        size: if kind == Kind::File { md.len() } else { 0 },
        mode: md.mode() & 0o7777,
        mtime: time_of(md.mtime(), md.mtime_nsec()),
        target: None,
        holder,
        ino: md.ino(),
        dev: md.dev(),
        ctime: time_of(md.ctime(), md.ctime_nsec()),
        depth,
        in_dest: false,
    }
}

/// What a walk found besides the entries, and how it treats special files.
#[derive(Debug, Default)]
pub struct WalkReport {
    /// Skip sockets, FIFOs and device files with a warning instead of refusing them.
    pub skip_special: bool,
    /// Sockets, FIFOs and device files that were skipped, with a warning.
    pub skipped: Vec<PathBuf>,
}

/// What a special file is, in words.
fn special_kind(ft: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a file, directory or symlink"
    }
}

/// Map sources to destination roots: one directory source becomes `dest` itself; one file source
/// becomes `dest` (or `dest/NAME` when `dest` ends in `/` or is an existing directory); several
/// sources go into `dest/NAME` each.
pub fn roots(
    sources: &[PathBuf],
    dest: &Path,
    dest_typed: &OsStr,
) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    let dest_is_dir = dest_typed.as_bytes().ends_with(b"/") || dest.is_dir();
    for s in sources {
        let md = fs::metadata(s).map_err(|e| {
            Error::io("stat", s, e).context("source does not exist or cannot be read")
        })?;
        let name = s.file_name().ok_or_else(|| {
            Error::usage(format!(
                "source '{}' has no name to copy under",
                s.display()
            ))
        })?;
        let d = if sources.len() > 1 || (!md.is_dir() && dest_is_dir) {
            dest.join(name)
        } else {
            dest.to_path_buf()
        };
        if md.is_dir() {
            if let Ok(dm) = fs::metadata(&d) {
                if !dm.is_dir() {
                    return Err(Error::usage(format!(
                        "destination '{}' exists and is not a directory; '{}' is a directory",
                        d.display(),
                        s.display()
                    )));
                }
            }
        }
        out.push((s.clone(), d));
    }
    Ok(out)
}

/// Walk one source root into entries (parents before children, names in byte order so the same
/// tree gives the same plan). A top-level symlink is followed; symlinks inside are copied as
/// symlinks. `exclude` names paths (e.g. the state directory) that are not copied. `inside`: a
/// directory root lies inside the destination the user named (several sources into DST), which
/// is then its destination anchor (see [`Entry::depth`]).
pub fn walk(
    src: &Path,
    dst: &Path,
    exclude: &[PathBuf],
    holder: Option<usize>,
    inside: bool,
    report: &mut WalkReport,
) -> Result<Vec<Entry>> {
    let md = fs::metadata(src).ctx("stat", src)?;
    let mut out = Vec::new();
    if md.is_dir() {
        out.push(entry_from(Kind::Dir, src, dst, &md, holder, 0));
        walk_dir(src, dst, exclude, holder, &mut out, report)?;
        for e in &mut out {
            e.depth = e.src.strip_prefix(src).map_or(0, |r| r.iter().count()) as u16;
            e.in_dest = inside;
        }
    } else if md.is_file() {
        out.push(entry_from(Kind::File, src, dst, &md, holder, 1));
    } else {
        return Err(Error::usage(format!(
            "source is {}; ferry copies files, directories and symlinks",
            special_kind(&md.file_type())
        ))
        .with_path(src));
    }
    Ok(out)
}

fn walk_dir(
    src: &Path,
    dst: &Path,
    exclude: &[PathBuf],
    holder: Option<usize>,
    out: &mut Vec<Entry>,
    report: &mut WalkReport,
) -> Result<()> {
    // A signal stops a long walk too (nothing is planned yet, so nothing is lost).
    crate::stop::check_signal()?;
    let mut names: Vec<OsString> = Vec::new();
    for ent in fs::read_dir(src).ctx("read-dir", src)? {
        names.push(ent.ctx("read-dir", src)?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let s = src.join(&name);
        if exclude.iter().any(|x| x == &s) {
            continue;
        }
        let d = dst.join(&name);
        let md = match fs::symlink_metadata(&s) {
            Ok(md) => md,
            // Vanished between readdir and stat: the tree is changing under us.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("stat", &s, e)),
        };
        let ft = md.file_type();
        if ft.is_dir() {
            out.push(entry_from(Kind::Dir, &s, &d, &md, holder, 0));
            walk_dir(&s, &d, exclude, holder, out, report)?;
        } else if ft.is_file() {
            out.push(entry_from(Kind::File, &s, &d, &md, holder, 0));
        } else if ft.is_symlink() {
            let mut e = entry_from(Kind::Symlink, &s, &d, &md, holder, 0);
            e.target = Some(fs::read_link(&s).ctx("readlink", &s)?);
            out.push(e);
        } else if report.skip_special {
            log::warn!(
                "skipping '{}': it is {} (--skip-special)",
                s.display(),
                special_kind(&ft)
            );
            report.skipped.push(s);
        } else {
            return Err(Error::usage(format!(
                "it is {}; ferry copies files, directories and symlinks: remove it, or pass \
                 --skip-special to leave such files out",
                special_kind(&ft)
            ))
            .with_op("walk")
            .with_path(&s));
        }
    }
    Ok(())
}

/// The longest path the system accepts (PATH_MAX, the terminating NUL included).
const PATH_MAX: usize = libc::PATH_MAX as usize;
/// The longest name of one path component.
const NAME_MAX: usize = 255;
/// Room for the temporary name beside a file (`.ferry-ID-NONCE-E-G.tmp`, ID at most 64 bytes,
/// a 16-digit nonce, entry and attempt numbers).
const TEMP_NAME_MAX: usize = 7 + 64 + 1 + 16 + 1 + 10 + 1 + 10 + 4;

/// Refuse plans that would write over their own sources: a destination equal to, inside, or
/// containing a source, sources inside one another, two entries with one destination path, or a
/// destination path (or its temporary name) longer than the system allows.
pub fn check_paths(entries: &[Entry], roots: &[(PathBuf, PathBuf)]) -> Result<()> {
    for (i, (a, _)) in roots.iter().enumerate() {
        for (b, _) in &roots[i + 1..] {
            if a.starts_with(b) || b.starts_with(a) {
                let (inner, outer) = if a.starts_with(b) { (a, b) } else { (b, a) };
                return Err(Error::usage(format!(
                    "sources overlap: '{}' is inside '{}' (or the same); give each file once",
                    inner.display(),
                    outer.display()
                ))
                .with_path(inner));
            }
        }
    }
    for (_, d) in roots {
        check_length(d, 0)?;
    }
    for e in entries {
        check_length(
            &e.dst,
            if e.kind == Kind::File {
                TEMP_NAME_MAX
            } else {
                0
            },
        )?;
    }
    for (s, d) in roots {
        if d == s {
            return Err(Error::usage(format!(
                "source and destination are the same path '{}'",
                s.display()
            )));
        }
        if d.starts_with(s) {
            return Err(Error::usage(format!(
                "destination '{}' is inside the source '{}'",
                d.display(),
                s.display()
            )));
        }
        if s.starts_with(d) {
            return Err(Error::usage(format!(
                "source '{}' is inside the destination '{}'",
                s.display(),
                d.display()
            )));
        }
    }
    let mut seen: HashMap<&Path, &Entry> = HashMap::new();
    for e in entries {
        if let Some(prev) = seen.insert(&e.dst, e) {
            if e.kind == Kind::Dir && prev.kind == Kind::Dir {
                continue;
            }
            let who = |x: &Entry| match x.holder {
                Some(r) => format!("rank {r}'s '{}'", x.src.display()),
                None => format!("'{}'", x.src.display()),
            };
            return Err(Error::new(
                ErrorClass::Usage,
                format!(
                    "{} and {} would both be copied to '{}'; give each rank its own \
                     destination (e.g. put {{rank}} in DST)",
                    who(prev),
                    who(e),
                    e.dst.display()
                ),
            ));
        }
    }
    Ok(())
}

/// FNV-1a of `bytes`: a hash every ferry computes alike (who owns an entry, which byte of a lock
/// file stands for a name).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(i: usize, size: u64) -> Entry {
        Entry {
            kind: Kind::File,
            src: PathBuf::from(format!("/s/{i}")),
            dst: PathBuf::from(format!("/d/{i}")),
            size,
            mode: 0o644,
            mtime: (0, 0),
            target: None,
            holder: None,
            ino: 0,
            dev: 0,
            ctime: (0, 0),
            depth: 1,
            in_dest: false,
        }
    }

    fn plan(entries: Vec<Entry>, chunk: u64) -> Plan {
        let units = make_units(&entries, chunk);
        Plan {
            format: FORMAT,
            id: "t".into(),
            layout: Layout::Shared,
            chunk_size: chunk,
            ranks: 1,
            created: String::new(),
            user: String::new(),
            host: String::new(),
            sources: vec![],
            dest: String::new(),
            delete_source: false,
            verify: false,
            preserve: false,
            nonce: String::new(),
            threads: 1,
            entries,
            units,
            entry_ids: Vec::new(),
            unit_ids: Vec::new(),
            whole: None,
        }
    }

    #[test]
    fn files_are_cut_at_the_chunk_size() {
        let c = 100;
        let es = vec![
            file(0, 0),
            file(1, 1),
            file(2, 99),
            file(3, 100),
            file(4, 101),
            file(5, 350),
        ];
        let u = make_units(&es, c);
        let per: Vec<usize> = (0..6)
            .map(|i| u.iter().filter(|x| x.entry == i).count())
            .collect();
        assert_eq!(per, vec![1, 1, 1, 1, 2, 4]);
        let last: Vec<&Unit> = u.iter().filter(|x| x.entry == 5).collect();
        assert_eq!((last[3].offset, last[3].len), (300, 50));
        for (i, e) in es.iter().enumerate() {
            let sum: u64 = u
                .iter()
                .filter(|x| x.entry == i as u32)
                .map(|x| x.len)
                .sum();
            assert_eq!(sum, e.size);
        }
    }

    #[test]
    fn shared_assignment_balances_bytes_within_one_chunk() {
        let chunk = 1 << 20;
        let sizes = [
            5u64 << 20,
            3 << 20,
            1,
            7 << 19,
            12345,
            0,
            9 << 20,
            100,
            2 << 20,
        ];
        let p = plan(
            sizes.iter().enumerate().map(|(i, &s)| file(i, s)).collect(),
            chunk,
        );
        let all: Vec<u32> = (0..p.units.len() as u32).collect();
        for n in 1..=8 {
            let a = p.assign(&all, n).unwrap();
            let loads: Vec<u64> = a
                .iter()
                .map(|v| v.iter().map(|&u| p.units[u as usize].len).sum())
                .collect();
            let (mx, mn) = (*loads.iter().max().unwrap(), *loads.iter().min().unwrap());
            assert!(mx - mn <= chunk, "n={n} loads={loads:?}");
            let mut seen: Vec<u32> = a.concat();
            seen.sort();
            assert_eq!(seen, all, "every unit exactly once");
            assert_eq!(p.assign(&all, n).unwrap(), a, "deterministic");
        }
    }

    #[test]
    fn many_empty_files_spread_by_count() {
        let p = plan((0..40).map(|i| file(i, 0)).collect(), 1 << 20);
        let all: Vec<u32> = (0..40).collect();
        let a = p.assign(&all, 4).unwrap();
        assert!(a.iter().all(|v| v.len() == 10));
    }

    #[test]
    fn local_layout_needs_the_same_rank_count() {
        let mut es: Vec<Entry> = (0..4).map(|i| file(i, 10)).collect();
        for (i, e) in es.iter_mut().enumerate() {
            e.holder = Some(i % 2);
        }
        let mut p = plan(es, 100);
        p.layout = Layout::Local;
        p.ranks = 2;
        let all: Vec<u32> = (0..4).collect();
        assert_eq!(p.assign(&all, 2).unwrap(), vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(p.assign(&all, 3).unwrap_err().class, ErrorClass::Usage);
    }

    #[test]
    fn a_slice_holds_only_what_its_rank_was_given() {
        let p = plan((0..10).map(|i| file(i, 300)).collect(), 100);
        let ents: std::collections::BTreeSet<u32> = [2, 7].into_iter().collect();
        let units: std::collections::BTreeSet<u32> = p.units_of(2).into_iter().collect();
        let mut sl = p.slice(&ents, &units);
        assert!(sl.is_slice());
        assert_eq!((sl.n_entries(), sl.n_units()), (10, 30));
        assert_eq!(sl.bytes_total(), p.bytes_total());
        assert_eq!(sl.entry(7), p.entry(7));
        assert_eq!(sl.units_of(2), p.units_of(2));
        assert!(sl.units_of(7).is_empty(), "units of 7 were not given");
        assert_eq!(sl.held_entries(), vec![2, 7]);
        let more: std::collections::BTreeSet<u32> = p.units_of(9).into_iter().collect();
        sl.absorb(p.slice(&Default::default(), &more));
        assert_eq!(sl.held_entries(), vec![2, 7, 9]);
        assert_eq!(sl.units_of(9), p.units_of(9));
        assert_eq!(sl.unit(p.units_of(9)[1]), p.unit(p.units_of(9)[1]));
        assert!(std::panic::catch_unwind(|| sl.entry(3).size).is_err());
    }

    #[test]
    fn a_slice_view_encodes_as_the_slice_it_borrows() {
        let mut es: Vec<Entry> = (0..6).map(|i| file(i, 250)).collect();
        es[1].target = Some(PathBuf::from("t"));
        es[2].holder = Some(1);
        let p = plan(es, 100);
        let ents: std::collections::BTreeSet<u32> = [1, 2, 5].into_iter().collect();
        let units: std::collections::BTreeSet<u32> = p.units_of(3).into_iter().collect();
        for (e, u) in [
            (&ents, &units),
            (&Default::default(), &units),
            (&ents, &Default::default()),
        ] {
            let owned = serde_json::to_vec(&p.slice(e, u)).unwrap();
            assert_eq!(serde_json::to_vec(&p.slice_view(e, u)).unwrap(), owned);
            let back: Plan = serde_json::from_slice(&owned).unwrap();
            assert_eq!(back, p.slice(e, u));
        }
    }

    #[test]
    fn rank_placeholder() {
        assert_eq!(
            subst_rank(OsStr::new("/bb/{rank}/x{rank}"), 7),
            PathBuf::from("/bb/7/x7")
        );
        assert!(has_rank(OsStr::new("/a/{rank}")));
        assert!(!has_rank(OsStr::new("/a/{ran}")));
    }

    #[test]
    fn duplicate_destinations_are_refused() {
        let mut a = file(0, 1);
        let mut b = file(1, 1);
        a.holder = Some(0);
        b.holder = Some(1);
        b.dst = a.dst.clone();
        let e = check_paths(&[a, b], &[]).unwrap_err();
        assert_eq!(e.class, ErrorClass::Usage);
        assert!(
            e.message.contains("rank 0") && e.message.contains("rank 1"),
            "{}",
            e.message
        );
    }

    #[test]
    fn nested_source_and_destination_are_refused() {
        let s = PathBuf::from("/data/src");
        for d in ["/data/src", "/data/src/sub", "/data"] {
            let r = check_paths(&[], &[(s.clone(), PathBuf::from(d))]);
            assert_eq!(r.unwrap_err().class, ErrorClass::Usage, "{d}");
        }
        assert!(check_paths(&[], &[(s, PathBuf::from("/data/srcX"))]).is_ok());
    }
}
