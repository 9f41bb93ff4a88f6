//! Copies come out identical to their sources, whatever the ranks, threads and chunk size.

use std::ffi::OsString;

use ferry::comm::run_threads;
use ferry::transfer::{self, CopyOptions, RunOptions};
use ferry::State;

use crate::util::*;

fn lib_copy(
    src: &std::path::Path,
    dst: &std::path::Path,
    ranks: usize,
    threads: usize,
    chunk: u64,
) -> ferry::Summary {
    let mut o = CopyOptions::new(vec![OsString::from(src)], OsString::from(dst));
    o.chunk_size = chunk;
    o.threads = threads;
    o.register = false;
    let res = run_threads(ranks, |c| transfer::copy(c, &o, &RunOptions::default()));
    let mut sums: Vec<ferry::Summary> = res.into_iter().map(|r| r.unwrap()).collect();
    for s in &sums {
        assert_eq!(s.state, State::Committed);
    }
    sums.remove(0)
}

#[test]
fn awkward_tree_is_identical_for_every_rank_and_thread_count() {
    let s = Scratch::new();
    let chunk = 64 << 10;
    let src = s.path("src");
    awkward_tree(&src, chunk, 5 * chunk + 3, 1);
    for (ranks, threads) in [
        (1, 1),
        (1, 4),
        (2, 2),
        (3, 1),
        (4, 3),
        (5, 2),
        (7, 1),
        (8, 4),
    ] {
        let dst = s.path(&format!("dst-{ranks}-{threads}"));
        let sum = lib_copy(&src, &dst, ranks, threads, chunk);
        assert_same_tree(&src, &dst);
        assert!(temps_in(&dst).is_empty(), "temporaries left behind");
        assert_eq!(sum.bytes_copied, sum.bytes_total);
        assert_eq!(sum.bytes_per_rank.len(), ranks);
        // Shared layout: bytes balanced within one chunk.
        let (mx, mn) = (
            sum.bytes_per_rank.iter().max().unwrap(),
            sum.bytes_per_rank.iter().min().unwrap(),
        );
        assert!(mx - mn <= chunk, "unbalanced {:?}", sum.bytes_per_rank);
        let td = ferry::state::TransferDir::new(&dst.join(".ferry"), &sum.id);
        assert_eq!(ferry::status::status(&td).state, State::Committed);
        transfer::verify(&td).unwrap();
    }
}

#[test]
fn cli_copy_of_a_large_file_tree_verifies_and_reports_committed() {
    let s = Scratch::new();
    let src = s.path("src");
    let chunk: u64 = 64 << 20;
    awkward_tree(&src, chunk, 300 << 20, 2);
    let dst = s.path("dst");
    let o = s.run(&[
        "copy",
        "--ranks",
        "3",
        "--threads",
        "2",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    expect_code(&o, 0);
    let id = id_of(&o);
    assert_same_tree(&src, &dst);
    let v = s.run(&["verify", &id]);
    expect_code(&v, 0);
    let st = status(&s, &id, &dst.join(".ferry"));
    assert_eq!(st["state"], "committed");
    assert_eq!(st["bytes_done"], st["bytes_total"]);
    assert!(st["error"].is_null());
    // Found by id alone, through the registry.
    let o = s.run(&["status", &id]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("committed"));
}

#[test]
fn verify_finds_a_damaged_destination() {
    let s = Scratch::new();
    let src = s.path("src");
    awkward_tree(&src, 4096, 100_000, 3);
    let dst = s.path("dst");
    let o = s.run(&[
        "copy",
        "--chunk-size",
        "4K",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    expect_code(&o, 0);
    let id = id_of(&o);
    let victim = dst.join("f6_100000");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[50_000] ^= 1;
    std::fs::write(&victim, &bytes).unwrap();
    let v = s.run(&["verify", &id]);
    expect_code(&v, 8);
    assert!(stderr(&v).contains("f6_100000"), "{}", stderr(&v));
}

#[test]
fn several_sources_and_a_single_file() {
    let s = Scratch::new();
    let mut r = Rng::new(9);
    write_file(&s.path("a/x"), 1000, &mut r);
    write_file(&s.path("b/y"), 2000, &mut r);
    write_file(&s.path("c.bin"), 3000, &mut r);
    let o = s.run(&["copy", "a", "b", "c.bin", "out"]);
    expect_code(&o, 0);
    assert_eq!(
        std::fs::read(s.path("out/a/x")).unwrap(),
        std::fs::read(s.path("a/x")).unwrap()
    );
    assert_eq!(
        std::fs::read(s.path("out/b/y")).unwrap(),
        std::fs::read(s.path("b/y")).unwrap()
    );
    assert_eq!(
        std::fs::read(s.path("out/c.bin")).unwrap(),
        std::fs::read(s.path("c.bin")).unwrap()
    );
    // One file to a new name: the state goes beside it.
    let o = s.run(&["copy", "c.bin", "single/copy.bin"]);
    expect_code(&o, 0);
    assert_eq!(
        std::fs::read(s.path("single/copy.bin")).unwrap(),
        std::fs::read(s.path("c.bin")).unwrap()
    );
    assert!(s
        .path("single/.ferry")
        .join(id_of(&o))
        .join("commit")
        .exists());
    // JSON summary.
    let o = s.run(&["copy", "--json", "a", "json-out"]);
    expect_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "committed");
    assert_eq!(v["bytes_total"], 1000);
}

#[test]
fn the_same_inputs_give_the_same_plan() {
    let s = Scratch::new();
    let src = s.path("src");
    awkward_tree(&src, 4096, 20_000, 4);
    let walk = || {
        let mut rep = ferry::plan::WalkReport::default();
        let e = ferry::plan::walk(&src, &s.path("dst"), &[], None, false, &mut rep).unwrap();
        let u = ferry::plan::make_units(&e, 4096);
        (e, u)
    };
    let (e1, u1) = walk();
    let (e2, u2) = walk();
    assert_eq!(e1, e2);
    assert_eq!(u1, u2);
    let files = e1
        .iter()
        .filter(|e| e.kind == ferry::plan::Kind::File)
        .count();
    assert!(u1.len() > files, "big files were split");
}
