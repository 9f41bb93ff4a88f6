//! ferry against the world around it (issue 17): another transfer in the same directory, a stale
//! file of the same size at a final name, a source swapped between attempts, a failed syncfs, a
//! foreign file at a temporary name, set-id bits ferry dropped. Each case ends committed with the
//! source's bytes (`survived`) or stopped without a false commit (`safe-fail`), and each failed on
//! the code before identity was recorded. The same cells are rows of docs/failure-analysis.md.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Output;

use crate::util::*;

fn run_fp(s: &Scratch, fp: &str, args: &[&str]) -> Output {
    s.ferry()
        .env("FERRY_FAILPOINTS", fp)
        .args(args)
        .output()
        .unwrap()
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Write each `(path, len, seed)` (its directory made), and make each of `dirs`.
fn put(s: &Scratch, files: &[(&str, usize, u8)], dirs: &[&str]) {
    for (p, len, seed) in files {
        let p = s.path(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes(*len, *seed)).unwrap();
    }
    for d in dirs {
        fs::create_dir_all(s.path(d)).unwrap();
    }
}

/// `ferry copy --id ID SRC DST` held at its first unit until `s.release()`.
fn held_copy(s: &Scratch, id: &str, src: &str, dst: &str) -> std::process::Child {
    spawn_paused(s, "copy::unit_start=pause", &["copy", "--id", id, src, dst])
}

/// Each of `runs` is refused (`usage`) because another transfer is writing there.
fn refused(s: &Scratch, runs: &[(Vec<&str>, &str)]) {
    for (args, what) in runs {
        let o = s.run(args);
        expect_code(&o, 2);
        assert!(
            stderr(&o).contains("another ferry transfer"),
            "{what}: {}",
            stderr(&o)
        );
    }
}

/// Two transfers of one id (as every AXL transfer with a state file is), each with its own state,
/// writing into one directory, both stopped before their decision: the first one's resume commits
/// its own bytes, never the other's.
#[test]
fn two_transfers_of_one_id_in_one_directory_never_trade_bytes() {
    let s = Scratch::new();
    fs::create_dir_all(s.path("a")).unwrap();
    fs::create_dir_all(s.path("b")).unwrap();
    fs::create_dir_all(s.path("ckpt")).unwrap();
    fs::write(s.path("a/a.dat"), bytes(300_000, 1)).unwrap();
    fs::write(s.path("b/b.dat"), bytes(300_000, 2)).unwrap();
    // Two jobs (each its own registry of ids, as two users or two SCR runs have).
    let job = |home: &str| {
        let mut c = s.ferry();
        c.env("FERRY_HOME", s.path(home));
        c
    };
    for (src, state) in [("a/a.dat", "sa"), ("b/b.dat", "sb")] {
        let o = job(state)
            .env("FERRY_FAILPOINTS", "commit::before_decision=exit")
            .args(["copy", "--id", "xfer", "--state-dir", state, src, "ckpt/"])
            .output()
            .unwrap();
        expect_code(&o, 99);
    }
    for state in ["sa", "sb"] {
        let o = job(state)
            .args(["resume", "xfer", "--state-dir", state])
            .output()
            .unwrap();
        expect_code(&o, 0);
    }
    assert!(fs::read(s.path("ckpt/a.dat")).unwrap() == bytes(300_000, 1));
    assert!(fs::read(s.path("ckpt/b.dat")).unwrap() == bytes(300_000, 2));
    for state in ["sa", "sb"] {
        let o = job(state)
            .args(["verify", "xfer", "--state-dir", state])
            .output()
            .unwrap();
        expect_code(&o, 0);
    }
    assert!(temps_in(&s.path("ckpt")).is_empty());
}

/// Re-staging a fixed-size checkpoint over an old one of the same size, with --delete-source:
/// stopped after the decision, the staged copy damaged, `resume --verify` refuses it, and a plain
/// resume then copies it again — the new bytes end at the final name before any source goes.
#[test]
fn a_stale_final_of_the_same_size_never_passes_for_the_copy() {
    let s = Scratch::new();
    let new = bytes(200_000, 7);
    fs::create_dir_all(s.path("src")).unwrap();
    fs::create_dir_all(s.path("dst")).unwrap();
    fs::write(s.path("src/f"), &new).unwrap();
    fs::write(s.path("dst/f"), bytes(200_000, 9)).unwrap();
    let o = run_fp(
        &s,
        "commit::decision_written=exit",
        &["copy", "--id", "d", "--delete-source", "src/f", "dst/"],
    );
    expect_code(&o, 99);
    let tmp = temps_in(&s.path("dst")).into_iter().next().unwrap();
    let mut b = fs::read(&tmp).unwrap();
    b[1234] ^= 0x40;
    fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &b))
        .unwrap();
    let o = s.run(&["resume", "d", "--verify"]);
    expect_code(&o, 8);
    assert!(
        s.path("src/f").exists(),
        "the source is kept until a commit"
    );
    let o = s.run(&["resume", "d"]);
    expect_code(&o, 0);
    assert!(
        fs::read(s.path("dst/f")).unwrap() == new,
        "the new bytes at dst/f"
    );
    assert!(!s.path("src/f").exists());
    expect_code(&s.run(&["verify", "d"]), 0);
}

/// A source replaced between attempts by a file of the same size and mtime (`cp -p other f.new &&
/// mv f.new f`): the resume copies that file again whole from its new version, never a mix of
/// units of two versions under a manifest that vouches for it.
#[cfg(feature = "failpoints")]
#[test]
fn a_source_replaced_between_attempts_is_copied_whole_from_its_new_version() {
    let s = Scratch::new();
    fs::create_dir_all(s.path("src")).unwrap();
    let len = 48 << 20;
    fs::write(s.path("src/f"), bytes(len, 3)).unwrap();
    // Large units (8 MiB), one thread, slowed: the first journal batch holds one or two units.
    let o = run_fp(
        &s,
        "copy::unit_written=delay(250);journal::synced=exit#1",
        &[
            "copy",
            "--id",
            "r",
            "--chunk-size",
            "8MiB",
            "--threads",
            "1",
            "src",
            "dst",
        ],
    );
    expect_code(&o, 99);
    let st = status(&s, "r", &s.path("dst/.ferry"));
    assert!(st["bytes_done"].as_u64().unwrap() > 0, "{st}");
    fs::write(s.path("other"), bytes(len, 4)).unwrap();
    let cp = std::process::Command::new("cp")
        .args(["-p", "--reflink=never"])
        .arg(s.path("other"))
        .arg(s.path("src/f.new"))
        .status()
        .unwrap();
    assert!(cp.success());
    let mtime = fs::metadata(s.path("src/f")).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(s.path("src/f.new"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    fs::rename(s.path("src/f.new"), s.path("src/f")).unwrap();
    let o = s.run(&["resume", "r"]);
    expect_code(&o, 0);
    assert_same_tree(&s.path("src"), &s.path("dst"));
    expect_code(&s.run(&["verify", "r"]), 0);
}

/// A syncfs that fails (EIO) is final for everything written before it: no unit of that batch,
/// nor of any later one, is journaled (a second syncfs would return 0 with the data lost), the
/// class says data was lost, and a resume copies it all again.
#[cfg(feature = "failpoints")]
#[test]
fn a_failed_syncfs_is_final_for_what_it_covered() {
    let s = Scratch::new();
    let mut r = Rng::new(17);
    numbered_files(&s.path("src"), 400, 4, 2000, 13, &mut r);
    // Slowed so a batch falls due by age while other threads still copy.
    let o = run_fp(
        &s,
        "copy::unit_written=delay(10);fsio::syncfs=error(EIO)#1",
        &["copy", "--id", "y", "--threads", "4", "src", "dst"],
    );
    expect_code(&o, 8);
    let err = stderr(&o);
    assert!(err.contains("written data was lost"), "{err}");
    let st = status(&s, "y", &s.path("dst/.ferry"));
    assert_eq!(
        st["bytes_done"], 0,
        "nothing a failed syncfs covered is journaled: {st}"
    );
    let o = s.run(&["resume", "y", "--json"]);
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(sum["bytes_reused"], 0, "{sum}");
    assert_same_tree(&s.path("src"), &s.path("dst"));
}

/// Foreign things at a journaled temporary name between attempts (a FIFO, a symlink, another
/// user's file of the same size, a hard link to a file elsewhere): never written, trusted or
/// removed; the resume copies that file again under a new name and commits the source's bytes.
#[cfg(feature = "failpoints")]
#[test]
fn a_foreign_file_at_a_temporary_name_between_attempts_is_left_alone() {
    for what in ["fifo", "symlink", "other-owner", "hard-link"] {
        let s = Scratch::new();
        fs::create_dir_all(s.path("src")).unwrap();
        fs::create_dir_all(s.path("outside")).unwrap();
        fs::write(s.path("src/f"), bytes(50_000, 5)).unwrap();
        fs::write(s.path("outside/canary"), bytes(50_000, 6)).unwrap();
        let o = run_fp(
            &s,
            "copy::all_done=exit",
            &["copy", "--id", "z", "src", "dst"],
        );
        expect_code(&o, 99);
        let tmp = temps_in(&s.path("dst")).into_iter().next().unwrap();
        fs::remove_file(&tmp).unwrap();
        match what {
            "fifo" => rustix::fs::mknodat(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from(0o600),
                0,
            )
            .unwrap(),
            "symlink" => std::os::unix::fs::symlink(s.path("outside/canary"), &tmp).unwrap(),
            "other-owner" => {
                fs::write(&tmp, bytes(50_000, 8)).unwrap();
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
                if rustix::process::geteuid().is_root() {
                    std::os::unix::fs::chown(&tmp, Some(4321), Some(4321)).unwrap();
                }
            }
            _ => fs::hard_link(s.path("outside/canary"), &tmp).unwrap(),
        }
        let before = fs::symlink_metadata(&tmp).unwrap().ino();
        let o = s.run(&["resume", "z"]);
        expect_code(&o, 0);
        assert!(
            fs::read(s.path("dst/f")).unwrap() == bytes(50_000, 5),
            "{what}: the source's bytes at dst/f"
        );
        assert!(
            fs::read(s.path("outside/canary")).unwrap() == bytes(50_000, 6),
            "{what}: the canary untouched"
        );
        assert_eq!(
            fs::symlink_metadata(&tmp).unwrap().ino(),
            before,
            "{what}: a file ferry did not make is never removed"
        );
        expect_code(&s.run(&["verify", "z"]), 0);
    }
}

/// `ferry verify` does not call a file corrupt because ferry itself dropped its set-id bits (the
/// copy is not the source owner's), and still catches a bit that was added.
#[test]
fn verify_accepts_set_id_bits_ferry_dropped_and_nothing_else() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to give the source another owner");
        return;
    }
    let s = Scratch::new();
    fs::create_dir_all(s.path("src")).unwrap();
    let f = s.path("src/prog");
    fs::write(&f, b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(&f, Some(1234), Some(1234)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
    let o = s.run(&["copy", "--id", "p", "src", "dst"]);
    expect_code(&o, 0);
    assert!(stderr(&o).contains("set-id bits"), "{}", stderr(&o));
    let mode = fs::metadata(s.path("dst/prog")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    expect_code(&s.run(&["verify", "p"]), 0);
    fs::set_permissions(s.path("dst/prog"), fs::Permissions::from_mode(0o2755)).unwrap();
    let o = s.run(&["verify", "p"]);
    expect_code(&o, 8);
    assert!(stderr(&o).contains("is committed"), "{}", stderr(&o));
}

/// With `--delete-source`, a source rewritten in place after it was copied, its size and mtime
/// put back (`rsync --inplace`, `touch -r`), is another version: it is kept, never removed.
#[test]
fn delete_source_keeps_a_source_rewritten_in_place_with_its_mtime_put_back() {
    let s = Scratch::new();
    fs::create_dir_all(s.path("src")).unwrap();
    let f = s.path("src/f");
    fs::write(&f, bytes(40_000, 1)).unwrap();
    let c = spawn_paused(
        &s,
        "delete::source=pause",
        &["copy", "--id", "k", "--delete-source", "src", "dst"],
    );
    let mtime = fs::metadata(&f).unwrap().modified().unwrap();
    let mut w = fs::OpenOptions::new().write(true).open(&f).unwrap();
    std::io::Write::write_all(&mut w, &bytes(40_000, 2)).unwrap();
    w.set_modified(mtime).unwrap();
    drop(w);
    s.release();
    let o = c.wait_with_output().unwrap();
    expect_code(&o, 0);
    assert!(
        fs::read(&f).unwrap() == bytes(40_000, 2),
        "the rewritten source is kept"
    );
    assert!(fs::read(s.path("dst/f")).unwrap() == bytes(40_000, 1));
    let st = status(&s, "k", &s.path("dst/.ferry"));
    assert_eq!(st["sources_removed"], false, "{st}");
}

/// The state directory swapped, between two phases of a run, for a link to a directory holding
/// another transfer's plan: the run keeps reading and writing the directory it checked and
/// opened, commits its own copy, and nothing lands in the link's target.
#[test]
fn a_state_directory_swapped_for_a_link_between_phases_is_never_followed() {
    let s = Scratch::new();
    fs::create_dir_all(s.path("src")).unwrap();
    fs::write(s.path("src/f"), bytes(30_000, 1)).unwrap();
    fs::create_dir_all(s.path("other")).unwrap();
    fs::write(s.path("other/g"), bytes(30_000, 2)).unwrap();
    // A forged state directory: another transfer's state under the same id.
    let o = s
        .ferry()
        .env("FERRY_HOME", s.path("home2"))
        .env("FERRY_FAILPOINTS", "plan::written=exit")
        .args([
            "copy",
            "--id",
            "t",
            "--state-dir",
            "forged",
            "other",
            "elsewhere",
        ])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let forged_before = files_under(&s.path("forged")).len();
    let c = spawn_paused(
        &s,
        "copy::all_done=pause",
        &["copy", "--id", "t", "src", "dst"],
    );
    fs::rename(s.path("dst/.ferry"), s.path("dst/.ferry-real")).unwrap();
    std::os::unix::fs::symlink(s.path("forged"), s.path("dst/.ferry")).unwrap();
    s.release();
    let o = c.wait_with_output().unwrap();
    expect_code(&o, 0);
    assert!(fs::read(s.path("dst/f")).unwrap() == bytes(30_000, 1));
    assert!(
        !s.path("elsewhere").exists(),
        "the forged plan was never acted on"
    );
    assert_eq!(files_under(&s.path("forged")).len(), forged_before);
    assert!(s.path("dst/.ferry-real/t/commit").exists());
    // Every later command refuses the link.
    let o = s.run(&[
        "status",
        "t",
        "--state-dir",
        s.path("dst/.ferry").to_str().unwrap(),
    ]);
    assert_ne!(code(&o), 0, "{}", stdout(&o));
}

/// While a transfer fills a tree, a second one into a tree nested in it, into a tree that holds
/// it, or of a single file into it is refused before anything is written; a single file into a
/// sibling directory goes on.
#[cfg(feature = "failpoints")]
#[test]
fn a_second_transfer_into_a_nested_or_enclosing_destination_is_refused() {
    let s = Scratch::new();
    let mut r = Rng::new(3);
    numbered_files(&s.path("src"), 6, 2, 5000, 100, &mut r);
    fs::create_dir_all(s.path("one")).unwrap();
    fs::write(s.path("one/f"), bytes(1000, 1)).unwrap();
    fs::create_dir_all(s.path("top")).unwrap();
    let c = spawn_paused(
        &s,
        "copy::unit_start=pause",
        &["copy", "--id", "a", "src", "top/dst"],
    );
    refused(
        &s,
        &[
            (vec!["copy", "src", "top/dst/sub"], "nested"),
            (vec!["copy", "src", "top"], "enclosing"),
            (vec!["copy", "one/f", "top/dst/"], "a file into it"),
        ],
    );
    assert!(!s.path("top/dst/sub").exists() && !s.path("top/dst/f").exists());
    // Beside it, a single file into the same parent goes on.
    expect_code(&s.run(&["copy", "one/f", "top/"]), 0);
    s.release();
    expect_code(&c.wait_with_output().unwrap(), 0);
    assert_same_tree(&s.path("src"), &s.path("top/dst"));
}

/// Two transfers of one final name never run at once: while a single-file copy into `ckpt/` is
/// running, a copy of another file of the same name, or of a tree into `ckpt`, is refused before
/// anything is written; a file of another name goes on (SCR's ranks flushing into one
/// directory). Once the first has ended, the same name may be written again.
#[cfg(feature = "failpoints")]
#[test]
fn a_second_transfer_of_the_same_final_name_is_refused_other_names_go_on() {
    let s = Scratch::new();
    put(
        &s,
        &[("a/f", 300_000, 1), ("b/f", 300_000, 2), ("b/g", 1000, 3)],
        &["ckpt"],
    );
    let c = held_copy(&s, "first", "a/f", "ckpt/");
    refused(
        &s,
        &[
            (vec!["copy", "b/f", "ckpt/"], "the same name"),
            (
                vec!["copy", "b/f", "ckpt/f"],
                "the same name, spelled as a file",
            ),
            (vec!["copy", "b", "ckpt"], "a tree into its directory"),
        ],
    );
    assert!(!s.path("ckpt/g").exists(), "the refused tree wrote nothing");
    // A file of another name goes on beside it.
    put(&s, &[("other/g", 1000, 4)], &[]);
    expect_code(&s.run(&["copy", "other/g", "ckpt/"]), 0);
    s.release();
    expect_code(&c.wait_with_output().unwrap(), 0);
    assert_eq!(fs::read(s.path("ckpt/f")).unwrap(), bytes(300_000, 1));
    // One after the other is no conflict: the later copy wins, as with cp.
    expect_code(&s.run(&["copy", "b/f", "ckpt/"]), 0);
    assert_eq!(fs::read(s.path("ckpt/f")).unwrap(), bytes(300_000, 2));
    // With the state kept elsewhere, the guard file goes with the run: the destination holds
    // only what was copied (and the empty `.ferry` directory the guard was in).
    expect_code(&s.run(&["copy", "--state-dir", "st", "b/g", "clean/"]), 0);
    assert_eq!(files_under(&s.path("clean")), vec![s.path("clean/g")]);
    assert_eq!(fs::read(s.path("clean/g")).unwrap(), bytes(1000, 3));
}

/// An AXL-style transfer (the library's `Xfer`) of a file pair is guarded like a CLI copy: a
/// pair onto the final name a running copy writes fails with `usage` and leaves that copy's
/// bytes; a pair onto another name in the same directory commits.
#[cfg(feature = "failpoints")]
#[test]
fn a_library_transfer_onto_a_name_a_running_copy_writes_is_refused() {
    use ferry::xfer::Xfer;
    let s = Scratch::new();
    put(
        &s,
        &[
            ("a/f", 300_000, 1),
            ("cache/f", 300_000, 2),
            ("cache/g", 2000, 3),
        ],
        &["ckpt"],
    );
    let c = held_copy(&s, "cli", "a/f", "ckpt/");
    let mut same = Xfer::create("same", &s.path("state")).unwrap();
    same.add(s.path("cache/f"), s.path("ckpt/f")).unwrap();
    same.dispatch().unwrap();
    let e = same.wait().unwrap_err();
    assert_eq!(e.class, ferry::ErrorClass::Usage, "{e}");
    assert!(e.to_string().contains("another ferry transfer"), "{e}");
    let mut other = Xfer::create("other", &s.path("state")).unwrap();
    other.add(s.path("cache/g"), s.path("ckpt/g")).unwrap();
    other.dispatch().unwrap();
    other.wait().unwrap();
    assert_eq!(fs::read(s.path("ckpt/g")).unwrap(), bytes(2000, 3));
    s.release();
    expect_code(&c.wait_with_output().unwrap(), 0);
    assert_eq!(fs::read(s.path("ckpt/f")).unwrap(), bytes(300_000, 1));
}

/// A file system that refuses locks (NFS without lockd, Lustre mounted `noflock`: the
/// failpoint's ENOLCK) stops the run with `usage` before anything is written, naming the way
/// out; `FERRY_DEST_LOCK=off` takes it, with a warning.
#[cfg(feature = "failpoints")]
#[test]
fn a_file_system_without_locks_stops_the_run_loudly_unless_told_to_go_on() {
    let s = Scratch::new();
    put(&s, &[("a/f", 5000, 1)], &[]);
    let fp = "locks::dest=error(ENOLCK)#1*";
    for args in [vec!["copy", "a/f", "out/"], vec!["copy", "a", "tree"]] {
        let o = run_fp(&s, fp, &args);
        expect_code(&o, 2);
        assert!(
            stderr(&o).contains("refuses a lock") && stderr(&o).contains("FERRY_DEST_LOCK=off"),
            "{}",
            stderr(&o)
        );
    }
    assert!(!s.path("out/f").exists() && !s.path("tree/f").exists());
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", fp)
        .env("FERRY_DEST_LOCK", "off")
        .args(["copy", "a", "tree"])
        .output()
        .unwrap();
    expect_code(&o, 0);
    assert!(stderr(&o).contains("FERRY_DEST_LOCK=off"), "{}", stderr(&o));
    assert_same_tree(&s.path("a"), &s.path("tree"));
}
