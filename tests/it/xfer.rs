//! The asynchronous library API (`ferry::xfer`): dispatch returns at once, test does not block,
//! wait commits; a process killed mid-flush is taken up by another one from the state alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::xfer::Xfer;
use ferry::{ErrorClass, State};

use crate::util::*;

/// A checkpoint-like set of files and where each goes (explicit pairs, different directories).
fn checkpoint(s: &Scratch, files: u64, size: u64) -> Vec<(PathBuf, PathBuf)> {
    let mut r = Rng::new(21);
    (0..files)
        .map(|i| {
            let src = s.path(&format!("cache/rank{}/ckpt.{i}", i % 3));
            write_file(&src, size + i, &mut r);
            (src, s.path(&format!("pfs/set{}/file{i}.dat", i % 2)))
        })
        .collect()
}

/// Transfer `name` of `pairs`, dispatched with `threads` copy threads.
fn dispatched(name: &str, state: &Path, pairs: &[(PathBuf, PathBuf)], threads: usize) -> Xfer {
    let mut x = Xfer::create(name, state).unwrap();
    for (a, b) in pairs {
        x.add(a, b).unwrap();
    }
    x.set_threads(threads);
    x.dispatch().unwrap();
    x
}

fn same_bytes(pairs: &[(PathBuf, PathBuf)]) {
    for (s, d) in pairs {
        assert_eq!(
            std::fs::read(s).unwrap(),
            std::fs::read(d).unwrap_or_default(),
            "{}",
            d.display()
        );
    }
}

#[test]
fn dispatch_returns_test_reports_and_wait_commits_every_pair() {
    let s = Scratch::new();
    let pairs = checkpoint(&s, 12, 3 << 20);
    let state = s.path("state");
    let mut x = dispatched("flush-1", &state, &pairs, 2);
    // The caller computes meanwhile; test never blocks and eventually says done.
    wait_for(Duration::from_secs(120), || x.test().done);
    let p = x.test();
    assert_eq!(
        p.bytes_total,
        pairs
            .iter()
            .map(|(a, _)| a.metadata().unwrap().len())
            .sum::<u64>()
    );
    assert_eq!(p.bytes_done, p.bytes_total);
    // Prepared, not yet committed: no final name exists before wait.
    assert!(pairs.iter().all(|(_, d)| !d.exists()));
    let td = ferry::state::TransferDir::new(&state, "flush-1");
    assert_eq!(ferry::status::status(&td).state, State::Prepared);
    let sum = x.wait().unwrap();
    assert_eq!(sum.state, State::Committed);
    same_bytes(&pairs);
    let st = ferry::status::status(&ferry::state::TransferDir::new(&state, "flush-1"));
    assert_eq!(st.state, State::Committed);
    // Waiting again is harmless; adding after dispatch is refused.
    assert_eq!(x.wait().unwrap().state, State::Committed);
    assert_eq!(
        x.add(&pairs[0].0, s.path("late")).unwrap_err().class,
        ErrorClass::Usage
    );
    // Free: the state goes, the files stay.
    x.free().unwrap();
    assert!(!td.path.exists());
    same_bytes(&pairs);
}

#[test]
fn misuse_is_a_usage_error_and_touches_nothing() {
    let s = Scratch::new();
    let state = s.path("state");
    let mut x = Xfer::create("empty", &state).unwrap();
    assert_eq!(
        x.wait().unwrap_err().class,
        ErrorClass::Usage,
        "wait before dispatch"
    );
    assert_eq!(
        x.dispatch().unwrap_err().class,
        ErrorClass::Usage,
        "nothing added"
    );
    assert!(Xfer::create("bad/name", &state).is_err());
    let mut y = Xfer::create("missing", &state).unwrap();
    y.add(s.path("nope"), s.path("out")).unwrap();
    y.dispatch().unwrap();
    assert_eq!(y.wait().unwrap_err().class, ErrorClass::NotFound);
    assert!(!s.path("out").exists());
    assert_eq!(
        Xfer::open("never", &state).unwrap_err().class,
        ErrorClass::Usage,
        "open of an unknown transfer"
    );
}

#[test]
fn cancel_stops_a_running_flush_and_leaves_no_file_behind() {
    let s = Scratch::new();
    let pairs = checkpoint(&s, 40, 1 << 20);
    let state = s.path("state");
    let mut x = dispatched("cancelled", &state, &pairs, 1);
    x.cancel().unwrap();
    assert!(x.test().done);
    let st = ferry::status::status(&ferry::state::TransferDir::new(&state, "cancelled"));
    // Either the cancel came first, or the flush had prepared everything (then it is not
    // committed, and cancel removed the temporaries all the same).
    assert_eq!(st.state, State::Cancelled, "{st:?}");
    assert!(pairs.iter().all(|(_, d)| !d.exists()));
    assert!(temps_in(&s.path("pfs")).is_empty());
    x.free().unwrap();
}

/// Run as a child process by the test below: dispatch a flush that dies (`_exit`) mid-copy.
#[test]
#[ignore = "run by a_flush_killed_mid_copy_is_resumed_by_another_process_from_its_state"]
fn child_flush_that_dies() {
    let Some(dir) = std::env::var_os("FERRY_XFER_CHILD") else {
        return;
    };
    let dir = Path::new(&dir);
    let list = std::fs::read_to_string(dir.join("pairs")).unwrap();
    let mut x = Xfer::create("killed", &dir.join("state")).unwrap();
    for line in list.lines() {
        let (a, b) = line.split_once('\t').unwrap();
        x.add(a, b).unwrap();
    }
    x.set_threads(1);
    x.dispatch().unwrap();
    let _ = x.wait();
    unreachable!("the failpoint ends this process mid-copy");
}

#[cfg(feature = "failpoints")]
#[test]
fn a_flush_killed_mid_copy_is_resumed_by_another_process_from_its_state() {
    let s = Scratch::new();
    // Units of 8 MiB and more are journaled one by one (smaller ones in batches).
    let pairs = checkpoint(&s, 6, 9 << 20);
    let list: String = pairs
        .iter()
        .map(|(a, b)| format!("{}\t{}\n", a.display(), b.display()))
        .collect();
    std::fs::write(s.path("pairs"), list).unwrap();
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "xfer::child_flush_that_dies",
            "--nocapture",
        ])
        .env("FERRY_XFER_CHILD", s.dir.path())
        // Each unit takes 300 ms, so the journal (fsynced every 200 ms) holds the first ones.
        .env(
            "FERRY_FAILPOINTS",
            "copy::unit_written=delay(300);copy::unit_start=exit@0#5",
        )
        .output()
        .unwrap();
    assert!(!o.status.success(), "the child should have died mid-copy");
    let state = s.path("state");
    let td = ferry::state::TransferDir::new(&state, "killed");
    let st = ferry::status::status(&td);
    assert_eq!(st.state, State::Interrupted, "{st:?}");
    assert!(
        st.units_done > 0 && st.units_done < st.units_total,
        "{st:?}"
    );
    assert!(
        pairs.iter().all(|(_, d)| !d.exists()),
        "nothing final before the commit"
    );
    // Another process (here: this one) takes it up from the state alone.
    let mut x = Xfer::open("killed", &state).unwrap();
    assert_eq!(
        x.add(&pairs[0].0, s.path("x")).unwrap_err().class,
        ErrorClass::Usage
    );
    x.dispatch().unwrap();
    let sum = x.wait().unwrap();
    assert_eq!(sum.state, State::Committed);
    assert!(sum.bytes_reused > 0, "finished units were kept: {sum:?}");
    same_bytes(&pairs);
    x.free().unwrap();
}

#[test]
fn collective_dispatch_test_and_wait_commit_only_when_every_rank_prepared_and_free_cleans_up() {
    let s = Scratch::new();
    let pairs = checkpoint(&s, 9, 1 << 20);
    let state = s.path("state");
    let run = |broken: Option<usize>| {
        ferry::comm::run_threads(3, |c| {
            let r = c.rank();
            let tag = if broken.is_some() { "b" } else { "a" };
            let mut x = Xfer::create(&format!("ckpt-{tag}-{r}"), &state)?;
            for (i, (a, b)) in pairs.iter().enumerate().filter(|(i, _)| i % 3 == r) {
                let b = b.with_extension(tag);
                if broken == Some(r) && i == r {
                    x.add(s.path("gone"), b)?;
                } else {
                    x.add(a, b)?;
                }
            }
            // Collective dispatch and test: every rank learns when all are done.
            x.dispatch_all(c)?;
            loop {
                let p = x.test_all(c)?;
                if p.done {
                    assert!(broken.is_some() || p.bytes_done == p.bytes_total);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let res = x.wait_all(c);
            if res.is_ok() {
                // Finished with: its state goes.
                x.free()?;
            }
            res
        })
    };
    // Rank 1 adds a source that does not exist: no rank commits, every rank learns why.
    for res in run(Some(1)) {
        let e = res.unwrap_err();
        assert_eq!((e.class, e.rank), (ErrorClass::NotFound, Some(1)), "{e}");
    }
    assert!(pairs.iter().all(|(_, d)| !d.with_extension("b").exists()));
    for r in [0, 2] {
        let td = ferry::state::TransferDir::new(&state, &format!("ckpt-b-{r}"));
        assert_eq!(ferry::status::status(&td).state, State::Prepared);
        // Given up: free cancels it (its temporaries go) and removes its state.
        let mut x = Xfer::open(&td.id, &state).unwrap();
        x.free().unwrap();
        assert!(!td.path.exists());
    }
    assert!(temps_in(&s.path("pfs")).is_empty());
    // All well: every rank commits.
    for res in run(None) {
        assert_eq!(res.unwrap().state, State::Committed);
    }
    for r in 0..3 {
        assert!(!state.join(format!("ckpt-a-{r}")).exists(), "freed");
    }
    for (a, d) in &pairs {
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(d.with_extension("a")).unwrap()
        );
    }
}

/// Run as a child process (its own registry) by the test below: dispatch a slow flush, stop.
#[test]
#[ignore = "run by stop_cancels_what_this_process_dispatched"]
fn child_that_stops() {
    let Some(dir) = std::env::var_os("FERRY_XFER_CHILD") else {
        return;
    };
    let dir = Path::new(&dir);
    let src = dir.join("cache");
    let mut x = Xfer::create("stopped", &dir.join("state")).unwrap();
    x.add(&src, dir.join("pfs")).unwrap();
    x.set_threads(1);
    x.dispatch().unwrap();
    let td = ferry::state::TransferDir::new(&dir.join("state"), "stopped");
    wait_for(Duration::from_secs(60), || {
        ferry::status::status(&td).state == State::Copying
    });
    // Somewhere else in the program (it need not hold the Xfer): stop everything.
    assert_eq!(ferry::xfer::stop().unwrap(), 1);
    assert_eq!(x.wait().unwrap_err().class, ErrorClass::Cancelled);
    x.free().unwrap();
    println!("CHILD-STOPPED");
}

#[cfg(feature = "failpoints")]
#[test]
fn stop_cancels_what_this_process_dispatched() {
    let s = Scratch::new();
    let mut r = Rng::new(4);
    numbered_files(&s.path("cache"), 30, 3, 1 << 20, 7, &mut r);
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "xfer::child_that_stops",
            "--nocapture",
        ])
        .env("FERRY_XFER_CHILD", s.dir.path())
        .env("FERRY_HOME", s.home())
        .env("FERRY_FAILPOINTS", "copy::unit_written=delay(50)")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("CHILD-STOPPED"),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    assert!(temps_in(&s.path("pfs")).is_empty());
    assert!(!s.path("state/stopped").exists(), "freed");
    // Nothing recorded any more: a later stop has nothing to do.
    assert!(std::fs::read_dir(s.home().join("xfers"))
        .unwrap()
        .next()
        .is_none());
}
