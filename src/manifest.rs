//! The manifest: what a committed transfer put where (sizes, modes, CRC32s), and the check of a
//! destination against it.
//!
//! The manifest travels inside the commit record, the one proof of completion. A file's CRC32 is
//! the combination of its units' CRCs (crc32fast's `combine`), so nobody re-reads a file to make
//! the manifest. [`verify`] re-reads a destination and compares; it writes nothing.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorClass, IoContext, Result};
use crate::plan::{Kind, Plan};

/// A committed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Destination path.
    #[serde(with = "crate::pathser")]
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// CRC32 of the whole content.
    pub crc32: u32,
}

/// A committed symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Destination path.
    #[serde(with = "crate::pathser")]
    pub path: PathBuf,
    /// Its target.
    #[serde(with = "crate::pathser")]
    pub target: PathBuf,
}

/// Everything a transfer committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Regular files.
    pub files: Vec<FileRecord>,
    /// Symlinks.
    pub symlinks: Vec<LinkRecord>,
    /// Directories.
    #[serde(with = "crate::pathser::vec")]
    pub dirs: Vec<PathBuf>,
    /// Total bytes of the files.
    pub bytes: u64,
}

/// The commit record: written once, atomically, by rank 0 after every rank's files are final.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The transfer id.
    pub id: String,
    /// When it was committed.
    pub time: String,
    /// The attempt that committed it.
    pub attempt: u32,
    /// Ranks of the committing run.
    pub ranks: usize,
    /// What was committed.
    pub manifest: Manifest,
}

/// The CRC32 of a file from its units' (crc, len) in offset order.
pub fn combine(parts: &[(u32, u64)]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for &(crc, len) in parts {
        h.combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
    }
    h.finalize()
}

/// Build the manifest from the plan and every unit's CRC. Missing a unit is a bug.
pub fn build(plan: &Plan, unit_crc: &HashMap<u32, u32>) -> Result<Manifest> {
    let mut m = Manifest::default();
    for (i, e) in plan.entries.iter().enumerate() {
        match e.kind {
            Kind::Dir => m.dirs.push(e.dst.clone()),
            Kind::Symlink => m.symlinks.push(LinkRecord {
                path: e.dst.clone(),
                target: e.target.clone().unwrap_or_default(),
            }),
            Kind::File => {
                let mut parts = Vec::new();
                for u in plan.units_of(i) {
                    let crc = unit_crc.get(&u).ok_or_else(|| {
                        Error::internal(format!("unit {u} has no checksum at commit time"))
                            .with_path(&e.dst)
                    })?;
                    parts.push((*crc, plan.unit(u).len));
                }
                m.bytes += e.size;
                m.files.push(FileRecord {
                    path: e.dst.clone(),
                    size: e.size,
                    mode: e.mode,
                    crc32: combine(&parts),
                });
            }
        }
    }
    Ok(m)
}

/// CRC32 of a whole file read from the start, refusing to follow a symlink.
pub fn crc_of_file(path: &Path) -> Result<(u64, u32)> {
    let mut f: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx("open", path)?;
    crate::fsio::drop_cache(&f);
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).ctx("read", path)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize()))
}

/// Re-read a committed destination and compare it with the manifest. Returns every problem found
/// (each an `integrity` or I/O error naming the path); empty means the destination matches.
pub fn verify(m: &Manifest) -> Vec<Error> {
    let mut problems: Vec<Error> = m
        .files
        .par_iter()
        .filter_map(|f| {
            let md = match fs::symlink_metadata(&f.path) {
                Ok(md) => md,
                Err(e) => return Some(Error::io("stat", &f.path, e)),
            };
            if !md.is_file() {
                return Some(Error::integrity(&f.path, "not a regular file any more"));
            }
            if md.len() != f.size {
                return Some(Error::integrity(
                    &f.path,
                    format!("size is {} bytes, the manifest says {}", md.len(), f.size),
                ));
            }
            // Set-id bits may be missing (ferry drops them where the copy is not the source
            // owner's, with a warning), never added; every other bit must match.
            let mode = md.mode() & 0o7777;
            if mode & !0o6000 != f.mode & !0o6000 || mode & 0o6000 & !f.mode != 0 {
                return Some(Error::integrity(
                    &f.path,
                    format!(
                        "mode is {:o}, the manifest says {:o}",
                        md.mode() & 0o7777,
                        f.mode
                    ),
                ));
            }
            match crc_of_file(&f.path) {
                Ok((_, crc)) if crc == f.crc32 => None,
                Ok((_, crc)) => Some(Error::integrity(
                    &f.path,
                    format!("CRC32 is {crc:08x}, the manifest says {:08x}", f.crc32),
                )),
                Err(e) => Some(e),
            }
        })
        .collect();
    for l in &m.symlinks {
        match fs::read_link(&l.path) {
            Ok(t) if t == l.target => {}
            Ok(t) => problems.push(Error::integrity(
                &l.path,
                format!(
                    "symlink points to '{}', the manifest says '{}'",
                    t.display(),
                    l.target.display()
                ),
            )),
            Err(e) => problems.push(Error::io("readlink", &l.path, e)),
        }
    }
    for d in &m.dirs {
        if !fs::symlink_metadata(d).map(|m| m.is_dir()).unwrap_or(false) {
            problems.push(Error::new(ErrorClass::Integrity, "directory is missing").with_path(d));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_unit_crcs_equal_the_whole_file_crc() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let whole = crc32fast::hash(&data);
        for cut in [1usize, 4096, 33_333, 99_999] {
            let parts: Vec<(u32, u64)> = data
                .chunks(cut)
                .map(|c| (crc32fast::hash(c), c.len() as u64))
                .collect();
            assert_eq!(combine(&parts), whole, "cut {cut}");
        }
        assert_eq!(combine(&[(crc32fast::hash(b""), 0)]), crc32fast::hash(b""));
        assert_eq!(combine(&[]), crc32fast::hash(b""));
    }
}
