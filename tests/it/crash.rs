//! A crash at every named failpoint of the engine, on one rank and on three: the disk as the crash
//! left it keeps invariants 1-3, and a resume with another rank count ends committed and
//! identical. (The full matrix with power loss is its own suite; this is the core of it.)

use crate::util::*;

const POINTS: &[&str] = &[
    "plan::written",
    "copy::unit_written",
    "copy::unit_synced",
    "journal::written",
    "journal::synced",
    "copy::all_done",
    "commit::before_decision",
    "commit::decision_written",
    "commit::file_finished",
    "commit::renamed",
    "commit::dirs_synced",
    "commit::before_record",
    "commit::record_written",
    "delete::source",
    "delete::recorded",
];

#[test]
fn a_crash_at_any_failpoint_then_resume_converges() {
    let s = Scratch::new();
    let src = s.path("src");
    let mut r = Rng::new(11);
    for i in 0..6 {
        write_file(
            &src.join(format!("d{}/f{i}", i % 2)),
            30_000 + i * 5_000,
            &mut r,
        );
    }
    write_file(&src.join("empty"), 0, &mut r);
    std::os::unix::fs::symlink("d0/f0", src.join("ln")).unwrap();
    let reference = s.path("reference");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&reference)
        .status()
        .unwrap()
        .success());

    let mut cells = 0;
    for (ranks, again) in [(1, "2"), (3, "1")] {
        for point in POINTS {
            for nth in [1, 2] {
                for victim in 0..ranks {
                    if ranks > 1 && victim != (nth as usize) % ranks {
                        continue; // one victim per (point, hit) keeps the run short
                    }
                    cells += 1;
                    let cell = format!("{point}@{victim}#{nth} on {ranks} rank(s)");
                    // Fresh sources for every cell (delete-source removes them).
                    let _ = std::fs::remove_dir_all(&src);
                    assert!(std::process::Command::new("cp")
                        .arg("-a")
                        .arg(&reference)
                        .arg(&src)
                        .status()
                        .unwrap()
                        .success());
                    let dst = s.path(&format!("dst-{cells}"));
                    let o = s
                        .ferry()
                        .env("FERRY_FAILPOINTS", format!("{point}=exit@{victim}#{nth}"))
                        .args([
                            "copy",
                            "--delete-source",
                            "--chunk-size",
                            "8K",
                            "--threads",
                            "2",
                            "--ranks",
                            &ranks.to_string(),
                        ])
                        .arg(&src)
                        .arg(&dst)
                        .output()
                        .unwrap();
                    let crashed = code(&o) == 99;
                    assert!(crashed || code(&o) == 0, "{cell}: {}", stderr(&o));
                    // Invariant 2: no torn file at a final name.
                    assert_no_torn_finals(&reference, &dst);
                    let state = dst.join(".ferry");
                    let id = std::fs::read_dir(&state)
                        .unwrap()
                        .next()
                        .unwrap()
                        .unwrap()
                        .file_name();
                    let id = id.to_str().unwrap().to_string();
                    let committed = state.join(&id).join("commit").exists();
                    // Invariant 1: a commit record means everything is final and identical.
                    if committed {
                        assert_same_tree(&reference, &dst);
                    }
                    // Invariant 3: sources go only after the commit.
                    if !committed {
                        assert_same_tree(&reference, &src);
                    }
                    let o = s.run(&[
                        "resume",
                        &id,
                        "--state-dir",
                        state.to_str().unwrap(),
                        "--ranks",
                        again,
                    ]);
                    expect_code(&o, 0);
                    assert_same_tree(&reference, &dst);
                    assert!(!src.exists(), "{cell}: sources not removed");
                    assert!(temps_in(&dst).is_empty(), "{cell}: temporaries left");
                    let st = status(&s, &id, &state);
                    assert_eq!(st["state"], "committed", "{cell}");
                    assert_eq!(st["sources_removed"], true, "{cell}");
                }
            }
        }
    }
    eprintln!("crash cells: {cells}");
}
