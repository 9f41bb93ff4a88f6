//! The local layout: each rank copies its own private files (`{rank}` in SRC), and mistakes in
//! placing them are caught before any data moves.

use std::fs;

use crate::util::*;

fn rank_sources(s: &Scratch, per_rank: &[usize]) {
    let mut r = Rng::new(77);
    for (rank, &files) in per_rank.iter().enumerate() {
        let d = s.path(&format!("node/r{rank}"));
        fs::create_dir_all(&d).unwrap();
        for f in 0..files {
            write_file(&d.join(format!("ckpt.{f}")), 1 + r.below(300_000), &mut r);
        }
    }
}

#[test]
fn each_rank_copies_its_own_files_and_unequal_loads_are_fine() {
    let s = Scratch::new();
    // Rank 2 holds nothing; rank 0 holds far more than the others.
    rank_sources(&s, &[40, 3, 0, 1]);
    let o = s.run(&[
        "copy",
        "--ranks",
        "4",
        "--chunk-size",
        "64K",
        "--json",
        "node/r{rank}",
        "pfs/rank{rank}",
    ]);
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for rank in 0..4 {
        assert_same_tree(
            &s.path(&format!("node/r{rank}")),
            &s.path(&format!("pfs/rank{rank}")),
        );
    }
    // Each rank copied exactly its own bytes.
    let per: Vec<u64> = sum["bytes_per_rank"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    for (rank, &got) in per.iter().enumerate() {
        let mine: u64 = fs::read_dir(s.path(&format!("node/r{rank}")))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(got, mine, "rank {rank}");
    }
    // The state is shared beside the per-rank destinations, and verify passes.
    let id = sum["id"].as_str().unwrap();
    assert!(s.path("pfs/.ferry").join(id).join("commit").exists());
    expect_code(&s.run(&["verify", id]), 0);
}

#[test]
fn two_ranks_planning_one_destination_path_is_a_usage_error_before_data_moves() {
    let s = Scratch::new();
    rank_sources(&s, &[2, 2]);
    let o = s.run(&["copy", "--ranks", "2", "node/r{rank}", "pfs/all"]);
    expect_code(&o, 2);
    let e = stderr(&o);
    assert!(
        e.contains("rank 0") && e.contains("rank 1") && e.contains("ckpt.0"),
        "{e}"
    );
    // Nothing was copied and no transfer was left half-made.
    assert!(!s.path("pfs/all/ckpt.0").exists());
    assert!(temps_in(&s.path("pfs")).is_empty());
    let o = s.run(&[
        "list",
        "--state-dir",
        s.path("pfs/all/.ferry").to_str().unwrap(),
    ]);
    expect_code(&o, 0);
    assert_eq!(
        stdout(&o).lines().count(),
        1,
        "only the header: {}",
        stdout(&o)
    );
}

#[test]
fn a_local_transfer_resumes_only_on_its_own_rank_count() {
    let s = Scratch::new();
    rank_sources(&s, &[3, 3, 3]);
    let o = s.run(&[
        "copy",
        "--ranks",
        "3",
        "--id",
        "loc",
        "node/r{rank}",
        "pfs/r{rank}",
    ]);
    expect_code(&o, 0);
    fs::remove_file(s.path("pfs/.ferry/loc/commit")).unwrap();
    let o = s.run(&["resume", "loc", "--ranks", "2"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("3 ranks"), "{}", stderr(&o));
    let o = s.run(&["resume", "loc", "--ranks", "3"]);
    expect_code(&o, 0);
    for rank in 0..3 {
        assert_same_tree(
            &s.path(&format!("node/r{rank}")),
            &s.path(&format!("pfs/r{rank}")),
        );
    }
}
