//! Damaged state: the plan, each journal and the commit record truncated at every record boundary
//! and at random bytes, bit-flipped, with garbage appended, or swapped for another transfer's.
//! A resume then converges (identical tree) or stops with a clear `integrity` error naming the
//! file; never a false commit, never a skipped file.

use std::fs;
use std::path::Path;

use crate::util::*;

/// Something done to a file's bytes.
type Mutate = Box<dyn Fn(&mut Vec<u8>)>;

/// A way to damage a file: what it is, whether it touches the header, and the damage.
type Damage = (String, bool, Mutate);

/// Ways to damage a file of `len` bytes whose records are `record` bytes after a `header`.
fn damages(len: usize, header: usize, record: usize, rng: &mut Rng) -> Vec<Damage> {
    let mut out: Vec<Damage> = Vec::new();
    let mut cuts: Vec<usize> = vec![0, 1, header.saturating_sub(1), header, len / 2, len - 1];
    if record > 0 {
        cuts.extend((header..len).step_by(record));
    }
    for _ in 0..4 {
        cuts.push(rng.below(len as u64) as usize);
    }
    cuts.sort();
    cuts.dedup();
    for c in cuts {
        let f: Mutate = Box::new(move |b| b.truncate(c));
        out.push((format!("truncated at {c}"), c < header, f));
    }
    for _ in 0..6 {
        let at = rng.below(len as u64) as usize;
        let bit = 1u8 << rng.below(8);
        let f: Mutate = Box::new(move |b| b[at] ^= bit);
        out.push((format!("bit flip at {at}"), at < header, f));
    }
    let f: Mutate = Box::new(|b| b.extend_from_slice(b"\x00garbage\xff\x17"));
    out.push(("garbage appended".into(), false, f));
    out
}

/// Damage `file` (relative to the snapshot) every way, resume each time, check the outcome.
fn each_damage(
    s: &Scratch,
    src: &Path,
    snap: &Path,
    file: &str,
    header: usize,
    record: usize,
    expect_converge: bool,
) -> usize {
    let dst = s.path("dst");
    let len = fs::metadata(snap.join(file)).unwrap().len() as usize;
    let mut rng = Rng::new(len as u64);
    let mut cases = 0;
    for (what, in_header, damage) in damages(len, header, record, &mut rng) {
        cp_a(snap, &dst);
        let p = dst.join(file);
        let mut b = fs::read(&p).unwrap();
        damage(&mut b);
        fs::write(&p, &b).unwrap();
        let o = s.run(&[
            "resume",
            "t",
            "--state-dir",
            dst.join(".ferry").to_str().unwrap(),
        ]);
        let commit = dst.join(".ferry/t/commit");
        match o.status.code() {
            Some(0) => {
                assert!(commit.exists(), "{file} {what}: exit 0 without commit");
                let d = diff_trees(src, &dst);
                assert!(d.is_empty(), "{file} {what}: committed but {d:?}");
            }
            Some(8) => {
                assert!(
                    !expect_converge || in_header,
                    "{file} {what}: integrity error where a resume should converge: {}",
                    stderr(&o)
                );
                let name = Path::new(file).file_name().unwrap().to_str().unwrap();
                assert!(
                    stderr(&o).contains(name),
                    "{file} {what}: the error does not name the file: {}",
                    stderr(&o)
                );
                assert!(torn_finals(src, &dst).is_empty());
                if commit.exists()
                    && fs::read(&commit).unwrap()
                        != fs::read(snap.join(".ferry/t/commit")).unwrap_or_default()
                {
                    panic!("{file} {what}: a commit record appeared on an integrity error");
                }
            }
            other => panic!(
                "{file} {what}: neither converged nor a clear integrity error ({other:?}): {}",
                stderr(&o)
            ),
        }
        cases += 1;
    }
    cases
}

#[test]
fn damaged_state_never_commits_falsely_nor_skips_a_file() {
    let s = Scratch::new();
    let src = s.path("src");
    let mut r = Rng::new(8);
    numbered_files(&src, 6, 2, 9_000, 4_000, &mut r);
    // Interrupted with every unit journaled (2 ranks, so 2 journals), before the decision.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::all_done=exit")
        .args([
            "copy",
            "--id",
            "t",
            "--ranks",
            "2",
            "--chunk-size",
            "4K",
            "src",
            "dst",
        ])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let snap = s.path("snap");
    cp_a(&s.path("dst"), &snap);
    let plan = fs::read(snap.join(".ferry/t/plan")).unwrap();
    let plan_header = plan.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut cases = each_damage(&s, &src, &snap, ".ferry/t/plan", plan_header, 0, false);
    for j in ["journal.a1.r0", "journal.a1.r1"] {
        cases += each_damage(&s, &src, &snap, &format!(".ferry/t/{j}"), 32, 32, true);
    }

    // Another transfer's plan swapped in (same id, other sources): its journals do not belong.
    let other = s.path("other");
    write_file(&other.join("x"), 5_000, &mut r);
    // (Made by another user, whose registry does not know this id.)
    let o = s
        .ferry()
        .env("FERRY_HOME", s.path("home2"))
        .args([
            "copy",
            "--id",
            "t",
            "--state-dir",
            s.path("elsewhere").to_str().unwrap(),
            "other",
            "odst",
        ])
        .output()
        .unwrap();
    expect_code(&o, 0);
    cp_a(&snap, &s.path("dst"));
    fs::copy(s.path("elsewhere/t/plan"), s.path("dst/.ferry/t/plan")).unwrap();
    let o = s.run(&[
        "resume",
        "t",
        "--state-dir",
        s.path("dst/.ferry").to_str().unwrap(),
    ]);
    expect_code(&o, 8);
    assert!(stderr(&o).contains("journal"), "{}", stderr(&o));
    assert!(!s.path("dst/.ferry/t/commit").exists());

    // Committed, then the commit record damaged: never believed, never silently rewritten.
    cp_a(&snap, &s.path("dst"));
    expect_code(
        &s.run(&[
            "resume",
            "t",
            "--state-dir",
            s.path("dst/.ferry").to_str().unwrap(),
        ]),
        0,
    );
    let snap2 = s.path("snap2");
    cp_a(&s.path("dst"), &snap2);
    let commit = fs::read(snap2.join(".ferry/t/commit")).unwrap();
    let h = commit.iter().position(|&b| b == b'\n').unwrap() + 1;
    let dst = s.path("dst");
    let mut rng = Rng::new(3);
    for (what, _, damage) in damages(commit.len(), h, 0, &mut rng) {
        cp_a(&snap2, &dst);
        let p = dst.join(".ferry/t/commit");
        let mut b = fs::read(&p).unwrap();
        damage(&mut b);
        fs::write(&p, &b).unwrap();
        let st = status(&s, "t", &dst.join(".ferry"));
        assert_eq!(st["state"], "unknown", "commit {what}: {st}");
        assert!(
            st["error"]["path"].as_str().unwrap().ends_with("commit"),
            "{st}"
        );
        let o = s.run(&[
            "resume",
            "t",
            "--state-dir",
            dst.join(".ferry").to_str().unwrap(),
        ]);
        expect_code(&o, 8);
        assert_eq!(
            fs::read(&p).unwrap(),
            b,
            "commit {what}: the damaged record was rewritten"
        );
        cases += 1;
    }
    eprintln!("damaged-state cases: {cases}");
    assert!(cases > 40);
}
