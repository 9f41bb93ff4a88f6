//! ferry under a real MPI launcher: `mpirun -n 1..8` (oversubscribed on a small machine) running
//! the real binary, in both layouts, with ranks killed, failing and panicking.
//!
//! The project sets Open MPI's run-as-root variables and `--oversubscribe` here, as a user never
//! has to. Every launch runs under a deadline, so a hang fails the test instead of the CI.

#[path = "../tests/it/util.rs"]
mod util;

mod axl;
mod slurm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry::state::TransferDir;
use util::*;

/// How long any MPI job may take in these tests before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(120);
/// How long the job may take to end after one of its ranks died.
const DEATH_BOUND: Duration = Duration::from_secs(20);

fn mpirun(s: &Scratch, n: usize, args: &[&str]) -> Command {
    let mut c = mpirun_ferry(s, n);
    c.args(args);
    c
}

/// Wait for a child with the deadline; a hung job is killed and fails the test.
fn wait_deadline(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "MPI job still running after {limit:?}; stderr:\n{}",
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run(s: &Scratch, n: usize, args: &[&str], fp: Option<&str>) -> Output {
    let mut c = mpirun(s, n, args);
    if let Some(fp) = fp {
        c.env("FERRY_FAILPOINTS", fp);
    }
    piped(&mut c)
}

/// Spawn `c` with its output captured and wait for it under the deadline.
fn piped(c: &mut Command) -> Output {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    wait_deadline(child, DEADLINE)
}

/// The pid of MPI rank `rank` of this scratch's job (found by its environment: Open MPI's rank
/// variable, or Slurm's under srun).
fn rank_pid(s: &Scratch, rank_var: &str, rank: usize) -> Option<i32> {
    let tag = format!("FERRY_TEST_TAG={}", s.dir.path().display());
    let want = format!("{rank_var}={rank}");
    for e in fs::read_dir("/proc").ok()? {
        let e = e.ok()?;
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if vars.contains(&tag.as_bytes()) && vars.contains(&want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// The pids of a running job's ranks `0..ranks`.
fn rank_pids(s: &Scratch, ranks: usize) -> Vec<i32> {
    (0..ranks)
        .map(|r| rank_pid(s, "OMPI_COMM_WORLD_RANK", r).expect("rank pid"))
        .collect()
}

/// Wait until every one of `pids` has exited (gone, or a zombie: its files, and so its locks,
/// are closed). A rank killed while in the kernel, e.g. in an fsync, may outlive mpirun's exit by
/// a moment, and its lock with it; its environment is unreadable before its files are closed, so
/// the pids are taken while the job runs.
fn wait_job_gone(pids: &[i32]) {
    wait_for(DEATH_BOUND, || {
        pids.iter().all(|pid| {
            match fs::read_to_string(format!("/proc/{pid}/stat")) {
                // The state follows the parenthesised command name.
                Ok(stat) => stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
                Err(_) => true,
            }
        })
    });
}

fn sources(s: &Scratch, files: usize, size: u64) -> PathBuf {
    let src = s.path("src");
    let mut r = Rng::new(3);
    numbered_files(&src, files as u64, 3, size, 1013, &mut r);
    fs::create_dir_all(src.join("empty")).unwrap();
    std::os::unix::fs::symlink("d0/f0", src.join("ln")).unwrap();
    src
}

fn committed(state: &Path, id: &str) -> bool {
    state.join(id).join("commit").exists()
}

#[test]
fn shared_layout_on_1_2_4_8_ranks_is_identical_balanced_and_committed_by_rank_0() {
    let s = Scratch::new();
    let src = s.path("src");
    let chunk = 256 << 10;
    awkward_tree(&src, chunk, 3 << 20, 8);
    for n in [1, 2, 4, 8] {
        let dst = format!("dst{n}");
        let mut c = mpirun(
            &s,
            n,
            &[
                "copy",
                "--json",
                "--chunk-size",
                "256K",
                "--threads",
                "2",
                "src",
                &dst,
            ],
        );
        c.env("FERRY_FAILPOINTS_LIST", "1");
        let o = piped(&mut c);
        expect_code(&o, 0);
        let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_same_tree(&src, &s.path(&dst));
        let per: Vec<u64> = sum["bytes_per_rank"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(per.len(), n);
        let (mx, mn) = (per.iter().max().unwrap(), per.iter().min().unwrap());
        assert!(mx - mn <= chunk, "n={n}: unbalanced {per:?}");
        // Only rank 0 passes the commit record's failpoints, once.
        let err = stderr(&o);
        let writers: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("failpoint commit::record_written"))
            .collect();
        assert_eq!(
            writers,
            vec!["failpoint commit::record_written r0"],
            "n={n}"
        );
        // Only rank 0 prints the summary: one JSON document on stdout.
        assert_eq!(stdout(&o).matches("\"id\"").count(), 1);
        let id = sum["id"].as_str().unwrap();
        expect_code(&s.run(&["verify", id]), 0);
    }
}

#[test]
fn local_layout_private_sources_unequal_loads_and_duplicate_destinations() {
    let s = Scratch::new();
    let mut r = Rng::new(4);
    let loads = [30usize, 0, 2, 7];
    for (rank, &k) in loads.iter().enumerate() {
        fs::create_dir_all(s.path(&format!("node{rank}/ckpt"))).unwrap();
        for f in 0..k {
            write_file(
                &s.path(&format!("node{rank}/ckpt/part.{f}")),
                1 + r.below(400_000),
                &mut r,
            );
        }
    }
    let o = run(
        &s,
        4,
        &[
            "copy",
            "--json",
            "--chunk-size",
            "64K",
            "node{rank}/ckpt",
            "pfs/rank{rank}",
        ],
        None,
    );
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for rank in 0..4 {
        assert_same_tree(
            &s.path(&format!("node{rank}/ckpt")),
            &s.path(&format!("pfs/rank{rank}")),
        );
    }
    let per = sum["bytes_per_rank"].as_array().unwrap();
    assert_eq!(per[1], 0, "the rank without files copied nothing");
    // One destination for every rank's files: refused before any data moves.
    let o = run(&s, 4, &["copy", "node{rank}/ckpt", "pfs/shared"], None);
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("would both be copied"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        stderr(&o).matches("ferry: error").count(),
        1,
        "rank 0 alone reports it"
    );
    assert!(!s.path("pfs/shared/part.0").exists());
    assert!(temps_in(&s.path("pfs")).is_empty());
}

/// A 4-rank `copy src dst` of 24 MiB in `chunk` units, each slowed down by `delay_ms` so a fault
/// lands mid-copy; returns once something is journaled: (src, state dir, mpirun, id, rank pids).
fn slow_job(
    s: &Scratch,
    chunk: &str,
    delay_ms: u64,
) -> (PathBuf, PathBuf, Child, String, Vec<i32>) {
    let src = sources(s, 12, 2 << 20);
    let state = s.path("dst/.ferry");
    let args = [
        "copy",
        "--chunk-size",
        chunk,
        "--threads",
        "1",
        "src",
        "dst",
    ];
    let mut c = mpirun(s, 4, &args);
    c.env(
        "FERRY_FAILPOINTS",
        format!("copy::unit_written=delay({delay_ms})"),
    );
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    let id = read_id(&mut child);
    let td = TransferDir::new(&state, &id);
    wait_for(DEADLINE, || ferry::status::status(&td).bytes_done > 0);
    let pids = rank_pids(s, 4);
    (src, state, child, id, pids)
}

#[test]
fn sigkill_of_any_rank_ends_the_job_and_resume_on_any_count_converges() {
    for (victim, again) in [(0usize, 4usize), (1, 2), (2, 8), (3, 1)] {
        let s = Scratch::new();
        let (src, state, child, id, pids) = slow_job(&s, "512K", 60);
        let td = TransferDir::new(&state, &id);
        let pid = pids[victim];
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let t0 = Instant::now();
        let o = wait_deadline(child, DEATH_BOUND);
        let ended = t0.elapsed();
        eprintln!(
            "rank {victim} killed: job ended in {ended:?} (exit {:?})",
            o.status.code()
        );
        assert!(!o.status.success());
        wait_job_gone(&pids);
        assert!(!committed(&state, &id), "no commit after a rank died");
        assert_no_torn_finals(&src, &s.path("dst"));
        let st = ferry::status::status(&td);
        assert_eq!(
            st.state,
            ferry::State::Interrupted,
            "{st:?}\n{}",
            stderr(&o)
        );
        let o = run(&s, again, &["resume", &id, "--json"], None);
        expect_code(&o, 0);
        let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(sum["bytes_reused"].as_u64().unwrap() > 0, "{sum}");
        assert_same_tree(&src, &s.path("dst"));
        expect_code(&s.run(&["verify", &id]), 0);
    }
}

#[test]
fn a_signal_to_mpirun_or_to_one_rank_stops_every_rank_and_leaves_it_resumable() {
    // Open MPI's mpirun forwards USR1 at once but passes TERM on to the ranks only about 2 s
    // later (then KILLs them 1 s after): that case copies slowly enough to still be running.
    for (to_launcher, sig, name, delay) in [
        (true, libc::SIGUSR1, "SIGUSR1", 60),
        (true, libc::SIGTERM, "SIGTERM", 150),
        (false, libc::SIGTERM, "SIGTERM", 60),
    ] {
        let s = Scratch::new();
        let (src, state, child, id, pids) = slow_job(&s, "256K", delay);
        let td = TransferDir::new(&state, &id);
        let pid = if to_launcher {
            child.id() as i32
        } else {
            pids[2]
        };
        // SAFETY: kill(2) of a process this test started.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        let t0 = Instant::now();
        let o = wait_deadline(child, DEATH_BOUND);
        let who = if to_launcher { "mpirun" } else { "rank 2" };
        eprintln!(
            "{name} to {who}: job ended in {:?} (exit {:?})",
            t0.elapsed(),
            o.status.code()
        );
        let err = stderr(&o);
        assert!(!o.status.success(), "{err}");
        wait_job_gone(&pids);
        let st = ferry::status::status(&td);
        assert_eq!(
            st.state,
            ferry::State::Interrupted,
            "{name} to {who}: {err}"
        );
        assert!(st.bytes_done < st.bytes_total, "{st:?}");
        assert!(!committed(&state, &id));
        assert_no_torn_finals(&src, &s.path("dst"));
        // Every rank stopped gracefully, and rank 0 printed why (naming the rank that got the
        // signal when only one did).
        assert!(err.contains(&format!("stopped by {name}")), "{err}");
        if sig == libc::SIGUSR1 || !to_launcher {
            assert_eq!(o.status.code(), Some(3), "{err}");
        }
        if !to_launcher {
            assert!(err.contains("[rank 2]"), "{err}");
        }
        let o = run(&s, 2, &["resume", &id, "--json"], None);
        expect_code(&o, 0);
        let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(sum["bytes_reused"].as_u64().unwrap() > 0, "{sum}");
        assert_same_tree(&src, &s.path("dst"));
    }
}

#[test]
fn an_error_on_one_rank_reaches_every_rank_and_a_resume_completes_once_fixed() {
    let s = Scratch::new();
    let mut r = Rng::new(5);
    for rank in 0..4 {
        for f in 0..3 {
            write_file(&s.path(&format!("n{rank}/f{f}")), 100_000, &mut r);
        }
    }
    let mut c = mpirun(&s, 4, &["copy", "--id", "e", "n{rank}", "out/r{rank}"]);
    c.env("FERRY_FAILPOINTS", "plan::written=pause@0");
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    s.wait_paused(&mut child);
    let gone = Vanished::remove(&s.path("n2/f1"));
    s.release();
    let o = wait_deadline(child, DEADLINE);
    expect_code(&o, 7);
    let err = stderr(&o);
    assert!(
        err.contains("[rank 2]") && err.contains("n2/f1") && err.contains("not-found"),
        "{err}"
    );
    assert!(!committed(&s.path("out/.ferry"), "e"));
    let st = status(&s, "e", &s.path("out/.ferry"));
    assert_eq!(st["state"], "failed");
    assert_eq!(st["error"]["rank"], 2);
    gone.restore();
    let o = run(&s, 4, &["resume", "e"], None);
    expect_code(&o, 0);
    for rank in 0..4 {
        assert_same_tree(
            &s.path(&format!("n{rank}")),
            &s.path(&format!("out/r{rank}")),
        );
    }
}

#[test]
fn status_and_cancel_from_another_process_while_the_job_runs() {
    let s = Scratch::new();
    sources(&s, 9, 300_000);
    let mut c = mpirun(
        &s,
        4,
        &["copy", "--id", "c", "--chunk-size", "16K", "src", "dst"],
    );
    c.env("FERRY_FAILPOINTS", "copy::unit_start=pause@0#3");
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    s.wait_paused(&mut child);
    let st = status(&s, "c", &s.path("dst/.ferry"));
    assert_eq!(st["state"], "copying", "{st}");
    assert!(st["live"].as_str().unwrap().contains("pid"));
    let canceller = s
        .ferry()
        .args(["cancel", "c"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    wait_for(DEADLINE, || s.path("dst/.ferry/c/cancel-request").exists());
    s.release();
    let o = wait_deadline(child, DEADLINE);
    expect_code(&o, 4);
    let o = wait_deadline(canceller, DEADLINE);
    expect_code(&o, 0);
    assert_eq!(status(&s, "c", &s.path("dst/.ferry"))["state"], "cancelled");
    assert!(temps_in(&s.path("dst")).is_empty());
}

#[test]
fn ranks_started_with_different_arguments_stop_before_any_data_moves() {
    let s = Scratch::new();
    sources(&s, 2, 1000);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let mut c = mpirun(&s, 1, &["copy", "src", "dstA"]);
    c.args([":", "-n", "1", bin, "copy", "src", "dstB"]);
    let o = piped(&mut c);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("other arguments"), "{}", stderr(&o));
    assert!(!s.path("dstA").exists() && !s.path("dstB").exists());
}

#[test]
fn a_panic_on_any_rank_in_any_thread_ends_the_job_promptly() {
    let s = Scratch::new();
    let src = sources(&s, 6, 200_000);
    let t0 = Instant::now();
    let o = run(
        &s,
        4,
        &[
            "copy",
            "--id",
            "p",
            "--chunk-size",
            "32K",
            "--threads",
            "2",
            "src",
            "dst",
        ],
        Some("copy::unit_written=panic@1#2"),
    );
    let took = t0.elapsed();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("panic"), "{}", stderr(&o));
    assert!(took < DEATH_BOUND, "took {took:?}");
    eprintln!("job ended {took:?} after start, with a panic on rank 1");
    assert!(!committed(&s.path("dst/.ferry"), "p"));
    let o = run(&s, 4, &["resume", "p"], None);
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("dst"));
}

#[test]
fn a_rank_killed_in_the_commit_phase_never_leaves_a_false_commit() {
    for point in [
        "commit::renamed",
        "commit::dirs_synced",
        "commit::decision_written",
    ] {
        let s = Scratch::new();
        let src = sources(&s, 8, 50_000);
        let o = run(
            &s,
            4,
            &["copy", "--id", "k", "--chunk-size", "16K", "src", "dst"],
            Some(&format!("{point}=exit#1")),
        );
        assert!(!o.status.success(), "{point}");
        assert!(!committed(&s.path("dst/.ferry"), "k"), "{point}");
        assert_no_torn_finals(&src, &s.path("dst"));
        let o = run(&s, 2, &["resume", "k"], None);
        expect_code(&o, 0);
        assert_same_tree(&src, &s.path("dst"));
    }
}

#[test]
fn without_a_launcher_the_same_binary_is_one_rank_also_as_an_mpi_singleton() {
    let s = Scratch::new();
    let src = sources(&s, 3, 10_000);
    let o = s
        .ferry()
        .env("FERRY_MPI", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["copy", "--json", "src", "dst"])
        .output()
        .unwrap();
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(sum["ranks"], 1);
    assert_same_tree(&src, &s.path("dst"));
}

/// `srun` on the one-node Slurm cluster of `scripts/slurm-cluster.sh` (`make test` starts it and
/// sets SLURM_CONF). Without SLURM_CONF these tests say so and do nothing.
fn srun(s: &Scratch, n: usize, args: &[&str]) -> Option<Command> {
    if std::env::var_os("SLURM_CONF").is_none() {
        // make test sets FERRY_REQUIRE_SLURM: there a missing cluster is a failure, not a skip.
        assert!(
            std::env::var_os("FERRY_REQUIRE_SLURM").is_none(),
            "SLURM_CONF is not set but FERRY_REQUIRE_SLURM is"
        );
        eprintln!("SLURM_CONF is not set: srun tests need `scripts/slurm-cluster.sh start` (make test does it)");
        return None;
    }
    let mut c = Command::new("srun");
    c.env("FERRY_HOME", s.home())
        .env("FERRY_TEST_TAG", s.dir.path())
        .env_remove("FERRY_FAILPOINTS")
        .current_dir(s.dir.path())
        .stdin(Stdio::null())
        .args(["--mpi=pmix", "--kill-on-bad-exit=1", "-n", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args(args);
    Some(c)
}

#[test]
fn under_srun_the_same_binary_copies_and_a_dead_rank_ends_the_step() {
    let s = Scratch::new();
    let src = sources(&s, 12, 2 << 20);
    let Some(mut c) = srun(
        &s,
        4,
        &["copy", "--json", "--chunk-size", "1M", "src", "whole"],
    ) else {
        return;
    };
    let o = piped(&mut c);
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(sum["ranks"], 4);
    assert_same_tree(&src, &s.path("whole"));

    // SIGKILL of rank 2 mid-copy: the step ends, nothing is committed, a resume on 2 ranks ends it.
    let mut c = srun(
        &s,
        4,
        &[
            "copy",
            "--chunk-size",
            "256K",
            "--threads",
            "1",
            "src",
            "dst",
        ],
    )
    .unwrap();
    c.env("FERRY_FAILPOINTS", "copy::unit_written=delay(60)");
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    let id = read_id(&mut child);
    let state = s.path("dst/.ferry");
    let td = TransferDir::new(&state, &id);
    wait_for(DEADLINE, || ferry::status::status(&td).bytes_done > 0);
    let pid = rank_pid(&s, "SLURM_PROCID", 2).expect("rank 2 pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let o = wait_deadline(child, DEATH_BOUND);
    eprintln!(
        "srun: rank 2 killed, step ended in {:?} (exit {:?})",
        t0.elapsed(),
        o.status.code()
    );
    assert!(!o.status.success());
    assert!(!committed(&state, &id));
    assert_no_torn_finals(&src, &s.path("dst"));
    let o = piped(&mut srun(&s, 2, &["resume", &id]).unwrap());
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("dst"));
}

/// `mpirun -n 3 ferry gen`: each rank writes its own HDF5 checkpoint; the verified copy of them
/// on 2 ranks commits.
#[cfg(feature = "hdf5")]
#[test]
fn under_mpirun_each_rank_generates_its_own_checkpoint_and_a_verified_copy_commits() {
    let s = Scratch::new();
    let o = run(
        &s,
        3,
        &["gen", "ckpt", "--size", "3MiB", "--seed", "4"],
        None,
    );
    expect_code(&o, 0);
    for r in 0..3 {
        let h5 = s.path(&format!("ckpt/rank{r}/ckpt.h5"));
        let w = ferry::h5::check_file(&h5, ferry::h5::Depth::Data).unwrap();
        assert_eq!(w.datasets, 51, "rank {r}");
    }
    assert!(!s.path("ckpt/rank3").exists());
    let o = run(&s, 2, &["copy", "--verify-hdf5", "-v", "ckpt", "out"], None);
    expect_code(&o, 0);
    assert!(
        stderr(&o).contains("HDF5 check (data): 3 file(s)"),
        "{}",
        stderr(&o)
    );
    assert_same_tree(&s.path("ckpt"), &s.path("out"));
}

/// Every collective moves its data in rounds of a bounded size (MPI counts are ints: one
/// message of 2 GiB or more would abort the job). With the bound forced down to 512 bytes
/// (`FERRY_MPI_CHUNK`), so the plan's slices, the journals, the identities and the local
/// layout's entries all take many rounds, both layouts still copy identically and commit.
#[test]
fn with_collectives_cut_into_small_rounds_both_layouts_copy_identically() {
    let s = Scratch::new();
    let src = s.path("src");
    awkward_tree(&src, 64 << 10, 1 << 20, 9);
    let o = piped(
        mpirun(
            &s,
            4,
            &["copy", "--json", "--chunk-size", "64K", "src", "dst"],
        )
        .env("FERRY_MPI_CHUNK", "512"),
    );
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("dst"));
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    expect_code(&s.run(&["verify", sum["id"].as_str().unwrap()]), 0);
    let mut r = Rng::new(12);
    for rank in 0..4 {
        numbered_files(
            &s.path(&format!("node{rank}/ckpt")),
            40,
            4,
            100,
            977,
            &mut r,
        );
    }
    let o = piped(
        mpirun(
            &s,
            4,
            &[
                "copy",
                "--chunk-size",
                "64K",
                "node{rank}/ckpt",
                "pfs/rank{rank}",
            ],
        )
        .env("FERRY_MPI_CHUNK", "512"),
    );
    expect_code(&o, 0);
    for rank in 0..4 {
        assert_same_tree(
            &s.path(&format!("node{rank}/ckpt")),
            &s.path(&format!("pfs/rank{rank}")),
        );
    }
}
