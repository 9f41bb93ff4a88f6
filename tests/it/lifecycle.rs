//! A transfer's life as `status` tells it, cancel, locks, damaged journals, `--verify`, the stat
//! check before the commit and `--delete-source`, driven to exact points with failpoints.

use std::fs;
use std::process::{Child, Stdio};

use crate::util::*;

fn spawn(s: &Scratch, fp: &str, args: &[&str]) -> Child {
    s.ferry()
        .env("FERRY_FAILPOINTS", fp)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked()
}

fn finish(child: Child) -> std::process::Output {
    child.wait_with_output().unwrap()
}

fn tree(s: &Scratch) -> std::path::PathBuf {
    let src = s.path("src");
    let mut r = Rng::new(5);
    numbered_files(&src, 12, 3, 50_000, 7919, &mut r);
    src
}

#[test]
fn status_tells_the_truth_at_every_stage() {
    let s = Scratch::new();
    let src = tree(&s);
    let state = s.path("dst/.ferry");
    let state_s = state.to_str().unwrap();

    // planned: the plan is durable, no data has moved, a run is live.
    let mut c = spawn(
        &s,
        // (Slowed down so the small units are journaled in several batches.)
        "plan::written=pause;journal::synced=pause@0#1;copy::unit_written=delay(5)",
        &[
            "copy",
            "--id",
            "t",
            "--chunk-size",
            "4K",
            "--threads",
            "1",
            "src",
            "dst",
        ],
    );
    s.wait_paused(&mut c);
    let st = status(&s, "t", &state);
    assert_eq!(st["state"], "planned", "{st}");
    assert!(st["live"].is_string());
    assert_eq!(st["bytes_done"], 0);
    assert!(s
        .path("dst")
        .read_dir()
        .unwrap()
        .all(|e| e.unwrap().file_name() == ".ferry"));

    // A second run on the same transfer fails cleanly and touches nothing.
    let o = s.run(&["resume", "t"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    let o = s.run(&["copy", "--id", "t", "src", "dst"]);
    expect_code(&o, 2);

    // copying, with bytes done.
    s.release();
    s.wait_paused(&mut c);
    let st = status(&s, "t", &state);
    assert_eq!(st["state"], "copying", "{st}");
    assert!(st["bytes_done"].as_u64().unwrap() > 0, "{st}");
    assert!(st["bytes_done"].as_u64().unwrap() < st["bytes_total"].as_u64().unwrap());

    // interrupted: killed.
    c.kill().unwrap();
    c.wait().unwrap();
    let st = status(&s, "t", &state);
    assert_eq!(st["state"], "interrupted", "{st}");
    assert!(st["live"].is_null());

    // failed, with its class: a planned source disappears.
    let gone = Vanished::remove(&src.join("d1/f4"));
    let o = s.run(&["resume", "t"]);
    expect_code(&o, 7);
    assert!(stderr(&o).contains("d1/f4"), "{}", stderr(&o));
    let st = status(&s, "t", &state);
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["error"]["class"], "not-found");
    assert!(st["error"]["path"].as_str().unwrap().ends_with("d1/f4"));
    assert!(st["error"]["rank"].is_number());
    assert!(!state.join("t/commit").exists());

    // The cause fixed, a resume commits.
    gone.restore();
    let o = s.run(&["resume", "t"]);
    expect_code(&o, 0);
    let st = status(&s, "t", &state);
    assert_eq!(st["state"], "committed");
    assert!(st["finished"].is_string());
    assert_same_tree(&src, &s.path("dst"));

    // list shows it.
    let o = s.run(&["list", "--state-dir", state_s]);
    assert!(stdout(&o).contains("committed"));
}

#[test]
fn cancel_stops_a_running_transfer_and_removes_its_temporaries() {
    let s = Scratch::new();
    let src = tree(&s);
    let mut c = spawn(
        &s,
        "journal::synced=pause@0#1",
        &[
            "copy",
            "--id",
            "c1",
            "--chunk-size",
            "4K",
            "--threads",
            "2",
            "--ranks",
            "2",
            "src",
            "dst",
        ],
    );
    s.wait_paused(&mut c);
    assert!(
        !temps_in(&s.path("dst")).is_empty(),
        "a paused copy has temporaries"
    );
    let canceller = s
        .ferry()
        .args(["cancel", "c1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    // The cancel request is on disk before the run goes on.
    wait_for(std::time::Duration::from_secs(30), || {
        s.path("dst/.ferry/c1/cancel-request").exists()
    });
    s.release();
    let run = finish(c);
    expect_code(&run, 4);
    let o = finish(canceller);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("cancelled"), "{}", stdout(&o));
    assert!(
        temps_in(&s.path("dst")).is_empty(),
        "temporaries left: {:?}",
        temps_in(&s.path("dst"))
    );
    let st = status(&s, "c1", &s.path("dst/.ferry"));
    assert_eq!(st["state"], "cancelled");
    // Nothing at a final name, sources intact.
    assert_no_torn_finals(&src, &s.path("dst"));
    let o = s.run(&["resume", "c1"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("cancelled"));
    // forget, and the id stays used.
    expect_code(&s.run(&["forget", "c1"]), 0);
    let o = s.run(&[
        "status",
        "c1",
        "--state-dir",
        s.path("dst/.ferry").to_str().unwrap(),
    ]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("forgotten"));
    let o = s.run(&["copy", "--id", "c1", "src", "dst"]);
    expect_code(&o, 2);
}

#[test]
fn cancel_of_an_interrupted_transfer_cleans_up_without_a_run() {
    let s = Scratch::new();
    tree(&s);
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::unit_synced=exit#4")
        .args(["copy", "--id", "k", "--chunk-size", "16K", "src", "dst"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    assert!(!temps_in(&s.path("dst")).is_empty());
    let o = s.run(&["cancel", "k"]);
    expect_code(&o, 0);
    assert!(temps_in(&s.path("dst")).is_empty());
    assert_eq!(status(&s, "k", &s.path("dst/.ferry"))["state"], "cancelled");

    // A cancel that dies after removing the temporaries, before its record: the request stands,
    // and the next run finishes the cancel instead of copying.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::unit_synced=exit#4")
        .args(["copy", "--id", "k2", "--chunk-size", "16K", "src", "dst2"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "cancel::temps_removed=exit")
        .args(["cancel", "k2"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let o = s.run(&["resume", "k2"]);
    expect_code(&o, 4);
    assert_eq!(
        status(&s, "k2", &s.path("dst2/.ferry"))["state"],
        "cancelled"
    );
    assert!(temps_in(&s.path("dst2")).is_empty());
}

#[test]
fn torn_and_corrupt_journal_records_are_discarded_and_redone() {
    let s = Scratch::new();
    let src = tree(&s);
    // Every unit journaled, then the process dies before the decision.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::all_done=exit")
        .args([
            "copy",
            "--id",
            "j",
            "--chunk-size",
            "16K",
            "--threads",
            "1",
            "src",
            "dst",
        ])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let j = s.path("dst/.ferry/j/journal.a1.r0");
    let mut b = fs::read(&j).unwrap();
    let records = (b.len() - 32) / 32;
    assert!(records > 10);
    // Corrupt the 4th unit record (kind 1; the others name temporary files).
    let fourth = (0..records)
        .filter(|i| b[32 + 32 * i + 1] == 1)
        .nth(3)
        .unwrap();
    b[32 + 32 * fourth + 9] ^= 0x10;
    b.extend_from_slice(&[0xFE, 1, 0, 0, 7, 7, 7]); // and a torn tail
    fs::write(&j, &b).unwrap();
    let o = s.run(&["resume", "j", "--json"]);
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(sum["records_discarded"], 2, "{sum}");
    assert_eq!(
        sum["units_copied"], 1,
        "only the unit of the corrupt record is redone: {sum}"
    );
    assert_same_tree(&src, &s.path("dst"));

    // A journal whose header is damaged cannot be read at all: a clear error naming it.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::all_done=exit")
        .args(["copy", "--id", "h", "--chunk-size", "16K", "src", "dst2"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let j = s.path("dst2/.ferry/h/journal.a1.r0");
    let mut b = fs::read(&j).unwrap();
    b[2] ^= 0xff;
    fs::write(&j, &b).unwrap();
    let o = s.run(&["resume", "h"]);
    expect_code(&o, 8);
    assert!(stderr(&o).contains("journal.a1.r0"), "{}", stderr(&o));
}

#[test]
fn verify_catches_a_bad_unit_before_the_commit_and_resume_redoes_it() {
    let s = Scratch::new();
    let src = tree(&s);
    let mut c = spawn(
        &s,
        "copy::all_done=pause",
        &[
            "copy",
            "--id",
            "v",
            "--verify",
            "--chunk-size",
            "16K",
            "src",
            "dst",
        ],
    );
    s.wait_paused(&mut c);
    let tmp = temps_in(&s.path("dst")).into_iter().next().unwrap();
    let mut b = fs::read(&tmp).unwrap();
    b[100] ^= 0x55;
    fs::write(&tmp, &b).unwrap();
    s.release();
    let o = finish(c);
    expect_code(&o, 8);
    assert!(stderr(&o).contains("verify"), "{}", stderr(&o));
    assert!(!s.path("dst/.ferry/v/commit").exists());
    let o = s.run(&["resume", "v"]);
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("dst"));
}

#[test]
fn a_final_file_replaced_behind_ferrys_back_is_never_committed() {
    let s = Scratch::new();
    let src = tree(&s);
    let mut c = spawn(
        &s,
        "commit::dirs_synced=pause",
        &["copy", "--id", "x", "--chunk-size", "16K", "src", "dst"],
    );
    s.wait_paused(&mut c);
    fs::write(s.path("dst/d0/f0"), b"someone else's bytes").unwrap();
    s.release();
    let o = finish(c);
    expect_code(&o, 8);
    assert!(stderr(&o).contains("d0/f0"), "{}", stderr(&o));
    assert!(!s.path("dst/.ferry/x/commit").exists());
    assert_eq!(status(&s, "x", &s.path("dst/.ferry"))["state"], "failed");
    let o = s.run(&["resume", "x"]);
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("dst"));
}

#[test]
fn delete_source_waits_for_the_commit_and_a_resume_finishes_without_sources() {
    let s = Scratch::new();
    let src = tree(&s);
    let keep = s.path("reference");
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&keep)
        .output()
        .unwrap();
    assert!(o.status.success());

    // Killed right after the commit record: sources still all there.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "commit::record_written=exit")
        .args([
            "copy",
            "--id",
            "d",
            "--delete-source",
            "--ranks",
            "2",
            "src",
            "dst",
        ])
        .output()
        .unwrap();
    expect_code(&o, 99);
    assert_same_tree(&keep, &src);
    let st = status(&s, "d", &s.path("dst/.ferry"));
    assert_eq!(st["state"], "committed");
    assert_eq!(st["sources_removed"], false);
    // Killed in the middle of removing sources, then resumed with another rank count.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "delete::source=exit#3")
        .args(["resume", "d", "--ranks", "1"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let o = s.run(&["resume", "d", "--ranks", "3"]);
    expect_code(&o, 0);
    assert!(!src.exists(), "sources removed");
    assert_same_tree(&keep, &s.path("dst"));
    assert_eq!(
        status(&s, "d", &s.path("dst/.ferry"))["sources_removed"],
        true
    );
    expect_code(&s.run(&["verify", "d"]), 0);
}

#[test]
fn a_failed_fsync_stops_the_run_and_resume_redoes_the_work() {
    let s = Scratch::new();
    let src = tree(&s);
    let o = s
        .ferry()
        // The second batch of small units: its syncfs fails.
        .env(
            "FERRY_FAILPOINTS",
            "fsio::syncfs=error(EIO)#2;copy::unit_written=delay(30)",
        )
        .args([
            "copy",
            "--id",
            "e",
            "--chunk-size",
            "16K",
            "--threads",
            "2",
            "src",
            "dst",
        ])
        .output()
        .unwrap();
    // An EIO from a sync means written data was lost: integrity, not a full disk.
    expect_code(&o, 8);
    assert!(
        stderr(&o).contains("written data was lost"),
        "{}",
        stderr(&o)
    );
    let st = status(&s, "e", &s.path("dst/.ferry"));
    assert_eq!(st["state"], "failed");
    assert_eq!(st["error"]["class"], "integrity");
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::unit_written=error(ENOSPC)#2")
        .args(["resume", "e"])
        .output()
        .unwrap();
    expect_code(&o, 5);
    expect_code(&s.run(&["resume", "e"]), 0);
    assert_same_tree(&src, &s.path("dst"));
}

#[test]
fn killed_while_planning_leaves_a_transfer_that_says_so_and_can_be_forgotten() {
    let s = Scratch::new();
    tree(&s);
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "plan::walked=exit")
        .args(["copy", "--id", "p", "src", "dst"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let st = status(&s, "p", &s.path("dst/.ferry"));
    assert_eq!(st["state"], "unknown", "{st}");
    assert!(
        st["error"]["message"].as_str().unwrap().contains("no plan"),
        "{st}"
    );
    let o = s.run(&["resume", "p"]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("no plan"), "{}", stderr(&o));
    expect_code(&s.run(&["forget", "p"]), 0);
    // Nothing reached the destination but ferry's own state.
    assert!(s
        .path("dst")
        .read_dir()
        .unwrap()
        .all(|e| e.unwrap().file_name() == ".ferry"));
}

#[test]
fn past_the_decision_a_cancel_is_refused_and_the_commit_finishes() {
    let s = Scratch::new();
    let src = tree(&s);
    let mut c = spawn(
        &s,
        "commit::decision_written=pause",
        &["copy", "--id", "z", "--chunk-size", "16K", "src", "dst"],
    );
    s.wait_paused(&mut c);
    let o = s.run(&["cancel", "z", "--wait", "1"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("committing"), "{}", stderr(&o));
    c.kill().unwrap();
    c.wait().unwrap();
    // A request that slipped in just after the run's last look (a race) does not win either.
    ferry::state::write_record(
        &s.path("dst/.ferry/z/cancel-request"),
        "cancel-request",
        &ferry::state::Cancelled {
            time: "now".into(),
            by: "test".into(),
        },
    )
    .unwrap();
    let o = s.run(&["resume", "z"]);
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("dst"));
    assert_eq!(status(&s, "z", &s.path("dst/.ferry"))["state"], "committed");
}

#[test]
fn records_of_a_vanished_temporary_file_never_vouch_for_a_new_one() {
    let s = Scratch::new();
    let mut r = Rng::new(21);
    let src = s.path("src");
    write_file(&src.join("b"), 128 << 10, &mut r);
    // Attempt 1: both chunks of b journaled, then the process dies before the decision.
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "copy::all_done=exit")
        .args(["copy", "--id", "v", "--chunk-size", "64K", "src", "dst"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    let tmp = temps_in(&s.path("dst"));
    assert_eq!(tmp.len(), 1);
    fs::remove_file(&tmp[0]).unwrap();
    // Attempt 2: rank 1 re-creates the file at full length by writing the second chunk while
    // rank 0 has not yet rewritten the first; then everything dies.
    let o = s
        .ferry()
        .env(
            "FERRY_FAILPOINTS",
            "copy::unit_start=delay(3000)@0;copy::unit_synced=exit@1",
        )
        .args(["resume", "v", "--ranks", "2"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    // Attempt 3 must not trust attempt 1's record of the first chunk (those bytes are gone).
    let o = s.run(&["resume", "v", "--json"]);
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("dst"));
    expect_code(&s.run(&["verify", "v"]), 0);
}

#[test]
fn delete_source_keeps_a_source_that_changed_after_it_was_copied() {
    let s = Scratch::new();
    let src = tree(&s);
    let reference = s.path("reference");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&reference)
        .status()
        .unwrap()
        .success());
    let o = s
        .ferry()
        .env("FERRY_FAILPOINTS", "commit::record_written=exit")
        .args(["copy", "--id", "w", "--delete-source", "src", "dst"])
        .output()
        .unwrap();
    expect_code(&o, 99);
    // The application writes its next checkpoint where the copied one was.
    fs::write(src.join("d0/f0"), b"the next checkpoint, never copied").unwrap();
    let o = s.run(&["resume", "w"]);
    expect_code(&o, 0);
    assert_eq!(
        fs::read(src.join("d0/f0")).unwrap(),
        b"the next checkpoint, never copied"
    );
    assert!(!src.join("d1/f1").exists(), "unchanged sources are removed");
    let st = status(&s, "w", &s.path("dst/.ferry"));
    assert_eq!(st["sources_removed"], false);
    assert_same_tree(&reference, &s.path("dst"));
}
