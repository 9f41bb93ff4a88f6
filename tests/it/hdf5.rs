//! HDF5 checkpoints (feature `hdf5`): `ferry gen` writes them, `--verify-hdf5` opens and reads
//! back every staged .h5 file before the commit; broken sources are caught and named.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::util::*;

/// `ferry gen DIR` for `ranks` ranks of `size` each.
fn gen(s: &Scratch, dir: &str, ranks: usize, size: &str) -> PathBuf {
    let o = s.run(&[
        "gen",
        dir,
        "--size",
        size,
        "--ranks",
        &ranks.to_string(),
        "--seed",
        "9",
    ]);
    expect_code(&o, 0);
    s.path(dir)
}

fn flip_byte(p: &Path, at: usize) {
    let mut b = fs::read(p).unwrap();
    b[at] ^= 0x40;
    fs::write(p, b).unwrap();
}

/// Regular files at final names under `dir` (temporaries and state excluded).
fn finals(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            let inside = p.strip_prefix(dir).unwrap_or(p);
            !inside.components().any(|c| {
                let n = c.as_os_str().to_string_lossy();
                n == ".ferry" || n.starts_with(".ferry-")
            })
        })
        .collect()
}

#[test]
fn gen_writes_a_checkpoint_per_rank_and_a_verified_copy_commits_it() {
    let s = Scratch::new();
    let src = gen(&s, "ckpt", 3, "6MiB");
    for r in 0..3 {
        for f in ["ckpt.h5", "restart.bin", "run.log"] {
            assert!(src.join(format!("rank{r}/{f}")).is_file(), "rank{r}/{f}");
        }
    }
    // The same seed and size give the same data.
    let again = gen(&s, "again", 3, "6MiB");
    assert_eq!(
        fs::read(src.join("rank1/restart.bin")).unwrap(),
        fs::read(again.join("rank1/restart.bin")).unwrap()
    );
    let o = s.run(&["copy", "--ranks", "2", "--verify-hdf5", "-v", "ckpt", "out"]);
    expect_code(&o, 0);
    assert!(
        stderr(&o).contains("HDF5 check (data): 3 file(s) open and read back"),
        "{}",
        stderr(&o)
    );
    assert_same_tree(&src, &s.path("out"));
}

#[test]
fn broken_sources_are_caught_before_the_commit_and_named_with_the_object() {
    let s = Scratch::new();
    let good = gen(&s, "good", 1, "6MiB");
    let h5 = good.join("rank0/ckpt.h5");
    let len = fs::metadata(&h5).unwrap().len() as usize;
    // (name, how it is broken, what the message must say, caught with --verify-hdf5=metadata)
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: [(&str, Damage, &str, bool); 3] = [
        (
            "truncated",
            Box::new(move |p: &Path| {
                let f = fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(len as u64 / 2).unwrap();
            }),
            "the file does not open as HDF5",
            true,
        ),
        (
            "bit-flipped",
            Box::new(move |p: &Path| flip_byte(p, len / 5)),
            "dataset /fields/density: data does not read back",
            false,
        ),
        (
            "not HDF5",
            Box::new(|p: &Path| fs::write(p, b"a log file named .h5").unwrap()),
            "the file does not open as HDF5",
            true,
        ),
    ];
    for (name, damage, says, meta_sees_it) in cases {
        let src = s.path(name);
        cp_a(&good, &src);
        damage(&src.join("rank0/ckpt.h5"));
        let out = s.path(&format!("{name}-out"));
        let o = s.run(&[
            "copy",
            "--verify-hdf5",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        expect_code(&o, 8);
        let err = stderr(&o);
        assert!(err.contains("integrity"), "{name}: {err}");
        assert!(
            err.contains(&format!("{}", out.join("rank0/ckpt.h5").display())),
            "{name}: {err}"
        );
        assert!(err.contains(says), "{name}: {err}");
        assert!(
            err.contains("already broken at the source"),
            "{name}: {err}"
        );
        assert!(
            finals(&out).is_empty(),
            "{name}: nothing committed: {:?}",
            finals(&out)
        );
        // Metadata only: cheaper, and blind to damage inside unchecked data.
        let out = s.path(&format!("{name}-meta"));
        let o = s.run(&[
            "copy",
            "--verify-hdf5=metadata",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        expect_code(&o, if meta_sees_it { 8 } else { 0 });
    }
}

#[test]
fn a_checkpoint_whose_writer_died_is_caught_at_the_source() {
    let s = Scratch::new();
    // A writer killed in the middle of its file: HDF5 metadata never flushed.
    let mut child = s
        .ferry()
        .args(["gen", "dying", "--size", "2GiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_tracked();
    let h5 = s.path("dying/rank0/ckpt.h5");
    wait_for(Duration::from_secs(60), || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "gen ended before it was killed"
        );
        fs::metadata(&h5).is_ok_and(|m| m.len() > 16 << 20)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let o = s.run(&["copy", "--verify-hdf5", "dying", "out"]);
    expect_code(&o, 8);
    let err = stderr(&o);
    assert!(
        err.contains("rank0/ckpt.h5") && err.contains("already broken at the source"),
        "{err}"
    );
    assert!(finals(&s.path("out")).is_empty());
}

#[cfg(feature = "failpoints")]
#[test]
fn a_resume_checks_again_what_the_copy_asked_for() {
    let s = Scratch::new();
    gen(&s, "ckpt", 2, "6MiB");
    // The copy dies after its first unit; the resume (without the flag) still checks.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::unit_written=exit@0#2")
        .args([
            "copy",
            "--id",
            "h5",
            "--verify-hdf5=metadata",
            "--threads",
            "1",
            "ckpt",
            "out",
        ])
        .output()
        .unwrap();
    assert_ne!(code(&o), 0);
    let o = s.run(&["resume", "h5", "-v"]);
    expect_code(&o, 0);
    assert!(
        stderr(&o).contains("HDF5 check (metadata): 2 file(s)"),
        "{}",
        stderr(&o)
    );
    assert_same_tree(&s.path("ckpt"), &s.path("out"));
}

/// Damage the superblock of the staged copy of `ckpt/rank0/ckpt.h5` in `out`; its path.
fn damage_staged_h5(s: &Scratch) -> std::path::PathBuf {
    let staged = temps_in(&s.path("out"))
        .into_iter()
        .find(|p| {
            fs::metadata(p).unwrap().len()
                == fs::metadata(s.path("ckpt/rank0/ckpt.h5")).unwrap().len()
        })
        .unwrap();
    flip_byte(&staged, 0);
    staged
}

/// A staged copy damaged before its HDF5 check fails it (the source reads fine): the file is
/// voided in the journal before its temporary file goes, so the next resume copies it again and
/// commits, instead of checking the same bytes forever.
#[cfg(feature = "failpoints")]
#[test]
fn a_failed_hdf5_check_of_the_copy_is_copied_again_by_the_resume() {
    let s = Scratch::new();
    gen(&s, "ckpt", 1, "6MiB");
    let mut c = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::all_done=pause")
        .args(["copy", "--id", "hv", "--verify-hdf5", "ckpt", "out"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_paused(&mut c);
    let staged = damage_staged_h5(&s);
    s.release();
    let o = c.wait_with_output().unwrap();
    expect_code(&o, 8);
    assert!(stderr(&o).contains("HDF5 check failed"), "{}", stderr(&o));
    assert!(!staged.exists(), "voided, then removed");
    let o = s.run(&["resume", "hv"]);
    expect_code(&o, 0);
    assert_same_tree(&s.path("ckpt"), &s.path("out"));
}

/// The same past the decision: a resume with `--verify-hdf5` over a staged copy damaged after
/// the decision refuses it (it used to commit it, exit 0) — by reading it back against the
/// journal's CRCs, since its format was checked before the decision — voids it, and the next
/// resume copies it again from the source and commits.
#[cfg(feature = "failpoints")]
#[test]
fn a_copy_damaged_after_the_decision_fails_the_hdf5_check_of_the_resume() {
    let s = Scratch::new();
    gen(&s, "ckpt", 1, "6MiB");
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "commit::decision_written=exit")
        .args(["copy", "--id", "hd", "--verify-hdf5", "ckpt", "out"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(ferry::failpoints::EXIT_CODE));
    let staged = damage_staged_h5(&s);
    let st = s.path("out/.ferry");
    let st = st.to_str().unwrap();
    let o = s.run(&["resume", "hd", "--state-dir", st, "--verify-hdf5"]);
    expect_code(&o, 8);
    assert!(
        stderr(&o).contains("read back with another CRC32"),
        "{}",
        stderr(&o)
    );
    assert!(!staged.exists(), "voided, then removed");
    expect_code(&s.run(&["resume", "hd", "--state-dir", st]), 0);
    assert_same_tree(&s.path("ckpt"), &s.path("out"));
    expect_code(&s.run(&["verify", "hd", "--state-dir", st]), 0);
}
