//! The job scripts of `slurm/`, submitted with `sbatch` to the one-node Slurm cluster of
//! `scripts/slurm-cluster.sh` (make test starts it and sets SLURM_CONF), as a user submits them:
//! copied into a job directory, knobs in the environment. Each test waits for its jobs
//! (`sbatch --wait`) and checks the destination, the transfer's state and the job's log.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferry::state::TransferDir;

use crate::util::*;
use crate::{piped, sources};

/// The cluster is there (or make test demands it); without it these tests say so and pass.
fn have_cluster() -> bool {
    if std::env::var_os("SLURM_CONF").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("FERRY_REQUIRE_SLURM").is_none(),
        "SLURM_CONF is not set but FERRY_REQUIRE_SLURM is"
    );
    eprintln!("SLURM_CONF is not set: the job-script tests need `scripts/slurm-cluster.sh start`");
    false
}

/// The job scripts copied into `DIR/jobs`, as a user copies them beside their own.
fn job_dir(s: &Scratch) -> PathBuf {
    let jobs = s.path("jobs");
    fs::create_dir_all(&jobs).unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm");
    for f in fs::read_dir(&here).unwrap() {
        let f = f.unwrap().path();
        fs::copy(&f, jobs.join(f.file_name().unwrap())).unwrap();
    }
    jobs
}

/// `sbatch --wait --parsable` of `script` from the job directory with `env` as knobs. The
/// environment is the one a user's shell would have: ferry's binary named by FERRY, its registry
/// in the scratch home; Open MPI's run-as-root switches are the project's, never the user's.
fn sbatch(s: &Scratch, script: &str, env: &[(&str, &str)], opts: &[&str]) -> Command {
    let jobs = s.path("jobs");
    let mut c = Command::new("sbatch");
    c.current_dir(&jobs)
        .env("FERRY", env!("CARGO_BIN_EXE_ferry"))
        .env("FERRY_HOME", s.home())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_base_warn_component_unused", "0")
        .env_remove("FERRY_FAILPOINTS")
        .env_remove("FERRY_JOB_SH")
        .env_remove("FERRY_LAUNCH")
        .stdin(Stdio::null())
        .args(["--parsable", "--output"])
        .arg(s.path("job-%j.out"))
        .args(opts)
        .arg(jobs.join(script));
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// The job id sbatch printed and the job's log.
fn job_log(s: &Scratch, o: &Output) -> (String, String) {
    let id = stdout(o).trim().split(';').next().unwrap().to_string();
    let log = fs::read_to_string(s.path(&format!("job-{id}.out"))).unwrap_or_default();
    (id, log)
}

/// `scontrol show job`'s `JobState` and `ExitCode` of a finished job.
fn job_state(id: &str) -> (String, String) {
    let o = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .unwrap();
    let line = stdout(&o);
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or("?")
            .to_string()
    };
    (field("JobState="), field("ExitCode="))
}

/// N of the follow-up's "resume of ID: N of M unit(s) already durable" line (0 if absent).
fn kept_units(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("already durable"))
        .find_map(|l| {
            let after = l.split("resume of ").nth(1)?.split(": ").nth(1)?;
            after.split(" of ").next()?.trim().parse().ok()
        })
        .unwrap_or(0)
}

fn status_of(s: &Scratch, id: &str) -> serde_json::Value {
    let o = s.run(&["status", "--json", id]);
    expect_code(&o, 0);
    serde_json::from_slice(&o.stdout).unwrap()
}

fn text(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A checkpoint of small files and where a flush puts it, in a scratch with the job scripts.
struct Ckpt {
    s: Scratch,
    src: PathBuf,
    dst: PathBuf,
}

/// `None` without a cluster (see [`have_cluster`]).
fn checkpoint(dirs: usize, per_dir: usize, size: u64, seed: u64) -> Option<Ckpt> {
    if !have_cluster() {
        return None;
    }
    let s = Scratch::new();
    let src = s.path("ckpt");
    small_files(&src, dirs, per_dir, size, seed);
    job_dir(&s);
    let dst = s.path("pfs/ckpt");
    Some(Ckpt { s, src, dst })
}

impl Ckpt {
    /// `script` flushing this checkpoint as transfer `id` with `launch`, one copy thread per rank
    /// and every unit slowed by `delay_ms`, so a signal lands mid-copy.
    fn slow_flush(
        &self,
        script: &str,
        id: &str,
        launch: &str,
        delay_ms: u64,
        opts: &[&str],
    ) -> Command {
        let delay = format!("copy::unit_written=delay({delay_ms})");
        sbatch(
            &self.s,
            script,
            &[
                ("FERRY_LAUNCH", launch),
                ("FERRY_SRC", text(&self.src)),
                ("FERRY_DST", text(&self.dst)),
                ("FERRY_ID", id),
                ("FERRY_ARGS", "--threads 1"),
                ("FERRY_FAILPOINTS", &delay),
            ],
            opts,
        )
    }
}

#[test]
fn stage_in_and_stage_out_jobs_copy_with_srun_and_with_mpirun() {
    if !have_cluster() {
        return;
    }
    let s = Scratch::new();
    let src = sources(&s, 24, 1 << 20);
    job_dir(&s);
    for launch in ["srun", "mpirun"] {
        // Stage-in, then the computation reads the staged input (here: compares one file).
        let staged = s.path(&format!("bb-{launch}"));
        let app = format!(
            "cmp {} {}",
            text(&src.join("d0/f0")),
            text(&staged.join("d0/f0"))
        );
        let o = piped(&mut sbatch(
            &s,
            "stage-in.sbatch",
            &[
                ("FERRY_LAUNCH", launch),
                ("FERRY_SRC", text(&src)),
                ("FERRY_DST", text(&staged)),
                ("FERRY_APP", &app),
            ],
            &["--wait"],
        ));
        let (job, log) = job_log(&s, &o);
        assert!(o.status.success(), "stage-in with {launch}: {log}");
        assert_same_tree(&src, &staged);
        let st = status_of(&s, &format!("stage-in-{job}"));
        assert_eq!(st["state"], "committed", "{st}");
        assert_eq!(st["ranks"], 4, "{st}");
        assert!(log.contains("committed"), "{log}");

        // Stage-out of the computation's results, removing them once committed.
        let results = s.path(&format!("results-{launch}"));
        cp_a(&src, &results);
        let out = s.path(&format!("pfs-{launch}"));
        let marker = s.path(&format!("computed-{launch}"));
        let touch = format!("touch {}", text(&marker));
        let o = piped(&mut sbatch(
            &s,
            "stage-out.sbatch",
            &[
                ("FERRY_LAUNCH", launch),
                ("FERRY_SRC", text(&results)),
                ("FERRY_DST", text(&out)),
                ("FERRY_DELETE_SOURCE", "1"),
                ("FERRY_ARGS", "--threads 2 --chunk-size 512KiB"),
                ("FERRY_APP", &touch),
            ],
            &["--wait", "--ntasks=2"],
        ));
        let (job, log) = job_log(&s, &o);
        assert!(o.status.success(), "stage-out with {launch}: {log}");
        assert_same_tree(&src, &out);
        let st = status_of(&s, &format!("stage-out-{job}"));
        assert_eq!(
            (&st["state"], &st["ranks"]),
            (&"committed".into(), &2.into())
        );
        assert_eq!(st["sources_removed"], true, "{st}");
        assert!(
            !results.exists(),
            "the results were removed after the commit"
        );
        assert!(marker.exists(), "the computation ran before the stage-out");
    }
}

#[test]
fn a_flush_stopped_by_its_time_limit_warning_is_committed_by_its_follow_up_job() {
    let Some(ck) = checkpoint(8, 50, 32 << 10, 5) else {
        return;
    };
    // A slow flush (every unit takes a second: 400 units on 4 ranks would need 100 s) in a job
    // of one minute whose warning is due 55 s before the end: Slurm sends USR1 to the script
    // within its 30 s check, the script hands it to ferry, ferry stops and exits 3.
    let mut flush = ck.slow_flush(
        "checkpoint-flush.sbatch",
        "ckpt-7",
        "srun",
        1000,
        &["--time=1", "--signal=B:USR1@55"],
    );
    let Ckpt { s, src, dst } = ck;
    let o = piped(&mut flush);
    let (job1, _) = job_log(&s, &o);
    assert!(o.status.success(), "{}", stderr(&o));
    // The follow-up is queued now, behind the flush, on fewer ranks; it waits for the flush.
    let o = piped(&mut sbatch(
        &s,
        "resume.sbatch",
        &[("FERRY_ID", "ckpt-7")],
        &[
            &format!("--dependency=afterany:{job1}"),
            "--ntasks=2",
            "--wait",
        ],
    ));
    let (job2, log2) = job_log(&s, &o);
    let log1 = fs::read_to_string(s.path(&format!("job-{job1}.out"))).unwrap();
    eprintln!("flush job {job1}:\n{log1}\nfollow-up job {job2}:\n{log2}");
    assert_eq!(
        job_state(&job1),
        ("FAILED".to_string(), "3:0".to_string()),
        "the flush job should have ended `interrupted` (3): {log1}"
    );
    assert!(log1.contains("signal received"), "{log1}");
    assert!(log1.contains("interrupted and resumable"), "{log1}");
    assert!(o.status.success(), "follow-up {job2}: {log2}");
    assert!(log2.contains("transfer ckpt-7 committed"), "{log2}");
    assert!(
        kept_units(&log2) > 0,
        "the follow-up resumed, not restarted: {log2}"
    );
    assert_same_tree(&src, &dst);
    let st = status_of(&s, "ckpt-7");
    assert_eq!(st["state"], "committed", "{st}");

    // A second follow-up finds nothing to do, says so, and succeeds.
    let o = piped(&mut sbatch(
        &s,
        "resume.sbatch",
        &[("FERRY_ID", "ckpt-7")],
        &["--wait", "--ntasks=1"],
    ));
    let (_, log3) = job_log(&s, &o);
    assert!(o.status.success(), "{log3}");
    assert!(log3.contains("already committed"), "{log3}");

    // The flush script submitted again with the same id (a requeued job) resumes, not refuses.
    let o = piped(&mut sbatch(
        &s,
        "checkpoint-flush.sbatch",
        &[
            ("FERRY_SRC", text(&src)),
            ("FERRY_DST", text(&dst)),
            ("FERRY_ID", "ckpt-7"),
        ],
        &["--wait", "--ntasks=1"],
    ));
    let (_, log4) = job_log(&s, &o);
    assert!(o.status.success(), "{log4}");
    assert!(
        log4.contains("exists") && log4.contains("already committed"),
        "{log4}"
    );
}

#[test]
fn a_flush_without_a_warning_killed_at_its_time_limit_is_resumed_by_its_follow_up() {
    // The user forgot `--signal`: the job runs into its limit and Slurm sends SIGTERM to the
    // script and the srun step at once; ferry stops on it (exit 3) within KillWait.
    let Some(ck) = checkpoint(4, 100, 16 << 10, 8) else {
        return;
    };
    let jobs = ck.s.path("jobs");
    let script = fs::read_to_string(jobs.join("checkpoint-flush.sbatch")).unwrap();
    let forgot: String = script
        .lines()
        .filter(|l| !l.starts_with("#SBATCH --signal"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(jobs.join("flush-no-warning.sbatch"), forgot).unwrap();
    // 400 units of 1 s on 4 ranks: 100 s, longer than the job's minute.
    let o = piped(&mut ck.slow_flush(
        "flush-no-warning.sbatch",
        "ckpt-t",
        "srun",
        1000,
        &["--time=1"],
    ));
    let Ckpt { s, src, dst } = ck;
    let (job1, _) = job_log(&s, &o);
    let o = piped(&mut sbatch(
        &s,
        "resume.sbatch",
        &[("FERRY_ID", "ckpt-t")],
        &[&format!("--dependency=afterany:{job1}"), "--wait"],
    ));
    let (_, log2) = job_log(&s, &o);
    let log1 = fs::read_to_string(s.path(&format!("job-{job1}.out"))).unwrap();
    eprintln!("flush job {job1} (no warning):\n{log1}\nfollow-up:\n{log2}");
    assert_eq!(job_state(&job1).0, "TIMEOUT", "{log1}");
    assert!(
        log1.contains("stopping every rank") && log1.contains("interrupted and resumable"),
        "ferry stopped on the limit's signal and said so: {log1}"
    );
    assert!(o.status.success(), "{log2}");
    assert!(
        kept_units(&log2) > 0,
        "the follow-up resumed, not restarted: {log2}"
    );
    assert_same_tree(&src, &dst);
    assert_eq!(status_of(&s, "ckpt-t")["state"], "committed");
}

#[test]
fn a_flush_under_mpirun_stops_on_the_forwarded_signal_and_resumes() {
    let Some(ck) = checkpoint(4, 40, 16 << 10, 6) else {
        return;
    };
    let name = format!("flush-mpirun-{}", std::process::id());
    let child = ck
        .slow_flush(
            "checkpoint-flush.sbatch",
            "ckpt-m",
            "mpirun",
            500,
            &["--wait", &format!("--job-name={name}")],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    let Ckpt { s, src, dst } = ck;
    // Once data moves, the warning a time limit sends, sent now: USR1 to the batch shell only.
    let td = TransferDir::new(&dst.join(".ferry"), "ckpt-m");
    wait_for(Duration::from_secs(60), || {
        ferry::status::status(&td).bytes_done > 0
    });
    let sig = Command::new("scancel")
        .args(["--batch", "--signal=USR1", "--name", &name])
        .status()
        .unwrap();
    assert!(sig.success());
    let o = crate::wait_deadline(child, Duration::from_secs(60));
    let (job, log) = job_log(&s, &o);
    assert_eq!(code(&o), 3, "{log}");
    assert_eq!(job_state(&job), ("FAILED".into(), "3:0".into()), "{log}");
    let st = status_of(&s, "ckpt-m");
    assert_eq!(st["state"], "interrupted", "{st}");
    assert!(st["bytes_done"].as_u64().unwrap() < st["bytes_total"].as_u64().unwrap());
    let o = piped(&mut sbatch(
        &s,
        "resume.sbatch",
        &[("FERRY_ID", "ckpt-m"), ("FERRY_LAUNCH", "mpirun")],
        &["--wait"],
    ));
    let (_, log) = job_log(&s, &o);
    assert!(o.status.success(), "{log}");
    assert_same_tree(&src, &dst);
}

#[test]
fn job_scripts_refuse_to_run_outside_slurm_without_ferry_or_with_an_unknown_launcher() {
    let s = Scratch::new();
    let jobs = job_dir(&s);
    // Outside Slurm: said, and nothing else happens (no cluster needed).
    for script in [
        "stage-in.sbatch",
        "stage-out.sbatch",
        "checkpoint-flush.sbatch",
        "resume.sbatch",
    ] {
        let o = Command::new("bash")
            .arg(jobs.join(script))
            .env_remove("SLURM_JOB_ID")
            .env("FERRY_SRC", "/nonexistent")
            .current_dir(&jobs)
            .output()
            .unwrap();
        expect_code(&o, 2);
        assert!(
            stderr(&o).contains("not inside a Slurm job"),
            "{}",
            stderr(&o)
        );
    }
    if !have_cluster() {
        return;
    }
    let src = sources(&s, 3, 1000);
    let dst = s.path("dst");
    let knobs = |extra: (&'static str, &'static str)| {
        vec![
            ("FERRY_SRC", text(&src).to_string()),
            ("FERRY_DST", text(&dst).to_string()),
            (extra.0, extra.1.to_string()),
        ]
    };
    for (extra, says) in [
        (
            ("FERRY", "/opt/nowhere/ferry"),
            "the ferry binary was not found",
        ),
        (
            ("FERRY_LAUNCH", "mpiexec.hydra"),
            "is not a launcher these scripts know",
        ),
        (("FERRY_ID", ""), "FERRY_ID"),
    ] {
        let env = knobs(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let script = if extra.0 == "FERRY_ID" {
            "checkpoint-flush.sbatch"
        } else {
            "stage-in.sbatch"
        };
        let o = piped(&mut sbatch(&s, script, &env, &["--wait"]));
        let (_, log) = job_log(&s, &o);
        assert_eq!(code(&o), 2, "{extra:?}: {log}");
        assert!(log.contains(says), "{extra:?}: {log}");
        assert!(!dst.exists(), "{extra:?}: nothing may be copied");
    }
    // A follow-up for a transfer that does not exist fails and names it.
    let o = piped(&mut sbatch(
        &s,
        "resume.sbatch",
        &[("FERRY_ID", "never-made")],
        &["--wait", "--ntasks=1"],
    ));
    let (_, log) = job_log(&s, &o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("never-made"), "{log}");
}
