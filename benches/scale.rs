//! Plan building and distribution at scale: 1,000,000 and 10,000,000 synthetic files (set
//! FERRY_SCALE_FILES to choose), 4 ranks. Each measurement runs in its own process so its peak
//! memory (ru_maxrss) is its own:
//!
//! * rank 0: build the entries, cut units, assign them to ranks, encode the plan (what is written
//!   to the state directory), and build every other rank's slice (what is scattered to it);
//! * rank 1: decode its slice (what it holds for the run).
//!
//! The bytes that would cross MPI are reported; their transfer time (one scatter at memory or
//! network speed) is not part of the figure.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

#[path = "synthetic.rs"]
mod synthetic;

const RANKS: usize = 4;

fn max_rss_mib() -> f64 {
    // SAFETY: getrusage(2) fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn root(n: usize, dir: &str) {
    let t0 = Instant::now();
    let entries = synthetic::entries(n);
    let plan = synthetic::plan(entries, RANKS);
    let t_plan = t0.elapsed().as_secs_f64();
    let all: Vec<u32> = (0..plan.n_units() as u32).collect();
    let shares = plan.assign(&all, RANKS).unwrap();
    let t_assign = t0.elapsed().as_secs_f64() - t_plan;
    // As a run does: the plan is written to the state directory, streamed (never held encoded).
    let plan_file = format!("{dir}/plan");
    let _ = std::fs::remove_file(&plan_file);
    ferry::state::write_record_streamed(std::path::Path::new(&plan_file), "plan", &plan).unwrap();
    let plan_bytes = std::fs::metadata(&plan_file).unwrap().len();
    let t_encode = t0.elapsed().as_secs_f64() - t_plan - t_assign;
    // Then every other rank's slice (the entries it owns and the units of its share) is built,
    // encoded and sent, one rank at a time.
    let t1 = Instant::now();
    let mut sent = 0;
    for (r, share) in shares.iter().enumerate().skip(1) {
        let ents: BTreeSet<u32> = (0..plan.n_entries())
            .filter(|&e| plan.owner(e, RANKS) == r)
            .map(|e| e as u32)
            .collect();
        let units: BTreeSet<u32> = share.iter().copied().collect();
        let part = serde_json::to_vec(&plan.slice_view(&ents, &units)).unwrap();
        sent += part.len();
        if r == 1 {
            std::fs::write(format!("{dir}/slice1"), &part).unwrap();
        }
    }
    let t_slices = t1.elapsed().as_secs_f64();
    println!(
        "{n} {} {t_plan:.2} {t_assign:.2} {t_encode:.2} {t_slices:.2} {plan_bytes} {sent} {:.0}",
        plan.n_units(),
        max_rss_mib()
    );
}

fn rank1(dir: &str) {
    let t0 = Instant::now();
    let b = std::fs::read(format!("{dir}/slice1")).unwrap();
    let slice: ferry::plan::Plan = serde_json::from_slice(&b).unwrap();
    drop(b);
    println!(
        "{} {:.2} {:.0}",
        slice.held_entries().len(),
        t0.elapsed().as_secs_f64(),
        max_rss_mib()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--root") => return root(args[2].parse().unwrap(), &args[3]),
        Some("--rank1") => return rank1(&args[2]),
        _ => {}
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("FERRY_SCALE_FILES")
        .unwrap_or_else(|_| "1000000,10000000".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let me = std::env::current_exe().unwrap();
    println!(
        "| files | units | rank 0: build s | assign s | encode s | slices s | plan bytes | bytes \
         to other ranks | rank 0 peak MiB | rank 1 held entries | rank 1 decode s | rank 1 \
         peak MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for n in sizes {
        let o = Command::new(&me)
            .args(["--root", &n.to_string(), d])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r0 = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let o = Command::new(&me).args(["--rank1", d]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r1 = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let cells: Vec<&str> = r0.split(' ').chain(r1.split(' ')).collect();
        println!("| {} |", cells.join(" | "));
    }
}
