//! End-to-end benchmark (`make bench`): ferry against `cp -r && sync`, `rsync -a && sync` and the
//! machine's raw durable-copy limit, on the same data, interleaved in one run.
//!
//! Datasets (built once in the scratch directory): large (4 × 1 GiB of random bytes), small
//! (20,000 × 64 KiB in 100 directories), checkpoint (8 rank directories, each 1 × 256 MiB +
//! 200 × 16 KiB), and with the `hdf5` feature hdf5 (8 ranks' `ferry gen` checkpoints of 256 MiB
//! each: HDF5 files with large and small datasets, plain files beside). Tools: ferry with 1, 2 and 4 ranks (in one process, `--ranks N`), ferry under
//! `mpirun -n 4`, cp, rsync, and the limit (copy_file_range of every file by 4 threads, then one
//! syncfs: the fastest plain durable copy found on this machine). Every round runs every tool on
//! every dataset, warm (sources in the page cache) and cold (caches dropped before each run);
//! the table gives medians and min–max in GB/s and the ratios of ferry's best variant. Then: the
//! cost of a resume after a kill at about half-way, the start-up time, and the durability cost
//! (the same in-process copy with and without fsyncs).
//!
//! Knobs (environment): FERRY_BENCH_DIR (scratch, default target/bench), FERRY_BENCH_ROUNDS (3),
//! FERRY_BENCH_SCALE (1.0: dataset sizes are multiplied by it), FERRY_BENCH_CACHES (warm,cold),
//! FERRY_BENCH_SETS (large,small,checkpoint,hdf5), FERRY_BENCH_OUT (the table, default
//! target/bench/results.md).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// Fill `path` with `size` pseudo-random bytes (xorshift; incompressible enough for a disk).
fn write_random(path: &Path, size: u64, seed: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::io::BufWriter::with_capacity(4 << 20, fs::File::create(path).unwrap());
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; (1 << 20).min(size.max(1) as usize)];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

struct Dataset {
    name: &'static str,
    dir: PathBuf,
    bytes: u64,
}

fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale) as u64).max(1)
}

fn datasets(root: &Path, scale: f64) -> Vec<Dataset> {
    let mut out = Vec::new();
    let mk = |name: &'static str, build: &dyn Fn(&Path)| {
        let dir = root.join(name);
        let done = root.join(format!("{name}.done-{scale}"));
        if !done.exists() {
            let _ = fs::remove_dir_all(&dir);
            eprintln!("bench: building dataset {name} (scale {scale})");
            build(&dir);
            fs::write(&done, b"").unwrap();
        }
        Dataset {
            name,
            bytes: tree_bytes(&dir),
            dir,
        }
    };
    out.push(mk("large", &|d| {
        for i in 0..4 {
            write_random(&d.join(format!("part{i}")), scaled(GIB, scale), i);
        }
    }));
    out.push(mk("small", &|d| {
        let files = scaled(20_000, scale);
        for i in 0..files {
            write_random(
                &d.join(format!("d{:03}/f{i:05}", i % 100)),
                64 * KIB,
                100 + i,
            );
        }
    }));
    out.push(mk("checkpoint", &|d| {
        for r in 0..8 {
            let rd = d.join(format!("rank{r}"));
            write_random(&rd.join("state.bin"), scaled(256 * MIB, scale), 1000 + r);
            for i in 0..scaled(200, scale) {
                write_random(
                    &rd.join(format!("meta/m{i:03}")),
                    16 * KIB,
                    2000 + r * 1000 + i,
                );
            }
        }
    }));
    // With the `hdf5` feature (make bench turns it on): 8 ranks' HDF5 checkpoints as `ferry gen`
    // writes them (three large arrays, 48 small datasets, attributes, plain files beside).
    #[cfg(feature = "hdf5")]
    out.push(mk("hdf5", &|d| {
        for rank in 0..8 {
            let spec = ferry::h5::GenSpec {
                bytes: scaled(256 * MIB, scale),
                seed: 77,
                rank,
            };
            ferry::h5::generate(d, &spec).unwrap();
        }
    }));
    out
}

fn tree_bytes(d: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        n += if md.is_dir() {
            tree_bytes(&e.path())
        } else {
            md.len()
        };
    }
    n
}

fn files_of(d: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            files_of(&e.path(), out);
        } else {
            out.push(e.path());
        }
    }
}

fn sh(cmd: &mut Command) {
    let st = cmd.stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "{cmd:?}: {st}");
}

fn sync_all() {
    sh(&mut Command::new("sync"));
}

fn drop_caches() {
    sync_all();
    fs::write("/proc/sys/vm/drop_caches", b"3\n").expect("dropping caches needs root");
}

fn read_tree(d: &Path) {
    let mut files = Vec::new();
    files_of(d, &mut files);
    for f in files {
        let _ = fs::read(f);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Tool {
    Ferry1,
    Ferry2,
    Ferry4,
    FerryMpi4,
    Cp,
    Rsync,
    Limit,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Ferry1 => "ferry 1 rank",
            Tool::Ferry2 => "ferry 2 ranks",
            Tool::Ferry4 => "ferry 4 ranks",
            Tool::FerryMpi4 => "ferry mpirun -n 4",
            Tool::Cp => "cp -r && sync",
            Tool::Rsync => "rsync -a && sync",
            Tool::Limit => "limit (copy_file_range ×4 + syncfs)",
        }
    }
    fn is_ferry(self) -> bool {
        matches!(
            self,
            Tool::Ferry1 | Tool::Ferry2 | Tool::Ferry4 | Tool::FerryMpi4
        )
    }
}

fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--bind-to", "none"]);
    c
}

/// The limit: every file copied with copy_file_range (std::fs::copy) by 4 threads, directories
/// made first, then one syncfs of the destination's file system.
fn limit_copy(src: &Path, dst: &Path) {
    let mut files = Vec::new();
    files_of(src, &mut files);
    for f in &files {
        fs::create_dir_all(dst.join(f.parent().unwrap().strip_prefix(src).unwrap())).unwrap();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(f) = files.get(i) else { break };
                fs::copy(f, dst.join(f.strip_prefix(src).unwrap())).unwrap();
            });
        }
    });
    let d = fs::File::open(dst).unwrap();
    rustix::fs::syncfs(&d).unwrap();
}

fn run_tool(tool: Tool, ferry: &Path, src: &Path, dst: &Path, home: &Path) -> Duration {
    let t0 = Instant::now();
    let ferry_cmd = |ranks: &str| {
        let mut c = Command::new(ferry);
        c.env("FERRY_HOME", home)
            .args(["copy", "-q", "--ranks", ranks])
            .arg(src)
            .arg(dst);
        c
    };
    match tool {
        Tool::Ferry1 => sh(&mut ferry_cmd("1")),
        Tool::Ferry2 => sh(&mut ferry_cmd("2")),
        Tool::Ferry4 => sh(&mut ferry_cmd("4")),
        Tool::FerryMpi4 => sh(mpirun()
            .args(["-n", "4"])
            .arg(ferry)
            .env("FERRY_HOME", home)
            .args(["copy", "-q"])
            .arg(src)
            .arg(dst)),
        Tool::Cp => {
            sh(Command::new("cp").arg("-r").arg(src).arg(dst));
            sync_all();
        }
        Tool::Rsync => {
            let mut s = src.as_os_str().to_os_string();
            s.push("/");
            sh(Command::new("rsync").arg("-a").arg(s).arg(dst));
            sync_all();
        }
        Tool::Limit => limit_copy(src, dst),
    }
    t0.elapsed()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = PathBuf::from(env_or("FERRY_BENCH_DIR", "target/bench".to_string()));
    let rounds: usize = env_or("FERRY_BENCH_ROUNDS", 3);
    let scale: f64 = env_or("FERRY_BENCH_SCALE", 1.0);
    let caches: String = env_or("FERRY_BENCH_CACHES", "warm,cold".to_string());
    let out_path = PathBuf::from(env_or(
        "FERRY_BENCH_OUT",
        root.join("results.md").display().to_string(),
    ));
    fs::create_dir_all(&root).unwrap();
    let root = fs::canonicalize(&root).unwrap();
    let ferry = ferry_bin();
    let home = root.join("home");
    let dst = root.join("out");
    let only: String = env_or(
        "FERRY_BENCH_SETS",
        "large,small,checkpoint,hdf5".to_string(),
    );
    let mut sets = datasets(&root.join("data"), scale);
    sets.retain(|s| only.split(',').any(|o| o == s.name));
    let mpi = Command::new("mpirun").arg("--version").output().is_ok();
    let mut tools = vec![Tool::Ferry1, Tool::Ferry2, Tool::Ferry4];
    if mpi {
        tools.push(Tool::FerryMpi4);
    }
    tools.extend([Tool::Cp, Tool::Rsync, Tool::Limit]);
    let caches: Vec<&str> = caches.split(',').collect();

    // (cache, dataset, tool) → seconds of each round.
    let mut times: BTreeMap<(usize, usize, Tool), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for (ci, cache) in caches.iter().enumerate() {
            for (di, set) in sets.iter().enumerate() {
                for &tool in &tools {
                    let _ = fs::remove_dir_all(&dst);
                    let _ = fs::remove_dir_all(&home);
                    if *cache == "cold" {
                        drop_caches();
                    } else {
                        sync_all();
                        read_tree(&set.dir);
                    }
                    let t = run_tool(tool, &ferry, &set.dir, &dst, &home).as_secs_f64();
                    eprintln!(
                        "bench: round {} {cache} {} {}: {t:.2} s ({:.2} GB/s)",
                        round + 1,
                        set.name,
                        tool.name(),
                        set.bytes as f64 / t / 1e9
                    );
                    times.entry((ci, di, tool)).or_default().push(t);
                }
            }
        }
    }
    let _ = fs::remove_dir_all(&dst);

    let mut report = String::new();
    let cmdline = format!(
        "make bench  # FERRY_BENCH_ROUNDS={rounds} FERRY_BENCH_SCALE={scale} FERRY_BENCH_CACHES={}",
        caches.join(",")
    );
    report.push_str(&format!(
        "# ferry benchmark\n\n`{cmdline}`, {} on {} CPU(s), {rounds} interleaved round(s).\n\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    ));
    for (ci, cache) in caches.iter().enumerate() {
        for (di, set) in sets.iter().enumerate() {
            report.push_str(&format!(
                "## {} ({:.2} GB), {cache} cache\n\n| tool | GB/s median | min–max |\n|---|---|---|\n",
                set.name,
                set.bytes as f64 / 1e9
            ));
            let mut rate: BTreeMap<Tool, f64> = BTreeMap::new();
            for &tool in &tools {
                let mut r: Vec<f64> = times[&(ci, di, tool)]
                    .iter()
                    .map(|t| set.bytes as f64 / t / 1e9)
                    .collect();
                let (lo, hi) = (
                    r.iter().cloned().fold(f64::MAX, f64::min),
                    r.iter().cloned().fold(0.0, f64::max),
                );
                let m = median(&mut r);
                rate.insert(tool, m);
                report.push_str(&format!("| {} | {m:.3} | {lo:.3}–{hi:.3} |\n", tool.name()));
            }
            let (best, b) = tools
                .iter()
                .filter(|t| t.is_ferry())
                .map(|t| (*t, rate[t]))
                .fold((Tool::Ferry1, 0.0), |a, x| if x.1 > a.1 { x } else { a });
            report.push_str(&format!(
                "\nbest ferry: {} — ferry/cp {:.2}×, ferry/rsync {:.2}×, ferry/limit {:.2}×\n\n",
                best.name(),
                b / rate[&Tool::Cp],
                b / rate[&Tool::Rsync],
                b / rate[&Tool::Limit]
            ));
        }
    }

    report.push_str(&resume_cost(&ferry, &sets, &root, &home));
    report.push_str(&startup(&ferry, &root, &home, mpi));
    report.push_str(&durability_cost(&sets, &root));
    fs::create_dir_all(out_path.parent().unwrap()).unwrap();
    fs::write(&out_path, &report).unwrap();
    println!("{report}");
    eprintln!("bench: table written to {}", out_path.display());
}

/// Full run vs. a resume after a kill at about half of the bytes (ferry, 4 ranks, warm).
fn resume_cost(ferry: &Path, sets: &[Dataset], root: &Path, home: &Path) -> String {
    let mut out = String::from(
        "## Resume after a kill at about half-way (ferry --ranks 4, warm cache)\n\n\
         | dataset | full run s | killed at | resume s | resume / full |\n|---|---|---|---|---|\n",
    );
    let dst = root.join("out");
    for set in sets
        .iter()
        .filter(|s| s.name != "checkpoint" && s.name != "hdf5")
    {
        let _ = fs::remove_dir_all(&dst);
        read_tree(&set.dir);
        sync_all();
        let full = run_tool(Tool::Ferry4, ferry, &set.dir, &dst, home).as_secs_f64();
        let _ = fs::remove_dir_all(&dst);
        sync_all();
        let mut child = Command::new(ferry)
            .env("FERRY_HOME", home)
            .args(["copy", "-q", "--ranks", "4", "--id", "half"])
            .arg(&set.dir)
            .arg(&dst)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let td = ferry::state::TransferDir::new(&dst.join(".ferry"), "half");
        let mut at = 0.0;
        while child.try_wait().unwrap().is_none() {
            let st = ferry::status::status(&td);
            if st.bytes_total > 0 && st.bytes_done * 2 >= st.bytes_total {
                at = st.bytes_done as f64 / st.bytes_total as f64;
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.wait();
        let t0 = Instant::now();
        sh(Command::new(ferry)
            .env("FERRY_HOME", home)
            .args(["resume", "-q", "half", "--ranks", "4"]));
        let resume = t0.elapsed().as_secs_f64();
        let _ = fs::remove_dir_all(&dst);
        let _ = fs::remove_dir_all(home);
        out.push_str(&format!(
            "| {} | {full:.2} | {:.0} % | {resume:.2} | {:.2} |\n",
            set.name,
            at * 100.0,
            resume / full
        ));
    }
    out.push('\n');
    out
}

fn time_median(n: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut v)
}

/// A 1-byte copy in one process, and under `mpirun -n 4` next to an MPI hello world.
fn startup(ferry: &Path, root: &Path, home: &Path, mpi: bool) -> String {
    let src = root.join("one-byte");
    fs::write(&src, b"x").unwrap();
    let dst = root.join("one-byte.out");
    let clean = || {
        let _ = fs::remove_file(&dst);
        let _ = fs::remove_dir_all(root.join(".ferry"));
        let _ = fs::remove_dir_all(home);
    };
    let single = time_median(21, || {
        clean();
        sh(Command::new(ferry)
            .env("FERRY_HOME", home)
            .args(["copy", "-q"])
            .arg(&src)
            .arg(&dst));
    });
    let mut out = format!(
        "## Start-up (median of 21)\n\n| what | ms |\n|---|---|\n| ferry copy of 1 byte, one process | {:.1} |\n",
        single * 1e3
    );
    if mpi {
        let hello = root.join("mpi-hello");
        let c = root.join("mpi-hello.c");
        fs::write(
            &c,
            "#include <mpi.h>\nint main(int c, char **v) { MPI_Init(&c, &v); MPI_Barrier(MPI_COMM_WORLD); MPI_Finalize(); return 0; }\n",
        )
        .unwrap();
        sh(Command::new("mpicc").arg(&c).arg("-o").arg(&hello));
        let h = time_median(11, || sh(mpirun().args(["-n", "4"]).arg(&hello)));
        let f = time_median(11, || {
            clean();
            sh(mpirun()
                .args(["-n", "4"])
                .arg(ferry)
                .env("FERRY_HOME", home)
                .args(["copy", "-q"])
                .arg(&src)
                .arg(&dst));
        });
        out.push_str(&format!(
            "| MPI hello world, mpirun -n 4 | {:.1} |\n| ferry copy of 1 byte, mpirun -n 4 | {:.1} (+{:.1}) |\n",
            h * 1e3,
            f * 1e3,
            (f - h) * 1e3
        ));
    }
    clean();
    out.push('\n');
    out
}

/// The same in-process copy (4 ranks, warm) with ferry's fsyncs and with them switched off.
fn durability_cost(sets: &[Dataset], root: &Path) -> String {
    let mut out = String::from(
        "## Durability cost (in-process, 4 ranks, warm; fsyncs off = journal written but never \
         fsynced, no syncfs; then one `sync` so both end durable)\n\n\
         | dataset | durable s | fsyncs off + sync s | cost |\n|---|---|---|---|\n",
    );
    let dst = root.join("out");
    let run = |set: &Dataset, durable: bool| -> f64 {
        let _ = fs::remove_dir_all(&dst);
        read_tree(&set.dir);
        sync_all();
        ferry::fsio::set_sync_enabled(durable);
        let t0 = Instant::now();
        let mut opts = ferry::CopyOptions::new(
            vec![set.dir.clone().into_os_string()],
            dst.clone().into_os_string(),
        );
        opts.register = false;
        let res = ferry::comm::run_threads(4, |c| {
            ferry::transfer::copy(c, &opts, &ferry::RunOptions::default())
        });
        for r in res {
            r.unwrap();
        }
        if !durable {
            sync_all();
        }
        let t = t0.elapsed().as_secs_f64();
        ferry::fsio::set_sync_enabled(true);
        t
    };
    for set in sets {
        let mut d = Vec::new();
        let mut n = Vec::new();
        for _ in 0..3 {
            d.push(run(set, true));
            n.push(run(set, false));
        }
        let (d, n) = (median(&mut d), median(&mut n));
        out.push_str(&format!(
            "| {} | {d:.2} | {n:.2} | {:+.1} % |\n",
            set.name,
            (d / n - 1.0) * 100.0
        ));
    }
    let _ = fs::remove_dir_all(&dst);
    out.push('\n');
    out
}
