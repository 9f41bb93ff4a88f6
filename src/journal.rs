//! Per-rank journals: the durable memory of which units are finished.
//!
//! Each rank of each attempt appends to its own file `journal.a{attempt}.r{rank}`; no file is ever
//! appended to by two runs, so a torn tail left by a crash is simply the end of that file. The
//! file starts with a 32-byte header (magic, version, rank, attempt, the CRC of the plan it
//! belongs to, its own CRC) written atomically; then fixed 32-byte records, each with its own
//! CRC32. A record says "unit U (LEN bytes, data CRC C) is durable under its temporary name": it
//! is written only after the unit's data was fsynced and the temporary file's directory entry was
//! made durable, and records are fsynced in batches. A second kind, "void entry E", is written at
//! the start of an attempt that found E's temporary file gone or short: it cancels every record of
//! E's units from earlier attempts, so bytes journaled for a temporary file that no longer exists
//! are never vouched for by a new file of the same name. A third kind, "entry E's temporary file
//! is inode I", is written with the first record of a temporary file ferry created: only that
//! very file (its inode, its device, and the source version its bytes were read from) is ever
//! reopened, trusted, renamed or removed as E's; a file of the same name and size that the journal
//! does not name is never trusted. Reading keeps every record that checks out
//! and discards the rest (their units are redone); a header that does not check out is an
//! `integrity` error naming the file, never a silent fresh start.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::failpoints;
use crate::fsio;
use crate::plan::Plan;
use crate::state::TransferDir;

/// Bytes in the header and in each record.
pub const RECORD_SIZE: usize = 32;
const MAGIC: &[u8; 8] = b"FERRYJNL";
const VERSION: u32 = 1;
const KIND_UNIT: u8 = 1;
const KIND_VOID: u8 = 2;
const KIND_TEMP: u8 = 3;
/// Records buffered before a flush.
const BATCH: usize = 64;
/// Longest time a finished unit waits in the buffer.
const BATCH_TIME: Duration = Duration::from_millis(200);

/// "This unit is durable under its temporary name."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitDone {
    /// Index of the unit in the plan.
    pub unit: u32,
    /// Its length.
    pub len: u64,
    /// CRC32 of its bytes.
    pub crc: u32,
}

impl UnitDone {
    /// The 32-byte record.
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0] = 0xFE;
        b[1] = KIND_UNIT;
        b[4..8].copy_from_slice(&self.unit.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        let c = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decode a record; `None` if it does not check out.
    pub fn decode(b: &[u8]) -> Option<UnitDone> {
        if b.len() != RECORD_SIZE || b[0] != 0xFE || b[1] != KIND_UNIT {
            return None;
        }
        let c = u32::from_le_bytes(b[28..32].try_into().ok()?);
        if crc32fast::hash(&b[..28]) != c {
            return None;
        }
        Some(UnitDone {
            unit: u32::from_le_bytes(b[4..8].try_into().ok()?),
            len: u64::from_le_bytes(b[8..16].try_into().ok()?),
            crc: u32::from_le_bytes(b[16..20].try_into().ok()?),
        })
    }
}

/// A temporary file ferry created for an entry, as the journal records it: the attempt that made
/// it (part of its name), its inode and device, and the source version its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TempId {
    /// The attempt that created it (its name carries this number).
    pub gen: u32,
    /// Its inode.
    pub ino: u64,
    /// A hash of its device.
    pub dev: u32,
    /// A hash of the source's identity (device, inode, size, mtime, ctime) when it was made.
    pub src: u32,
}

impl TempId {
    /// Whether `key` (see [`crate::fsio::FileKey`]) is this very file.
    pub fn is(&self, key: (u32, u64)) -> bool {
        (self.dev, self.ino) == key
    }

    /// The key of this file, as [`crate::fsio::FileKey::key`] gives it.
    pub fn key(&self) -> (u32, u64) {
        (self.dev, self.ino)
    }
}

/// What a temporary file's record keeps besides its inode: its birth time (hashed; file systems
/// without birth times: nothing). An inode number is reused once its file is deleted, and a birth
/// time tells the new file from the old one. The device number is left out on purpose: on NFS,
/// CephFS or BeeGFS each client node has its own, and it changes on a remount, while the inode
/// is the server's.
pub fn dev_hash(born: Option<(i64, u32)>) -> u32 {
    let mut b = [0u8; 12];
    if let Some((s, ns)) = born {
        b[..8].copy_from_slice(&s.to_le_bytes());
        b[8..12].copy_from_slice(&ns.to_le_bytes());
    }
    crc32fast::hash(&b)
}

/// The identity of a version of a source file: any change of inode, size, modification or change
/// time gives another value (not of the device number, which differs between client nodes of a
/// parallel file system).
pub fn src_hash(ino: u64, size: u64, mtime: (i64, u32), ctime: (i64, u32)) -> u32 {
    let mut b = [0u8; 48];
    b[8..16].copy_from_slice(&ino.to_le_bytes());
    b[16..24].copy_from_slice(&size.to_le_bytes());
    b[24..32].copy_from_slice(&mtime.0.to_le_bytes());
    b[32..36].copy_from_slice(&mtime.1.to_le_bytes());
    b[36..44].copy_from_slice(&ctime.0.to_le_bytes());
    b[44..48].copy_from_slice(&ctime.1.to_le_bytes());
    crc32fast::hash(&b)
}

/// [`src_hash`] of a source's `fstat`/`lstat`.
pub fn src_hash_of(st: &rustix::fs::Stat) -> u32 {
    src_hash(
        st.st_ino,
        st.st_size as u64,
        (st.st_mtime, st.st_mtime_nsec as u32),
        (st.st_ctime, st.st_ctime_nsec as u32),
    )
}

/// [`src_hash_of`] from a source's metadata as std reads it.
pub fn src_hash_of_meta(md: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    src_hash(
        md.ino(),
        md.size(),
        (md.mtime(), md.mtime_nsec() as u32),
        (md.ctime(), md.ctime_nsec() as u32),
    )
}

/// Each entry's temporary file, by entry index.
pub type Idents = HashMap<u32, TempId>;

fn encode_temp(entry: u32, id: &TempId) -> [u8; RECORD_SIZE] {
    let mut b = [0u8; RECORD_SIZE];
    b[0] = 0xFE;
    b[1] = KIND_TEMP;
    b[4..8].copy_from_slice(&entry.to_le_bytes());
    b[8..12].copy_from_slice(&id.gen.to_le_bytes());
    b[12..20].copy_from_slice(&id.ino.to_le_bytes());
    b[20..24].copy_from_slice(&id.dev.to_le_bytes());
    b[24..28].copy_from_slice(&id.src.to_le_bytes());
    let c = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&c.to_le_bytes());
    b
}

fn decode_temp(b: &[u8]) -> Option<(u32, TempId)> {
    if b.len() != RECORD_SIZE || b[0] != 0xFE || b[1] != KIND_TEMP {
        return None;
    }
    let c = u32::from_le_bytes(b[28..32].try_into().ok()?);
    if crc32fast::hash(&b[..28]) != c {
        return None;
    }
    let u = |r: std::ops::Range<usize>| u32::from_le_bytes(b[r].try_into().unwrap_or([0; 4]));
    Some((
        u(4..8),
        TempId {
            gen: u(8..12),
            ino: u64::from_le_bytes(b[12..20].try_into().ok()?),
            dev: u(20..24),
            src: u(24..28),
        },
    ))
}

fn header(rank: u32, attempt: u32, plan_crc: u32) -> [u8; RECORD_SIZE] {
    let mut b = [0u8; RECORD_SIZE];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&rank.to_le_bytes());
    b[16..20].copy_from_slice(&attempt.to_le_bytes());
    b[20..24].copy_from_slice(&plan_crc.to_le_bytes());
    let c = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&c.to_le_bytes());
    b
}

struct Inner {
    file: File,
    pending: Vec<u8>,
    /// Directories (with their depth below their anchor) of temporary files created since the
    /// last flush.
    dirs: BTreeMap<PathBuf, u16>,
    oldest: Option<Instant>,
    failed: Option<Error>,
}

/// "Records of entry E's units and temporary file made by attempts up to `upto` describe a file
/// that is gone or not to be trusted." (`upto` 0 in records written before it: the attempts
/// before the one whose journal holds the record.)
fn encode_void(entry: u32, upto: u32) -> [u8; RECORD_SIZE] {
    let mut b = [0u8; RECORD_SIZE];
    b[0] = 0xFE;
    b[1] = KIND_VOID;
    b[4..8].copy_from_slice(&entry.to_le_bytes());
    b[8..12].copy_from_slice(&upto.to_le_bytes());
    let c = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&c.to_le_bytes());
    b
}

fn decode_void(b: &[u8]) -> Option<(u32, u32)> {
    if b.len() != RECORD_SIZE || b[0] != 0xFE || b[1] != KIND_VOID {
        return None;
    }
    let c = u32::from_le_bytes(b[28..32].try_into().ok()?);
    if crc32fast::hash(&b[..28]) != c {
        return None;
    }
    Some((
        u32::from_le_bytes(b[4..8].try_into().ok()?),
        u32::from_le_bytes(b[8..12].try_into().ok()?),
    ))
}

/// One rank's journal for one attempt. Shared by the rank's copy threads.
pub struct Journal {
    path: PathBuf,
    attempt: u32,
    inner: Mutex<Inner>,
    /// Handles of the destination directories whose fsyncs precede a flush.
    tree: fsio::Tree,
}

impl Journal {
    /// Create the journal (its header is durable when this returns).
    pub fn create(td: &TransferDir, attempt: u32, rank: usize, plan_crc: u32) -> Result<Journal> {
        let path = td.journal(attempt, rank);
        fsio::write_atomic(&path, &header(rank as u32, attempt, plan_crc))?;
        let file = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ctx("open", &path)?;
        Ok(Journal {
            path,
            attempt,
            inner: Mutex::new(Inner {
                file,
                pending: Vec::new(),
                dirs: BTreeMap::new(),
                oldest: None,
                failed: None,
            }),
            tree: fsio::Tree::new(),
        })
    }

    /// Record a finished unit. `new_dir` is the directory of a temporary file this unit created
    /// (with its depth below its anchor): it is fsynced before the record is written. Flushes
    /// when the batch is full or old.
    pub fn record(
        &self,
        rec: UnitDone,
        created: Option<(u32, TempId)>,
        new_dir: Option<(&Path, u16)>,
    ) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((e, id)) = created {
            g.pending.extend_from_slice(&encode_temp(e, &id));
        }
        g.pending.extend_from_slice(&rec.encode());
        if let Some((d, depth)) = new_dir {
            g.dirs.insert(d.to_path_buf(), depth);
        }
        let oldest = *g.oldest.get_or_insert_with(Instant::now);
        if g.pending.len() >= BATCH * RECORD_SIZE || oldest.elapsed() >= BATCH_TIME {
            self.flush_locked(&mut g)?;
        }
        Ok(())
    }

    /// Durably void the earlier attempts' records of `entries` (call before copying anything).
    pub fn void(&self, entries: &[u32]) -> Result<()> {
        self.void_upto(entries, self.attempt.saturating_sub(1))
    }

    /// Durably void every record of `entries` so far, this attempt's included: what they vouch
    /// for was found wrong (a read-back or HDF5 check); a later attempt copies them again into new
    /// temporary files.
    pub fn void_all(&self, entries: &[u32]) -> Result<()> {
        self.void_upto(entries, self.attempt)
    }

    fn void_upto(&self, entries: &[u32], upto: u32) -> Result<()> {
        {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            for &e in entries {
                g.pending.extend_from_slice(&encode_void(e, upto));
            }
        }
        self.flush()
    }

    /// Note the temporary file `id` of `entry` (written out with the next flush).
    pub fn note_created(&self, entry: u32, id: TempId, dir: (&Path, u16)) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &g.failed {
            return Err(e.clone());
        }
        g.dirs.insert(dir.0.to_path_buf(), dir.1);
        g.pending.extend_from_slice(&encode_temp(entry, &id));
        g.oldest.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Append the records of units made durable together (by one `syncfs`, which also made
    /// their temporary files' names durable), with the temporary files they created, and write
    /// them out with one fsync.
    pub fn record_synced(&self, recs: &[UnitDone], created: &[(u32, TempId)]) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (e, id) in created {
            g.pending.extend_from_slice(&encode_temp(*e, id));
        }
        for r in recs {
            g.pending.extend_from_slice(&r.encode());
        }
        g.oldest.get_or_insert_with(Instant::now);
        self.flush_locked(&mut g)
    }

    /// Make every recorded unit durable in the journal.
    pub fn flush(&self) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.flush_locked(&mut g)
    }

    fn flush_locked(&self, g: &mut Inner) -> Result<()> {
        if let Some(e) = &g.failed {
            // A failed write or fsync is never retried and trusted.
            return Err(e.clone());
        }
        if g.pending.is_empty() {
            return Ok(());
        }
        let res = (|| {
            for (d, depth) in std::mem::take(&mut g.dirs) {
                self.tree.fsync_dir(&d, depth)?;
            }
            failpoints::io("journal::append", &self.path)?;
            g.file.write_all(&g.pending).ctx("write", &self.path)?;
            failpoints::io("journal::written", &self.path)?;
            fsio::sync_data(&g.file, &self.path)?;
            failpoints::hit("journal::synced")
        })();
        match res {
            Ok(()) => {
                g.pending.clear();
                g.oldest = None;
                Ok(())
            }
            Err(e) => {
                g.failed = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// What the journals say.
#[derive(Debug, Default)]
pub struct Scan {
    /// Units recorded as durable, by unit index.
    pub units: HashMap<u32, UnitDone>,
    /// The temporary file of each entry, as recorded when it was created.
    pub idents: Idents,
    /// Records discarded as torn, corrupt or not matching the plan.
    pub discarded: usize,
    /// Journal files read.
    pub files: usize,
    /// The highest attempt number seen.
    pub last_attempt: u32,
}

/// Read every journal of the transfer against its plan. A void record of entry E with limit L
/// cancels every record of E made by attempts up to L (a void written when an attempt starts:
/// the earlier attempts; one written after a failed check: that attempt too); the latest
/// surviving record of a unit or a temporary file counts.
pub fn scan(td: &TransferDir, plan: &Plan, plan_crc: u32) -> Result<Scan> {
    let mut out = Scan::default();
    let mut units: Vec<(u32, UnitDone)> = Vec::new();
    let mut temps: Vec<(u32, u32, TempId)> = Vec::new();
    let mut upto: HashMap<u32, u32> = HashMap::new();
    for (attempt, path) in td.journals()? {
        let bytes = std::fs::read(&path).ctx("read", &path)?;
        check_header(&bytes, &path, plan_crc)?;
        out.files += 1;
        out.last_attempt = out.last_attempt.max(attempt);
        let body = &bytes[RECORD_SIZE..];
        if body.len() % RECORD_SIZE != 0 {
            out.discarded += 1; // a torn tail
        }
        for chunk in body.chunks_exact(RECORD_SIZE) {
            if let Some(r) = UnitDone::decode(chunk) {
                if (r.unit as usize) < plan.n_units() && plan.unit(r.unit).len == r.len {
                    units.push((attempt, r));
                    continue;
                }
            } else if let Some((e, limit)) = decode_void(chunk) {
                let limit = if limit == 0 {
                    attempt.saturating_sub(1)
                } else {
                    limit
                };
                let u = upto.entry(e).or_insert(0);
                *u = (*u).max(limit);
                continue;
            } else if let Some((e, id)) = decode_temp(chunk) {
                if (e as usize) < plan.n_entries() {
                    temps.push((attempt, e, id));
                    continue;
                }
            }
            out.discarded += 1;
        }
    }
    let alive = |e: u32, attempt: u32| upto.get(&e).is_none_or(|&l| attempt > l);
    units.sort_by_key(|(a, _)| *a);
    for (a, r) in units {
        if alive(plan.unit(r.unit).entry, a) {
            out.units.insert(r.unit, r);
        }
    }
    temps.sort_by_key(|(a, _, _)| *a);
    for (a, e, id) in temps {
        if alive(e, a) {
            out.idents.insert(e, id);
        }
    }
    if out.discarded > 0 {
        log::warn!(
            "journals of {}: {} torn or corrupt record(s) discarded; their units are redone",
            td.id,
            out.discarded
        );
    }
    Ok(out)
}

fn check_header(bytes: &[u8], path: &Path, plan_crc: u32) -> Result<()> {
    let bad = |why: &str| {
        Error::integrity(path, format!("journal header is unreadable ({why})"))
            .with_op("read-state")
    };
    if bytes.len() < RECORD_SIZE {
        return Err(bad("file too short"));
    }
    let h = &bytes[..RECORD_SIZE];
    if &h[..8] != MAGIC {
        return Err(bad("not a ferry journal"));
    }
    let crc = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if crc32fast::hash(&h[..28]) != crc {
        return Err(bad("checksum mismatch"));
    }
    match u32::from_le_bytes([h[8], h[9], h[10], h[11]]) {
        VERSION => {}
        v if v > VERSION => {
            return Err(Error::newer_format(
                path,
                "journal",
                v as u64,
                VERSION as u64,
                true,
            ))
        }
        _ => return Err(bad("unknown version")),
    }
    if u32::from_le_bytes([h[20], h[21], h[22], h[23]]) != plan_crc {
        return Err(bad("it belongs to a different plan"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity of a source's version is the same whether read with `fstat` (the resume's
    /// check) or through std's metadata (the copy's): else every resume would void everything.
    #[test]
    fn a_source_version_hashes_alike_from_fstat_and_from_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"some bytes").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let st = rustix::fs::fstat(&f).unwrap();
        let md = f.metadata().unwrap();
        assert_eq!(src_hash_of(&st), src_hash_of_meta(&md));
        std::fs::write(&p, b"other bytes, longer").unwrap();
        assert_ne!(src_hash_of(&st), src_hash_of_meta(&f.metadata().unwrap()));
    }

    #[test]
    fn records_round_trip_and_detect_flips() {
        let r = UnitDone {
            unit: 7,
            len: 1 << 33,
            crc: 0xdeadbeef,
        };
        let b = r.encode();
        assert_eq!(UnitDone::decode(&b), Some(r));
        for i in 0..RECORD_SIZE {
            let mut c = b;
            c[i] ^= 0x04;
            assert_eq!(UnitDone::decode(&c), None, "flip at byte {i}");
        }
        assert_eq!(UnitDone::decode(&b[..31]), None);
    }

    #[test]
    fn headers_bind_to_their_plan() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        std::fs::write(&p, header(0, 1, 42)).unwrap();
        check_header(&std::fs::read(&p).unwrap(), &p, 42).unwrap();
        let e = check_header(&std::fs::read(&p).unwrap(), &p, 43).unwrap_err();
        assert_eq!(e.class, crate::ErrorClass::Integrity);
        assert!(check_header(b"short", &p, 42).is_err());
    }
}

/// Follows a transfer's journals as they grow (for a progress bar that sees every rank's work
/// without any collective): reads only what was appended since the last look.
#[derive(Debug, Default)]
pub struct Watch {
    offsets: HashMap<PathBuf, u64>,
    seen: std::collections::HashSet<u32>,
    bytes: u64,
}

impl Watch {
    /// Bytes of distinct units recorded so far in `td`'s journals (records that do not check out
    /// are skipped; a journal that cannot be read is skipped this time).
    pub fn poll(&mut self, td: &TransferDir) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(files) = td.journals() else {
            return self.bytes;
        };
        for (_, path) in files {
            let off = *self.offsets.get(&path).unwrap_or(&(RECORD_SIZE as u64));
            let Ok(mut f) = File::open(&path) else {
                continue;
            };
            if f.seek(SeekFrom::Start(off)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_err() {
                continue;
            }
            let whole = buf.len() / RECORD_SIZE * RECORD_SIZE;
            for rec in buf[..whole].chunks(RECORD_SIZE) {
                if let Some(r) = UnitDone::decode(rec) {
                    if self.seen.insert(r.unit) {
                        self.bytes += r.len;
                    }
                }
            }
            self.offsets.insert(path, off + whole as u64);
        }
        self.bytes
    }
}
