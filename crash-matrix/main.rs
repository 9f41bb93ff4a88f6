//! The crash matrix: every failpoint × hit (first, middle, last) × victim rank × action, on 1 and
//! 4 in-process ranks and a subset under `mpirun -n 4`. Each cell runs a copy that the failpoint
//! stops, checks invariants 1–3 on the disk as the crash left it, resumes from that disk twice
//! (on the same rank count and on another), checks invariants 1–4 after each, and ends `survived`, `safe-fail` or
//! `violation`, one JSON line per cell. The suite fails on any violation.
//!
//! `FERRY_CRASH_TIER=pr` (the default, run by `make test`) takes the first and last hit, the
//! first and last rank, and the actions exit, EIO and panic; `full` (`make crash-matrix`) takes
//! everything. `FERRY_CRASH_OUT` names the JSON-lines file (default: target/crash-matrix.jsonl);
//! `FERRY_CRASH_ONLY=point=action@victim#hit/launch` (e.g. `copy::unit_synced=exit@0#1/threads-4`)
//! runs that one cell.

mod hostile;

#[path = "../tests/it/util.rs"]
mod util;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use ferry::failpoints::DECLARED;
use util::*;

/// Points a plain copy-and-resume does not pass (cancel and forget have their own tests).
const NOT_IN_A_COPY: &[&str] = &["cancel::temps_removed", "forget::start"];

#[derive(Clone, Copy, PartialEq)]
enum Tier {
    Pr,
    Full,
}

#[derive(Clone, Copy)]
enum Launch {
    Threads(usize),
    Mpi(usize),
}

impl Launch {
    fn ranks(self) -> usize {
        match self {
            Launch::Threads(n) | Launch::Mpi(n) => n,
        }
    }
    fn name(self) -> String {
        match self {
            Launch::Threads(n) => format!("threads-{n}"),
            Launch::Mpi(n) => format!("mpirun-{n}"),
        }
    }
}

/// What every cell's copy (and the probe run) asks for, the destination aside.
const COPY_FLAGS: [&str; 6] = [
    "--delete-source",
    "--chunk-size",
    "16K",
    "--threads",
    "1",
    "src",
];

fn ferry(s: &Scratch, launch: Launch, args: &[&str], fp: Option<&str>) -> Output {
    ferry_env(s, launch, args, fp, &[])
}

fn ferry_env(
    s: &Scratch,
    launch: Launch,
    args: &[&str],
    fp: Option<&str>,
    env: &[(&str, &Path)],
) -> Output {
    let mut c = match launch {
        Launch::Threads(n) => {
            let mut c = s.ferry();
            c.args(args).args(["--ranks", &n.to_string()]);
            c
        }
        Launch::Mpi(n) => {
            let mut c = mpirun_ferry(s, n);
            c.args(args);
            c
        }
    };
    c.env("FERRY_FAILPOINTS_LIST", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    if let Some(fp) = fp {
        c.env("FERRY_FAILPOINTS", fp);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// How often each failpoint is passed on each rank in an undisturbed run.
fn hit_counts(o: &Output) -> BTreeMap<(String, usize), u64> {
    let mut m = BTreeMap::new();
    for line in String::from_utf8_lossy(&o.stderr).lines() {
        let Some(rest) = line.strip_prefix("failpoint ") else {
            continue;
        };
        let mut it = rest.split(' ');
        if let (Some(name), Some(r)) = (it.next(), it.next()) {
            if let Some(rank) = r.strip_prefix('r').and_then(|r| r.parse().ok()) {
                *m.entry((name.to_string(), rank)).or_insert(0) += 1;
            }
        }
    }
    m
}

fn make_sources(root: &Path) {
    let mut r = Rng::new(42);
    numbered_files(root, 5, 2, 20_000, 7_001, &mut r);
    write_file(&root.join("big"), 100_000, &mut r);
    write_file(&root.join("empty"), 0, &mut r);
    fs::create_dir_all(root.join("d1/nested/empty dir")).unwrap();
    std::os::unix::fs::symlink("d0/f0", root.join("ln")).unwrap();
}

/// Mirror a tree with hard links (same inodes, same times).
fn walk_names(d: &Path, out: &mut Vec<String>) {
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            if e.path().is_dir() {
                walk_names(&e.path(), out);
            }
        }
    }
}

struct Cell {
    point: String,
    action: &'static str,
    launch: Launch,
    victim: usize,
    hit: u64,
    /// The rank count of the second resume (the first uses the crashed run's).
    other_ranks: usize,
}

#[derive(Default)]
struct Tally {
    cells: usize,
    survived: usize,
    safe_fail: usize,
    violations: usize,
    fired: usize,
    powerloss: usize,
    recopied: u64,
    total: u64,
}

/// What one cell found.
struct Found {
    /// Paths a simulated power loss dropped, restored or reverted.
    lost: usize,
    outcome: &'static str,
    detail: String,
    fired: bool,
    recopied: u64,
    total: u64,
}

/// What one crashed run left.
struct Crash {
    lost: usize,
    fired: bool,
    crashed: bool,
    clear_error: bool,
    code: i32,
}

/// Run the copy of `cell` as transfer `id` into `dst` until its failpoint trips, apply the
/// power-loss model if it is one, and check invariants 1-3 on the disk as the crash left it.
fn crash(
    s: &Scratch,
    reference: &Path,
    cell: &Cell,
    (id, dst): (&str, &Path),
    problems: &mut Vec<String>,
) -> Crash {
    let src = s.path("src");
    let _ = fs::remove_dir_all(&src);
    cp_a(reference, &src);
    let state = dst.join(".ferry");
    let fp = format!(
        "{}={}@{}#{}",
        cell.point, cell.action, cell.victim, cell.hit
    );
    let dst_s = dst.to_str().unwrap().to_string();
    let mut args = vec!["copy", "--id", id];
    args.extend(COPY_FLAGS);
    args.push(&dst_s);
    // A power-loss cell: the crashed process leaves a model of what was durable, and the disk is
    // rewritten to it before anything is checked.
    let powerloss = cell.action == "powerloss";
    let root = s.dir.path();
    let env: &[(&str, &Path)] = if powerloss {
        &[("FERRY_POWERLOSS_ROOT", root)]
    } else {
        &[]
    };
    let o = ferry_env(s, cell.launch, &args, Some(&fp), env);
    let code = o.status.code().unwrap_or(-1);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let mut lost = 0;
    if powerloss && code == ferry::failpoints::EXIT_CODE {
        match ferry::powerloss::apply(root) {
            Ok(changes) => lost = changes.len(),
            Err(e) => problems.push(format!("power-loss model could not be applied: {e}")),
        }
    }
    ferry::powerloss::clear(root);
    let fired = err.contains(&format!("failpoint {}: ", cell.point));
    let crashed = code == ferry::failpoints::EXIT_CODE || err.contains("panic");
    let clear_error = (2..=8).contains(&code) || code == 1 && err.contains("panic");

    // Invariants on the disk exactly as the crash left it.
    let committed = state.join(id).join("commit").exists();
    if committed {
        problems.extend(
            diff_trees(reference, dst)
                .into_iter()
                .map(|d| format!("after crash, committed but {d}")),
        );
    } else {
        problems.extend(
            diff_trees(reference, &src)
                .into_iter()
                .map(|d| format!("source lost before the commit: {d}")),
        );
    }
    problems.extend(torn_finals(reference, dst));
    if code == 0 && !committed {
        problems.push("the run exited 0 without a commit record".into());
    }
    Crash {
        lost,
        fired,
        crashed,
        clear_error,
        code,
    }
}

/// Run one cell.
fn run_cell(s: &Scratch, reference: &Path, cell: &Cell, n: usize) -> Found {
    let src = s.path("src");
    let dst = s.path(&format!("dst{n}"));
    let state = dst.join(".ferry");
    let mut problems = Vec::new();
    let first_id = format!("c{n}");
    let first = crash(s, reference, cell, (&first_id, &dst), &mut problems);

    // Resume, then invariants 1-4: once on the same rank count and once on another, each from
    // the disk exactly as the crash left it. The second starts from a second crash at the same
    // point: a copy of the crashed tree would hold other files (other inodes), which ferry
    // rightly does not trust as its own.
    let mut recopied = 0;
    let mut total = 0;
    if state.join(&first_id).join("plan").exists() {
        for (k, ranks) in [cell.launch.ranks(), cell.other_ranks]
            .into_iter()
            .enumerate()
        {
            let mut id = first_id.clone();
            if k > 0 {
                let _ = fs::remove_dir_all(&dst);
                id = format!("c{n}-{k}");
                crash(s, reference, cell, (&id, &dst), &mut problems);
                if !state.join(&id).join("plan").exists() {
                    continue;
                }
            }
            let launch = match cell.launch {
                Launch::Threads(_) => Launch::Threads(ranks),
                Launch::Mpi(_) => Launch::Mpi(ranks),
            };
            let st = state.to_str().unwrap().to_string();
            let o = ferry(
                s,
                launch,
                &["resume", &id, "--state-dir", &st, "--json"],
                None,
            );
            if !o.status.success() {
                problems.push(format!(
                    "resume on {ranks} failed ({:?}): {}",
                    o.status.code(),
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or_default()
                ));
            } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                recopied += v["bytes_copied"].as_u64().unwrap_or(0);
                total += v["bytes_total"].as_u64().unwrap_or(0);
            }
            problems.extend(
                diff_trees(reference, &dst)
                    .into_iter()
                    .map(|d| format!("after resume on {ranks}: {d}")),
            );
            if src.exists() {
                let mut left = Vec::new();
                walk_names(&src, &mut left);
                problems.push(format!(
                    "after resume on {ranks}: sources not removed: {left:?}"
                ));
            }
            if !temps_in(&dst).is_empty() {
                problems.push(format!("after resume on {ranks}: temporaries left"));
            }
        }
    } else if !(first.clear_error || first.crashed) {
        problems.push(format!("no plan and no clear error (exit {})", first.code));
    }
    let outcome = if !problems.is_empty() {
        "violation"
    } else if first.crashed || first.code == 0 {
        "survived"
    } else {
        "safe-fail"
    };
    let _ = fs::remove_dir_all(&dst);
    Found {
        lost: first.lost,
        outcome,
        detail: problems.join("; "),
        fired: first.fired,
        recopied,
        total,
    }
}

#[test]
fn crash_matrix() {
    let tier = match std::env::var("FERRY_CRASH_TIER").as_deref() {
        Ok("full") => Tier::Full,
        _ => Tier::Pr,
    };
    let out_path = std::env::var_os("FERRY_CRASH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/crash-matrix.jsonl"));
    let mut out = fs::File::create(&out_path).unwrap();
    let t0 = Instant::now();
    let s = Scratch::new();
    let reference = s.path("reference");
    make_sources(&reference);

    let actions: &[&'static str] = match tier {
        Tier::Pr => &["exit", "powerloss", "error(EIO)", "panic"],
        Tier::Full => &[
            "exit",
            "powerloss",
            "error(EIO)",
            "error(ENOSPC)",
            "error(EACCES)",
            "panic",
        ],
    };
    let mpi = Command::new("mpirun").arg("--version").output().is_ok();
    let mut launches = vec![Launch::Threads(1), Launch::Threads(4)];
    if mpi {
        launches.push(Launch::Mpi(4));
    }
    let mut tally = Tally::default();
    let mut covered = std::collections::BTreeSet::new();
    let mut n = 0;
    for launch in launches {
        // An undisturbed run tells how often each point is passed on each rank.
        cp_a(&reference, &s.path("src"));
        let probe = s.path("probe");
        let mut args = vec!["copy"];
        args.extend(COPY_FLAGS);
        args.push(probe.to_str().unwrap());
        let o = ferry(&s, launch, &args, None);
        assert!(
            o.status.success(),
            "probe run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let _ = fs::remove_dir_all(&probe);
        let counts = hit_counts(&o);
        covered.extend(counts.keys().map(|(p, _)| p.clone()));
        let ranks = launch.ranks();
        for point in DECLARED.iter().filter(|p| !NOT_IN_A_COPY.contains(p)) {
            let mut victims: Vec<usize> = match tier {
                Tier::Pr => vec![0, ranks - 1],
                Tier::Full => (0..ranks).collect(),
            };
            victims.dedup();
            for victim in victims {
                let Some(&hits) = counts.get(&(point.to_string(), victim)) else {
                    continue;
                };
                let mut which = vec![1, hits];
                if tier == Tier::Full {
                    which.push(hits.div_ceil(2));
                }
                if let Some(h) = std::env::var("FERRY_CRASH_ONLY")
                    .ok()
                    .and_then(|o| o.split('#').nth(1)?.split('/').next()?.parse().ok())
                {
                    which = vec![h];
                }
                which.sort();
                which.dedup();
                for (k, &hit) in which.iter().enumerate() {
                    for action in actions {
                        // Under MPI a representative subset: the exit action, first hit.
                        if matches!(launch, Launch::Mpi(_)) && (*action != "exit" || k > 0) {
                            continue;
                        }
                        // FERRY_CRASH_ONLY=point=action@victim#hit/launch runs one cell (debugging).
                        if let Ok(only) = std::env::var("FERRY_CRASH_ONLY") {
                            let this = format!("{point}={action}@{victim}#{hit}/{}", launch.name());
                            if only != this {
                                continue;
                            }
                        }
                        n += 1;
                        let other = if ranks == 1 { 2 } else { 1 };
                        let cell = Cell {
                            point: point.to_string(),
                            action,
                            launch,
                            victim,
                            hit,
                            other_ranks: other,
                        };
                        let Found {
                            lost,
                            outcome,
                            detail,
                            fired,
                            recopied,
                            total,
                        } = run_cell(&s, &reference, &cell, n);
                        tally.cells += 1;
                        tally.fired += fired as usize;
                        tally.powerloss += (*action == "powerloss") as usize;
                        match outcome {
                            "survived" => tally.survived += 1,
                            "safe-fail" => tally.safe_fail += 1,
                            _ => tally.violations += 1,
                        }
                        tally.recopied += recopied;
                        tally.total += total;
                        let line = serde_json::json!({
                            "point": cell.point, "action": cell.action, "launch": launch.name(),
                            "victim": cell.victim, "hit": cell.hit, "of": hits,
                            "resume_ranks": [ranks, cell.other_ranks], "outcome": outcome, "fired": fired, "power_loss_changes": lost,
                            "recopied": recopied, "total": total, "detail": detail,
                        });
                        writeln!(out, "{line}").unwrap();
                        if outcome == "violation" {
                            eprintln!("VIOLATION {line}");
                        }
                    }
                }
            }
        }
    }
    let declared = DECLARED.len();
    let hit_points = DECLARED.iter().filter(|p| covered.contains(**p)).count();
    println!(
        "tier {}: failpoints passed by a copy-and-resume {hit_points}/{declared} (cancel::temps_removed \
         and forget::start have their own tests); failpoint fired in {} of {} cells (the rest: a \
         later hit than that run reached); {} power-loss cells; resumes re-copied {:.1}% of the bytes they planned; \
         {:.0} s; cells in {}",
        if tier == Tier::Full { "full" } else { "pr" },
        tally.fired,
        tally.cells,
        tally.powerloss,
        100.0 * tally.recopied as f64 / tally.total.max(1) as f64,
        t0.elapsed().as_secs_f64(),
        out_path.display()
    );
    println!(
        "cells: {}, survived: {}, safe-fail: {}, violations: {}",
        tally.cells, tally.survived, tally.safe_fail, tally.violations
    );
    assert_eq!(tally.violations, 0, "see {}", out_path.display());
}
