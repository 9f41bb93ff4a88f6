//! HDF5 checkpoints (cargo feature `hdf5`, over the system libhdf5 through `hdf5-metno`):
//! validating staged files before the commit (`--verify-hdf5`) and writing checkpoint-like
//! sample data (`ferry gen`).
//!
//! **Validation** opens a file read-only with libhdf5 and walks it: every group, every dataset
//! (its type and shape) and every attribute (read back); at [`Depth::Data`] every dataset's data
//! is read too, in slabs of at most 64 MiB (chunk checksums such as Fletcher-32 are checked by
//! libhdf5 as it reads). A failure names the object: `dataset /fields/density: ...`. What it
//! cannot see: a flipped bit in data without a checksum filter reads back fine; variable-length
//! data is checked at the metadata level only.
//!
//! Without the feature the same functions exist and say the build has no HDF5 support, so the
//! CLI and the engine build and run without libhdf5.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How far `--verify-hdf5` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Depth {
    /// Groups, datasets' types and shapes, attributes: no dataset data.
    Metadata,
    /// Also every dataset's data.
    Data,
}

impl Depth {
    /// As on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Depth::Metadata => "metadata",
            Depth::Data => "data",
        }
    }
}

/// What a walk saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walked {
    /// Groups, the root included.
    pub groups: u64,
    /// Datasets.
    pub datasets: u64,
    /// Attributes (of groups and datasets).
    pub attributes: u64,
    /// Bytes of dataset data read.
    pub bytes: u64,
}

/// Whether a destination path is one `--verify-hdf5` checks (`.h5`, `.hdf5`, any case).
pub fn is_hdf5_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("h5") || e.eq_ignore_ascii_case("hdf5"))
}

/// Whether this build can read HDF5.
pub const AVAILABLE: bool = cfg!(feature = "hdf5");

/// The error of a build without HDF5 support.
pub fn unavailable(what: &str) -> Error {
    Error::usage(format!(
        "{what} needs HDF5, and this ferry was built without it (cargo feature `hdf5`)"
    ))
}

/// Open and walk `path`; on failure, what failed, naming the object (`dataset /a/b: ...`).
pub fn check_file(path: &Path, depth: Depth) -> std::result::Result<Walked, String> {
    #[cfg(feature = "hdf5")]
    {
        imp::check_file(path, depth)
    }
    #[cfg(not(feature = "hdf5"))]
    {
        let _ = (path, depth);
        Err(unavailable("--verify-hdf5").to_string())
    }
}

/// Validate a staged file before the commit: Ok, or an `integrity` error naming the file and
/// the object, and saying whether the source was already broken (then the copy is faithful
/// and the file must be fixed where it came from).
pub fn validate_staged(staged: &Path, dst: &Path, src: &Path, depth: Depth) -> Result<Walked> {
    match check_file(staged, depth) {
        Ok(w) => Ok(w),
        Err(problem) => {
            let origin = match check_file(src, depth) {
                Err(at_src) => format!(
                    "it was already broken at the source '{}'{}: fix or replace the source; \
                     ferry copied it faithfully",
                    src.display(),
                    if at_src == problem {
                        " (the same failure)".to_string()
                    } else {
                        format!(" ({at_src})")
                    }
                ),
                Ok(_) => format!(
                    "the source '{}' reads fine, so the copy is damaged: resume the transfer to \
                     copy it again",
                    src.display()
                ),
            };
            Err(Error::integrity(
                dst,
                format!("HDF5 check failed: {problem}; {origin}; nothing was committed"),
            ))
        }
    }
}

/// What `ferry gen` writes for one rank.
#[derive(Debug, Clone)]
pub struct GenSpec {
    /// Bytes of data for this rank, about (HDF5 metadata and plain files on top).
    pub bytes: u64,
    /// Seed of the data (the same seed and size give the same data).
    pub seed: u64,
    /// The rank (its files go to `DIR/rank{rank}`).
    pub rank: usize,
}

/// Write one rank's checkpoint under `dir/rank{rank}`: `ckpt.h5` (a few large arrays with
/// Fletcher-32 checksums, many small datasets, attributes) and plain files beside it. Returns
/// the bytes written.
pub fn generate(dir: &Path, spec: &GenSpec) -> Result<u64> {
    #[cfg(feature = "hdf5")]
    {
        imp::generate(dir, spec)
    }
    #[cfg(not(feature = "hdf5"))]
    {
        let _ = (dir, spec);
        Err(unavailable("ferry gen"))
    }
}

#[cfg(feature = "hdf5")]
mod imp {
    use std::io::Write;
    use std::path::Path;

    use hdf5::types::VarLenUnicode;

    use super::{Depth, GenSpec, Walked};
    use crate::error::{Error, IoContext, Result};

    /// Slab of data read at once.
    const SLAB: usize = 64 << 20;

    fn h5err(what: &str, e: hdf5::Error) -> String {
        format!("{what}: {e}")
    }

    pub fn check_file(path: &Path, depth: Depth) -> std::result::Result<Walked, String> {
        // libhdf5 would print its error stack on stderr for every failed call.
        hdf5::silence_errors(true);
        let f = hdf5::File::open(path).map_err(|e| h5err("the file does not open as HDF5", e))?;
        let mut w = Walked::default();
        walk_group(&f, "/", depth, &mut w)?;
        Ok(w)
    }

    fn attributes(
        loc: &hdf5::Location,
        what: &str,
        w: &mut Walked,
    ) -> std::result::Result<(), String> {
        let names = loc
            .attr_names()
            .map_err(|e| h5err(&format!("{what}: its attributes cannot be listed"), e))?;
        for n in names {
            let a = loc
                .attr(&n)
                .map_err(|e| h5err(&format!("attribute {n} of {what}"), e))?;
            read_all(&a, &format!("attribute {n} of {what}"), true)?;
            w.attributes += 1;
        }
        Ok(())
    }

    fn walk_group(
        g: &hdf5::Group,
        name: &str,
        depth: Depth,
        w: &mut Walked,
    ) -> std::result::Result<(), String> {
        let what = format!("group {name}");
        w.groups += 1;
        attributes(g, &what, w)?;
        let members = g
            .member_names()
            .map_err(|e| h5err(&format!("{what}: its members cannot be listed"), e))?;
        for m in members {
            let path = if name == "/" {
                format!("/{m}")
            } else {
                format!("{name}/{m}")
            };
            if let Ok(sub) = g.group(&m) {
                walk_group(&sub, &path, depth, w)?;
                continue;
            }
            let ds = g
                .dataset(&m)
                .map_err(|e| h5err(&format!("object {path} (neither a group nor a dataset)"), e))?;
            let what = format!("dataset {path}");
            ds.dtype()
                .and_then(|t| t.to_descriptor())
                .map_err(|e| h5err(&format!("{what}: its type"), e))?;
            ds.space()
                .map_err(|e| h5err(&format!("{what}: its shape"), e))?;
            attributes(&ds, &what, w)?;
            if depth == Depth::Data {
                w.bytes += read_all(&ds, &what, false)?;
            }
            w.datasets += 1;
        }
        Ok(())
    }

    /// Read a dataset's (or an attribute's) data in its own file type, in slabs along the
    /// first dimension; the bytes read.
    fn read_all(c: &hdf5::Container, what: &str, attr: bool) -> std::result::Result<u64, String> {
        use hdf5_sys::h5a::{H5Aget_type, H5Aread};
        use hdf5_sys::h5d::H5Dget_type;
        use hdf5_sys::h5d::{H5Dget_space, H5Dread};
        use hdf5_sys::h5p::H5P_DEFAULT;
        use hdf5_sys::h5s::{
            H5Sclose, H5Screate_simple, H5Sselect_hyperslab, H5S_ALL, H5S_SELECT_SET,
        };
        use hdf5_sys::h5t::{H5Tclose, H5Tdetect_class, H5Tget_size, H5Tis_variable_str, H5T_VLEN};

        let shape = c.shape();
        let n: usize = shape.iter().product::<usize>().max(1);
        let id = c.id();
        let fail = |e: hdf5::Error| h5err(&format!("{what}: data does not read back"), e);
        hdf5::sync::sync(|| -> std::result::Result<u64, String> {
            // SAFETY: HDF5 calls on ids owned by `c` (alive for this call) or created and
            // closed here, under hdf5-metno's global lock; buffers are sized from the type
            // size and the selection.
            unsafe {
                let t = hdf5::h5check(if attr {
                    H5Aget_type(id)
                } else {
                    H5Dget_type(id)
                })
                .map_err(fail)?;
                let result = (|| {
                    let vlen = H5Tdetect_class(t, H5T_VLEN) > 0 || H5Tis_variable_str(t) > 0;
                    if vlen {
                        // Metadata only: reading would allocate per element (see module doc).
                        return Ok(0);
                    }
                    let size = H5Tget_size(t);
                    if attr || shape.is_empty() || n * size <= SLAB {
                        let mut buf = vec![0u8; n * size];
                        let rc = if attr {
                            H5Aread(id, t, buf.as_mut_ptr().cast())
                        } else {
                            H5Dread(
                                id,
                                t,
                                H5S_ALL,
                                H5S_ALL,
                                H5P_DEFAULT,
                                buf.as_mut_ptr().cast(),
                            )
                        };
                        hdf5::h5check(rc).map_err(fail)?;
                        return Ok(buf.len() as u64);
                    }
                    let row: usize = shape[1..].iter().product::<usize>() * size;
                    let rows = (SLAB / row.max(1)).max(1);
                    let fspace = hdf5::h5check(H5Dget_space(id)).map_err(fail)?;
                    let mut buf = vec![0u8; rows * row];
                    let mut total = 0u64;
                    let mut start0 = 0usize;
                    let res = (|| {
                        while start0 < shape[0] {
                            let k = rows.min(shape[0] - start0);
                            let mut start = vec![0u64; shape.len()];
                            start[0] = start0 as u64;
                            let mut count: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                            count[0] = k as u64;
                            hdf5::h5check(H5Sselect_hyperslab(
                                fspace,
                                H5S_SELECT_SET,
                                start.as_ptr(),
                                std::ptr::null(),
                                count.as_ptr(),
                                std::ptr::null(),
                            ))
                            .map_err(fail)?;
                            let mspace = hdf5::h5check(H5Screate_simple(
                                count.len() as i32,
                                count.as_ptr(),
                                std::ptr::null(),
                            ))
                            .map_err(fail)?;
                            let rc = H5Dread(
                                id,
                                t,
                                mspace,
                                fspace,
                                H5P_DEFAULT,
                                buf.as_mut_ptr().cast(),
                            );
                            H5Sclose(mspace);
                            hdf5::h5check(rc).map_err(|e| {
                                h5err(
                                    &format!(
                                        "{what}: rows {start0}..{} do not read back",
                                        start0 + k
                                    ),
                                    e,
                                )
                            })?;
                            total += (k * row) as u64;
                            start0 += k;
                        }
                        Ok(total)
                    })();
                    H5Sclose(fspace);
                    res
                })();
                H5Tclose(t);
                result
            }
        })
    }

    /// A small, fast, seeded generator (xorshift64*): sample data, not cryptography.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn f64s(&mut self, n: usize) -> Vec<f64> {
            (0..n)
                .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64)
                .collect()
        }
    }

    fn h5(path: &Path, e: hdf5::Error) -> Error {
        Error::new(crate::error::ErrorClass::Internal, format!("HDF5: {e}")).with_path(path)
    }

    /// Remove whatever is at `path` (a file, or a symlink itself), so it can be made anew.
    fn fresh(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx("unlink", path),
            _ => Ok(()),
        }
    }

    /// A new file at `path` (O_EXCL: never an existing one, never through a symlink).
    fn create_new(path: &Path) -> Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .ctx("create", path)
    }

    pub fn generate(dir: &Path, spec: &GenSpec) -> Result<u64> {
        let rd = dir.join(format!("rank{}", spec.rank));
        crate::fsio::create_dirs(&rd)?;
        let mut rng =
            Rng(spec.seed ^ (spec.rank as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let path = rd.join("ckpt.h5");
        let e = |err| h5(&path, err);
        // 85 % in three large field arrays, 10 % in 48 small particle datasets, 5 % plain.
        let field = (spec.bytes * 85 / 100 / 3 / 8).max(64) as usize;
        let small = (spec.bytes * 10 / 100 / 48 / 8).max(16) as usize;
        let plain = (spec.bytes * 5 / 100).max(1024) as usize;
        // Each output replaces what is at its name, never writes through a link planted there:
        // the old name is removed, the new file made with O_EXCL (which a symlink fails).
        fresh(&path)?;
        let f = hdf5::File::create_excl(&path).map_err(e)?;
        f.new_attr::<u64>()
            .create("step")
            .and_then(|a| a.write_scalar(&(spec.seed % 1000)))
            .map_err(e)?;
        f.new_attr::<f64>()
            .create("time")
            .and_then(|a| a.write_scalar(&(spec.rank as f64 * 0.5)))
            .map_err(e)?;
        let code: VarLenUnicode = "ferry gen"
            .parse()
            .map_err(|_| Error::internal("attribute text"))?;
        f.new_attr::<VarLenUnicode>()
            .create("code")
            .and_then(|a| a.write_scalar(&code))
            .map_err(e)?;
        let fields = f.create_group("fields").map_err(e)?;
        for (name, cols) in [("density", 1usize), ("pressure", 1), ("velocity", 3)] {
            let rows = (field / cols).max(1);
            let data = rng.f64s(rows * cols);
            let chunk_rows = (rows.min((1 << 20) / cols)).max(1);
            let ds = fields
                .new_dataset::<f64>()
                .chunk((chunk_rows, cols))
                .fletcher32()
                .shape((rows, cols))
                .create(name)
                .map_err(e)?;
            ds.as_writer().write_raw(&data).map_err(e)?;
            ds.new_attr::<VarLenUnicode>()
                .create("units")
                .and_then(|a| a.write_scalar(&"SI".parse::<VarLenUnicode>().unwrap_or_default()))
                .map_err(e)?;
        }
        let particles = f.create_group("particles").map_err(e)?;
        for i in 0..48 {
            let data = rng.f64s(small);
            let ds = particles
                .new_dataset::<f64>()
                .shape(small)
                .create(format!("species{i:02}").as_str())
                .map_err(e)?;
            ds.write_raw(&data).map_err(e)?;
            ds.new_attr::<u32>()
                .create("index")
                .and_then(|a| a.write_scalar(&(i as u32)))
                .map_err(e)?;
        }
        drop(f);
        let mut blob = vec![0u8; plain];
        for c in blob.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        let restart = rd.join("restart.bin");
        fresh(&restart)?;
        create_new(&restart)?
            .write_all(&blob)
            .ctx("write", &restart)?;
        let log = rd.join("run.log");
        fresh(&log)?;
        let mut l = create_new(&log)?;
        for step in 0..64 {
            writeln!(
                l,
                "step {step} rank {} dt 1e-3 residual {:.3e}",
                spec.rank,
                1.0 / (step as f64 + 1.0)
            )
            .ctx("write", &log)?;
        }
        let mut total = std::fs::metadata(&path).ctx("stat", &path)?.len();
        total += plain as u64 + std::fs::metadata(&log).ctx("stat", &log)?.len();
        Ok(total)
    }
}

#[cfg(all(test, feature = "hdf5"))]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> std::path::PathBuf {
        let spec = GenSpec {
            bytes: 4 << 20,
            seed: 5,
            rank: 1,
        };
        assert!(generate(dir, &spec).unwrap() > 4 << 20);
        dir.join("rank1/ckpt.h5")
    }

    #[test]
    fn a_generated_checkpoint_walks_clean_and_damage_names_the_object() {
        let d = tempfile::tempdir().unwrap();
        let f = sample(d.path());
        let w = check_file(&f, Depth::Data).unwrap();
        assert_eq!((w.groups, w.datasets), (3, 51), "{w:?}");
        assert!(w.attributes >= 3 + 3 + 48, "{w:?}");
        assert!(w.bytes >= 3 << 20, "{w:?}");
        // The same seed gives the same data.
        let again = tempfile::tempdir().unwrap();
        let g = sample(again.path());
        let (a, b) = (std::fs::read(&f).unwrap(), std::fs::read(&g).unwrap());
        assert_eq!(a.len(), b.len());

        // A flipped byte inside the first field's data: its checksum fails on read, and only
        // a data check sees it.
        let mut bad = a.clone();
        let at = bad.len() / 5;
        bad[at] ^= 0x40;
        let flipped = d.path().join("flipped.h5");
        std::fs::write(&flipped, &bad).unwrap();
        let err = check_file(&flipped, Depth::Data).unwrap_err();
        assert!(err.starts_with("dataset /fields/"), "{err}");
        assert!(check_file(&flipped, Depth::Metadata).is_ok());

        // Cut in half: it does not open.
        let cut = d.path().join("cut.h5");
        std::fs::write(&cut, &a[..a.len() / 2]).unwrap();
        let err = check_file(&cut, Depth::Metadata).unwrap_err();
        assert!(err.contains("does not open"), "{err}");
        // Not HDF5 at all.
        let err = check_file(&d.path().join("rank1/run.log"), Depth::Data).unwrap_err();
        assert!(err.contains("does not open"), "{err}");
    }
}
