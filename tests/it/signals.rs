//! Signals, a failing rank, transient errors and a source that changes under the copy: each stops
//! (or retries) as the error table says, and leaves a transfer that resumes to an identical copy —
//! or, for a changed source, never commits.

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use ferry::state::TransferDir;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Sources of 2 × 8 MiB, copied in 256 KiB units slowed down by a failpoint, so a run takes
/// seconds and a signal lands mid-copy.
fn slow_sources(s: &Scratch) -> std::path::PathBuf {
    let src = s.path("src");
    let mut r = Rng::new(4);
    write_file(&src.join("a"), 8 << 20, &mut r);
    write_file(&src.join("d/b"), 8 << 20, &mut r);
    src
}

/// `copy src dst` on `ranks` in-process ranks, one thread each, in 256 KiB units (64 of them).
fn slow_copy_args(ranks: &str) -> [&str; 9] {
    [
        "copy",
        "--ranks",
        ranks,
        "--threads",
        "1",
        "--chunk-size",
        "256K",
        "src",
        "dst",
    ]
}

fn start(s: &Scratch, args: &[&str], fp: &str) -> (Child, String) {
    let mut child = s
        .ferry()
        .args(args)
        .env("FERRY_FAILPOINTS", fp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    let id = read_id(&mut child);
    (child, id)
}

fn kill(child: &Child, sig: i32) {
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn finish(child: Child) -> std::process::Output {
    let mut child = child;
    wait_for(LIMIT, || child.try_wait().unwrap().is_some());
    child.wait_with_output().unwrap()
}

#[test]
fn term_int_and_usr1_stop_every_rank_with_interrupted_and_leave_it_resumable() {
    for (sig, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGUSR1, "SIGUSR1"),
    ] {
        let s = Scratch::new();
        let src = slow_sources(&s);
        let args = slow_copy_args("2");
        let (child, id) = start(&s, &args, "copy::unit_written=delay(40)");
        let td = TransferDir::new(&s.path("dst/.ferry"), &id);
        wait_for(LIMIT, || ferry::status::status(&td).bytes_done > 0);
        kill(&child, sig);
        let o = finish(child);
        expect_code(&o, 3);
        let (line, class) = error_line(&o);
        assert_eq!(class, "interrupted", "{name}: {line}");
        assert!(line.contains(&format!("stopped by {name}")), "{line}");
        assert!(stderr(&o).contains(&format!("ferry resume {id}")));
        // It stopped early (64 units at 40 ms on two ranks take over a second), journal flushed.
        let st = ferry::status::status(&td);
        assert_eq!(st.state, ferry::State::Interrupted, "{name}");
        assert!(
            st.bytes_done > 0 && st.bytes_done < st.bytes_total,
            "{name}: {st:?}"
        );
        assert_no_torn_finals(&src, &s.path("dst"));
        let o = s.run(&["resume", &id, "--json"]);
        expect_code(&o, 0);
        let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(sum["bytes_reused"].as_u64(), Some(st.bytes_done), "{name}");
        assert_same_tree(&src, &s.path("dst"));
    }
}

#[test]
fn a_second_signal_exits_at_once_and_the_transfer_still_resumes() {
    let s = Scratch::new();
    let src = slow_sources(&s);
    // Rank 1's copy thread stops at a gate that never opens: the graceful stop cannot finish.
    let args = ["copy", "--ranks", "2", "--threads", "1", "src", "dst"];
    let (mut child, id) = start(&s, &args, "copy::unit_synced=pause@1");
    s.wait_paused(&mut child);
    kill(&child, libc::SIGTERM);
    let first = std::time::Instant::now();
    // The same request by another path at once (as at a Slurm time limit, where the step, srun
    // and the job script all pass the signal on) is not a second signal.
    kill(&child, libc::SIGUSR1);
    // The first signal's effect: the peers are told to stop.
    let notice = s.path(&format!("dst/.ferry/{id}/stop"));
    wait_for(LIMIT, || notice.exists());
    // The rule is about time: past the repeat window, the process still stops gracefully.
    std::thread::sleep(
        (first + ferry::stop::REPEAT).saturating_duration_since(std::time::Instant::now()),
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "a repeat within the window ended it"
    );
    // Past the window a signal is a second one and ends the process at once. (Sent until it
    // does: the window runs from when the process handled the first signal, which under load
    // can be later than when it was sent.)
    let mut child = child;
    wait_for(LIMIT, || {
        kill(&child, libc::SIGTERM);
        std::thread::sleep(std::time::Duration::from_millis(50));
        child.try_wait().unwrap().is_some()
    });
    let o = finish(child);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("second signal"), "{}", stderr(&o));
    let td = TransferDir::new(&s.path("dst/.ferry"), &id);
    assert_eq!(ferry::status::status(&td).state, ferry::State::Interrupted);
    assert_no_torn_finals(&src, &s.path("dst"));
    expect_code(&s.run(&["resume", &id]), 0);
    assert_same_tree(&src, &s.path("dst"));
}

#[test]
fn an_error_on_one_rank_stops_the_others_promptly_and_names_the_rank() {
    let s = Scratch::new();
    let src = slow_sources(&s);
    let args = slow_copy_args("3");
    let (child, id) = start(
        &s,
        &args,
        "copy::unit_written=delay(40);copy::read=error(EACCES)@2#3",
    );
    let o = finish(child);
    expect_code(&o, 6);
    let (line, class) = error_line(&o);
    assert_eq!(class, "permission", "{line}");
    assert!(line.contains("[rank 2]") && line.contains("src/"), "{line}");
    // Without the stop notice ranks 0 and 1 would have copied their whole share (two thirds).
    let st = ferry::status::status(&TransferDir::new(&s.path("dst/.ferry"), &id));
    assert!(st.bytes_done < st.bytes_total / 3, "{st:?}");
    assert_eq!(st.error.as_ref().map(|e| e.rank), Some(Some(2)));
    expect_code(&s.run(&["resume", &id]), 0);
    assert_same_tree(&src, &s.path("dst"));
}

#[test]
fn transient_read_errors_are_retried_with_backoff_and_bounded() {
    let s = Scratch::new();
    let mut r = Rng::new(6);
    let src = s.path("src");
    write_file(&src.join("a"), 3 << 20, &mut r);
    write_file(&src.join("b"), 1000, &mut r);
    // Two failed reads, then the device answers: the copy succeeds and says it retried.
    let o = s
        .ferry()
        .args(["copy", "--threads", "1", "src", "dst"])
        .env("FERRY_FAILPOINTS", "copy::read=error(EIO)#1*2")
        .output()
        .unwrap();
    expect_code(&o, 0);
    assert_eq!(stderr(&o).matches("transient, retrying read").count(), 2);
    assert_same_tree(&src, &s.path("dst"));

    // A device that never answers: bounded by --retries, then `transient` (3), resumable.
    let o = s
        .ferry()
        .args([
            "copy",
            "--id",
            "t",
            "--retries",
            "3",
            "--retry-time",
            "20s",
            "src",
            "dst2",
        ])
        .env("FERRY_FAILPOINTS", "copy::read=error(ETIMEDOUT)#1*")
        .output()
        .unwrap();
    expect_code(&o, 3);
    let (line, class) = error_line(&o);
    assert_eq!(class, "transient", "{line}");
    assert!(line.contains("gave up after 3 attempt(s)"), "{line}");
    let st = status(&s, "t", &s.path("dst2/.ferry"));
    assert_eq!(st["error"]["class"], "transient", "{st}");
    expect_code(&s.run(&["resume", "t"]), 0);
    assert_same_tree(&src, &s.path("dst2"));
}

#[test]
fn a_failed_fsync_is_never_retried_and_resume_redoes_the_unit() {
    // A large unit is fsynced alone, small ones together by one syncfs: either failing stops the
    // run at once, and the resume trusts none of those units.
    for (size, fp) in [
        (9u64 << 20, "fsio::sync_data=error(EIO)"),
        (1 << 20, "fsio::syncfs=error(EIO)"),
    ] {
        let s = Scratch::new();
        let mut r = Rng::new(7);
        let src = s.path("src");
        write_file(&src.join("a"), size, &mut r);
        let o = s
            .ferry()
            .args(["copy", "--id", "f", "src", "dst"])
            .env("FERRY_FAILPOINTS", fp)
            .output()
            .unwrap();
        expect_code(&o, 8);
        assert!(!stderr(&o).contains("retrying"), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("written data was lost"),
            "{}",
            stderr(&o)
        );
        let o = s.run(&["resume", "f", "--json"]);
        expect_code(&o, 0);
        let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            sum["bytes_reused"], 0,
            "{fp}: the unsynced unit was not trusted"
        );
        assert_same_tree(&src, &s.path("dst"));
    }
}

/// Change `src/big` while its one unit is being copied (paused before its second 4 MiB read).
fn change_mid_copy(change: impl Fn(&Path), extra: &[&str], fp: &str) -> std::process::Output {
    let s = Scratch::new();
    let mut r = Rng::new(12);
    write_file(&s.path("src/big"), 12 << 20, &mut r);
    let mut args = vec!["copy", "--id", "c", "--threads", "1"];
    args.extend_from_slice(extra);
    args.extend(["src", "dst"]);
    let (mut child, _) = start(&s, &args, fp);
    s.wait_paused(&mut child);
    change(&s.path("src/big"));
    s.release();
    let o = finish(child);
    assert!(!s.path("dst/big").exists(), "nothing may be committed");
    assert!(!s.path("dst/.ferry/c/commit").exists());
    let st = status(&s, "c", &s.path("dst/.ferry"));
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["error"]["class"], "integrity", "{st}");
    o
}

/// A change made to a source file while it is copied.
type Change = fn(&Path);

fn overwrite(p: &Path, at: u64, keep_mtime: bool) {
    use std::os::unix::fs::FileExt;
    let mtime = fs::metadata(p).unwrap().modified().unwrap();
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&[0x5a; 4096], at).unwrap();
    if keep_mtime {
        f.set_modified(mtime).unwrap();
    }
}

#[test]
fn a_source_truncated_grown_or_rewritten_during_its_copy_is_never_committed() {
    let during = "copy::read=pause#2";
    let cases: [(&str, Change); 4] = [
        ("truncated", |p| {
            let f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(5 << 20).unwrap()
        }),
        ("grown", |p| {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(&[1; 1000]).unwrap();
        }),
        ("rewritten", |p| overwrite(p, 9 << 20, false)),
        ("rewritten with its mtime put back", |p| {
            overwrite(p, 0, true)
        }),
    ];

    for (what, change) in cases {
        let o = change_mid_copy(change, &[], during);
        expect_code(&o, 8);
        let (line, class) = error_line(&o);
        assert_eq!(class, "integrity", "{what}: {line}");
        assert!(line.contains("src/big"), "{what}: {line}");
    }
    // After its unit was copied, a rewrite that keeps size and mtime is caught by --verify, which
    // reads the source again.
    let o = change_mid_copy(
        |p: &Path| overwrite(p, 1 << 20, true),
        &["--verify"],
        "copy::all_done=pause",
    );
    expect_code(&o, 8);
    let (line, _) = error_line(&o);
    assert!(
        line.contains("src/big") && line.contains("changed since they were copied"),
        "{line}"
    );
}
