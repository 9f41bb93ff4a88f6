//! The `ferry` command: parses arguments, runs the library on each rank, prints what rank 0 has
//! to say and maps the error to the exit code of the brief's table. No engine logic lives here.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferry::comm::{self, Comm, SingleComm};
use ferry::engine::Progress;
use ferry::retry::RetryPolicy;
use ferry::size::{human, parse_size};
use ferry::state::{self, TransferDir};
use ferry::status::{self, Status};
use ferry::transfer::{self, CopyOptions, RunOptions, Summary};
use ferry::{Error, Layout};

/// `ferry --version`: the version and the optional parts built in (what a job script or a
/// package's smoke test checks).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    mpi_part!(),
    " ",
    hdf5_part!(),
    ")"
);

#[cfg(feature = "mpi")]
macro_rules! mpi_part {
    () => {
        "+mpi"
    };
}
#[cfg(not(feature = "mpi"))]
macro_rules! mpi_part {
    () => {
        "~mpi"
    };
}
#[cfg(feature = "hdf5")]
macro_rules! hdf5_part {
    () => {
        "+hdf5"
    };
}
#[cfg(not(feature = "hdf5"))]
macro_rules! hdf5_part {
    () => {
        "~hdf5"
    };
}
use {hdf5_part, mpi_part};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version = VERSION,
    about = "Parallel, resumable, crash-consistent staging between storage tiers",
    long_about = "ferry copies datasets between storage tiers with every rank of a job at once. \
                  Killed at any instant, `ferry resume ID` finishes the job; the destination is \
                  committed exactly once, byte-identical to the source."
)]
struct Cli {
    /// More log output (-v: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Output {
    /// Show a progress bar (default: when stderr is a terminal).
    #[arg(long, conflicts_with = "quiet")]
    progress: bool,
    /// Print nothing but errors (and the transfer id / JSON on stdout).
    #[arg(long, short)]
    quiet: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
    /// Run N ranks as threads of this process (testing without a launcher).
    #[arg(long, value_name = "N", default_value_t = 1)]
    ranks: usize,
    /// Attempts in all for an operation that fails with a transient error (EINTR, EAGAIN,
    /// ETIMEDOUT, EIO on a read); 1 never retries.
    #[arg(long, value_name = "N", default_value_t = RetryPolicy::default().attempts,
          value_parser = clap::value_parser!(u32).range(1..))]
    retries: u32,
    /// The most time to spend retrying one operation, waits included (e.g. 60s, 5m).
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    retry_time: Duration,
}

/// A duration: plain seconds (`30`) or with units (`30s`, `5m`, `1h 30m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration ({e}); e.g. 30s, 5m"))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Plan, copy and commit; prints the transfer id.
    Copy {
        /// Sources, then the destination. `{rank}` stands for the rank number.
        #[arg(required = true, num_args = 2.., value_name = "SRC... DST")]
        paths: Vec<OsString>,
        /// Name the transfer (default: a fresh unique id).
        #[arg(long)]
        id: Option<String>,
        /// Where plan, journals and commit record live (default: DST/.ferry).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// shared: every rank sees every source; local: each rank copies its own files.
        #[arg(long, value_parser = clap::value_parser!(Layout))]
        layout: Option<Layout>,
        /// Files larger than this are split into chunks copied in parallel (e.g. 64MiB).
        #[arg(long, value_parser = parse_size, default_value = "64MiB")]
        chunk_size: u64,
        /// Copy threads per rank (default: the cores available, at most 4).
        #[arg(long)]
        threads: Option<usize>,
        /// Remove the sources once the commit is durable.
        #[arg(long)]
        delete_source: bool,
        /// Re-read every destination unit and compare CRC32s before committing.
        #[arg(long)]
        verify: bool,
        /// Also keep owners and groups (where permitted) and extended attributes, POSIX ACLs
        /// included (modes and modification times are always kept). What cannot be kept is a
        /// warning naming the file and the error class; the copy goes on.
        #[arg(long)]
        preserve: bool,
        /// Before the commit, open every staged .h5/.hdf5 file with libhdf5 and read it back:
        /// `data` (the default) reads every dataset, `metadata` only groups, types, shapes and
        /// attributes. A file that fails is an integrity error naming the object; nothing is
        /// committed.
        #[arg(long, value_enum, num_args = 0..=1, require_equals = true,
              default_missing_value = "data", value_name = "WHAT")]
        verify_hdf5: Option<ferry::h5::Depth>,
        /// Leave out sockets, FIFOs and device files (with a warning) instead of refusing them.
        #[arg(long)]
        skip_special: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Continue an interrupted transfer (with any number of ranks in the shared layout).
    Resume {
        /// The transfer id.
        id: String,
        /// Where the transfer's state lives.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Copy threads per rank (default: as planned).
        #[arg(long)]
        threads: Option<usize>,
        /// Re-read every destination unit before committing.
        #[arg(long)]
        verify: bool,
        /// Before the commit (also recorded by the copy), open every staged .h5/.hdf5 file with libhdf5 and read it back:
        /// `data` (the default) reads every dataset, `metadata` only groups, types, shapes and
        /// attributes. A file that fails is an integrity error naming the object; nothing is
        /// committed.
        #[arg(long, value_enum, num_args = 0..=1, require_equals = true,
              default_missing_value = "data", value_name = "WHAT")]
        verify_hdf5: Option<ferry::h5::Depth>,
        #[command(flatten)]
        out: Output,
    },
    /// Tell the state of a transfer (or of every transfer in the state directory).
    Status {
        /// The transfer id.
        id: Option<String>,
        /// Where the transfer's state lives.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running transfer (or an interrupted one), remove its temporary files.
    Cancel {
        /// The transfer id.
        id: String,
        /// Where the transfer's state lives.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// How long to wait for a running transfer to stop, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Re-check a committed destination against its manifest.
    Verify {
        /// The transfer id.
        id: String,
        /// Where the transfer's state lives.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the transfers known in a state directory (default: those this user started).
    List {
        /// The state directory.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a checkpoint-like sample dataset (needs the `hdf5` feature): per rank
    /// DIR/rank{r}/ckpt.h5 (three large arrays with checksums, 48 small datasets, attributes),
    /// restart.bin and run.log. Under mpirun each rank writes its own.
    Gen {
        /// Where to write.
        dir: PathBuf,
        /// Data per rank, about (e.g. 256MiB).
        #[arg(long, value_parser = parse_size, default_value = "64MiB")]
        size: u64,
        /// Seed of the data (the same seed and size give the same files).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write N ranks' files from this process (without a launcher).
        #[arg(long, value_name = "N", default_value_t = 1)]
        ranks: usize,
    },
    /// Remove a committed or cancelled transfer's state (its id is never reused).
    Forget {
        /// The transfer id.
        id: String,
        /// Where the transfer's state lives.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// A stderr logger whose lines carry `r{rank}/{size}`.
struct Logger {
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let (rank, size) = comm::thread_rank();
        let level = match r.level() {
            log::Level::Error => "error",
            log::Level::Warn => "warning",
            log::Level::Info => "info",
            log::Level::Debug => "debug",
            log::Level::Trace => "trace",
        };
        // One write per line: under a launcher, ranks' stderr chunks interleave.
        let line = format!("ferry r{rank}/{size} {level}: {}\n", r.args());
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    fn flush(&self) {}
}

fn init_log(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    if log::set_boxed_logger(Box::new(Logger { level })).is_ok() {
        log::set_max_level(level);
    }
}

/// How the ranks of this run exist: in this process (one, or `--ranks N` threads), or as the
/// processes of an MPI job.
#[derive(Clone, Copy)]
enum Launch<'a> {
    Local,
    #[cfg(feature = "mpi")]
    Mpi(&'a ferry::mpi_comm::MpiComm),
    #[cfg(not(feature = "mpi"))]
    #[allow(dead_code)]
    Never(std::marker::PhantomData<&'a ()>),
}

/// The id of the transfer this run works on, once rank 0 knows it (for the error hint).
static ANNOUNCED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn main() {
    // `ferry list | head` ends quietly, as other command-line tools do.
    // SAFETY: restoring the default disposition of SIGPIPE runs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // Misuse is a `usage` error like any other: one line in ferry's form, then clap's
            // details (what was expected, how to get help).
            let text = e.render().to_string();
            let text = text.trim_start_matches("error: ");
            let mut lines = text.lines();
            eprintln!(
                "ferry: error: usage: {}",
                lines.next().unwrap_or("bad arguments")
            );
            for l in lines.filter(|l| !l.trim().is_empty()) {
                eprintln!("  {l}");
            }
            std::process::exit(ferry::ErrorClass::Usage.exit_code());
        }
    };
    let (quiet, json) = match &cli.cmd {
        Cmd::Copy { out, .. } | Cmd::Resume { out, .. } => (out.quiet || out.json, out.json),
        Cmd::Status { json, .. } | Cmd::Verify { json, .. } | Cmd::List { json, .. } => {
            (*json, *json)
        }
        _ => (false, false),
    };
    init_log(cli.verbose, quiet);
    let collective = matches!(
        cli.cmd,
        Cmd::Copy { .. } | Cmd::Resume { .. } | Cmd::Gen { .. }
    );
    // The transfer a command names (a copy's is known once its plan is durable: ANNOUNCED).
    let named = match &cli.cmd {
        Cmd::Resume { id, .. }
        | Cmd::Cancel { id, .. }
        | Cmd::Verify { id, .. }
        | Cmd::Forget { id, .. } => Some(id.clone()),
        Cmd::Status { id, .. } => id.clone(),
        Cmd::Copy { .. } | Cmd::List { .. } | Cmd::Gen { .. } => None,
    };

    #[cfg(feature = "mpi")]
    let mpi = if collective && ferry::mpi_comm::launched() {
        match ferry::mpi_comm::init() {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("ferry: error: {e}");
                std::process::exit(e.exit_code());
            }
        }
    } else {
        None
    };
    #[cfg(feature = "mpi")]
    let launch = match &mpi {
        Some(m) => {
            comm::set_thread_rank(m.comm.rank(), m.comm.size());
            Launch::Mpi(&m.comm)
        }
        None => Launch::Local,
    };
    #[cfg(not(feature = "mpi"))]
    let launch = Launch::Local;

    // Commands that are not collective act once per job: on the launcher's rank 0.
    if !collective && comm::launcher_rank().is_some_and(|r| r != 0) {
        std::process::exit(0);
    }
    // SIGTERM, SIGINT, SIGUSR1: stop every rank, flush journals, exit `interrupted` (3).
    if collective {
        if let Err(e) = ferry::stop::install_signal_handlers(comm::thread_rank().0) {
            eprintln!("ferry: error: {e}");
            std::process::exit(e.exit_code());
        }
    }
    let result = run(cli, launch);
    ferry::stop::finishing();
    let (rank, size) = comm::thread_rank();
    let code = match &result {
        Ok(code) => *code,
        Err(e) => {
            // Errors every rank agreed on carry the failing rank: rank 0 tells them once.
            if rank == 0 || e.rank.is_none() {
                // Name the transfer in the hint once it has one.
                let id = ANNOUNCED.lock().ok().and_then(|a| a.clone()).or(named);
                let hint = e.hint(id.as_deref());
                let msg = format!("ferry: error: {e}\n  hint: {hint}\n");
                let _ = std::io::stderr().write_all(msg.as_bytes());
                if json {
                    let v = serde_json::json!({
                        "error": e, "hint": hint, "exit_code": e.exit_code()
                    });
                    println!("{v}");
                }
            }
            e.exit_code()
        }
    };
    #[cfg(feature = "mpi")]
    if let (Some(m), Err(e)) = (&mpi, &result) {
        // An error that did not go through a collective agreement may leave peers waiting in a
        // collective: end the whole job rather than hang it.
        if e.rank.is_none() && size > 1 {
            m.comm.abort(code);
        }
    }
    let _ = size;
    #[cfg(feature = "mpi")]
    drop(mpi);
    std::process::exit(code);
}

fn locate(id: &str, state_dir: Option<&std::path::Path>) -> ferry::Result<TransferDir> {
    state::locate(id, state_dir)
}

fn run(cli: Cli, launch: Launch) -> ferry::Result<i32> {
    // Refused before anything is planned or written.
    let needs_hdf5 = match &cli.cmd {
        Cmd::Copy { verify_hdf5, .. } | Cmd::Resume { verify_hdf5, .. } => {
            verify_hdf5.map(|_| "--verify-hdf5")
        }
        Cmd::Gen { .. } => Some("ferry gen"),
        _ => None,
    };
    if let (Some(what), false) = (needs_hdf5, ferry::h5::AVAILABLE) {
        return Err(ferry::h5::unavailable(what));
    }
    match cli.cmd {
        Cmd::Copy {
            mut paths,
            id,
            state_dir,
            layout,
            chunk_size,
            threads,
            delete_source,
            verify,
            preserve,
            verify_hdf5,
            skip_special,
            out,
        } => {
            let dest = paths.pop().unwrap_or_default();
            let mut opts = CopyOptions::new(paths, dest);
            opts.id = id;
            opts.state_dir = state_dir;
            opts.layout = layout;
            opts.chunk_size = chunk_size;
            opts.threads = threads.unwrap_or_else(default_threads);
            opts.delete_source = delete_source;
            opts.verify = verify;
            opts.preserve = preserve;
            opts.skip_special = skip_special;
            let sum = run_ranks(&out, launch, |c, run| {
                let mut run = run.clone();
                run.verify_hdf5 = verify_hdf5;
                transfer::copy(c, &opts, &run)
            })?;
            report(&sum, &out);
            Ok(0)
        }
        Cmd::Resume {
            id,
            state_dir,
            threads,
            verify,
            verify_hdf5,
            out,
        } => {
            let sum = run_ranks(&out, launch, |c, run| {
                let mut run = run.clone();
                run.threads = threads;
                run.verify = verify;
                run.verify_hdf5 = verify_hdf5;
                transfer::resume(c, &id, state_dir.as_deref(), &run)
            })?;
            report(&sum, &out);
            Ok(0)
        }
        Cmd::Gen {
            dir,
            size,
            seed,
            ranks,
        } => {
            let one = |c: &dyn Comm| -> ferry::Result<u64> {
                let spec = ferry::h5::GenSpec {
                    bytes: size,
                    seed,
                    rank: c.rank(),
                };
                let wrote = comm::agree(c, ferry::h5::generate(&dir, &spec))?;
                c.allreduce_sum(wrote)
            };
            let total = match launch {
                #[cfg(feature = "mpi")]
                Launch::Mpi(c) if ranks == 1 => one(c),
                #[cfg(feature = "mpi")]
                Launch::Mpi(_) => Err(Error::usage(
                    "--ranks writes ranks' files from one process; under a launcher each rank \
                     writes its own",
                )),
                _ if ranks == 0 => Err(Error::usage("--ranks must be at least 1")),
                _ if ranks == 1 => one(&SingleComm),
                _ => comm::run_threads(ranks, |c| one(c))
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Err(Error::internal("no ranks ran"))),
            }?;
            if comm::thread_rank().0 == 0 {
                println!(
                    "wrote {} in HDF5 and plain files under '{}'",
                    ferry::size::human(total),
                    dir.display()
                );
            }
            Ok(0)
        }
        Cmd::Status {
            id,
            state_dir,
            json,
        } => {
            let list = match id {
                Some(id) => vec![status::status(&state::locate_to_read(
                    &id,
                    state_dir.as_deref(),
                )?)],
                None => transfer::list(state_dir.as_deref())?,
            };
            if json {
                let v = if list.len() == 1 {
                    serde_json::to_string_pretty(&list[0])
                } else {
                    serde_json::to_string_pretty(&list)
                };
                println!("{}", v.map_err(|e| Error::internal(e.to_string()))?);
            } else if list.is_empty() {
                println!("no transfers");
            } else {
                for (i, st) in list.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print_status(st);
                }
            }
            Ok(0)
        }
        Cmd::Cancel {
            id,
            state_dir,
            wait,
        } => {
            let td = locate(&id, state_dir.as_deref())?;
            let what = transfer::cancel(&td, Duration::from_secs(wait))?;
            let msg = match what {
                transfer::CancelOutcome::StoppedLiveRun => "stopped its run and cancelled it",
                transfer::CancelOutcome::Cancelled => "cancelled it",
                transfer::CancelOutcome::AlreadyCancelled => "it was already cancelled",
            };
            println!("transfer {id}: {msg}; temporary files removed");
            Ok(0)
        }
        Cmd::Verify {
            id,
            state_dir,
            json,
        } => {
            let td = locate(&id, state_dir.as_deref())?;
            let m = transfer::verify(&td)?;
            if json {
                let v = serde_json::json!({
                    "id": id, "ok": true, "files": m.files.len(),
                    "symlinks": m.symlinks.len(), "dirs": m.dirs.len(), "bytes": m.bytes,
                });
                println!("{v}");
            } else {
                println!(
                    "transfer {id}: destination matches its manifest ({} files, {}, {} symlinks, \
                     {} directories)",
                    m.files.len(),
                    human(m.bytes),
                    m.symlinks.len(),
                    m.dirs.len()
                );
            }
            Ok(0)
        }
        Cmd::List { state_dir, json } => {
            let list = transfer::list(state_dir.as_deref())?;
            if json {
                let v = serde_json::to_string_pretty(&list)
                    .map_err(|e| Error::internal(e.to_string()))?;
                println!("{v}");
            } else {
                println!(
                    "{:<32} {:<12} {:>8} {:>12} {:>7}  STARTED",
                    "ID", "STATE", "FILES", "BYTES", "DONE"
                );
                for st in &list {
                    println!(
                        "{:<32} {:<12} {:>8} {:>12} {:>6.1}%  {}",
                        st.id,
                        st.state.name(),
                        st.files,
                        human(st.bytes_total),
                        percent(st.bytes_done, st.bytes_total),
                        st.started.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Forget { id, state_dir } => {
            let td = locate(&id, state_dir.as_deref())?;
            transfer::forget(&td)?;
            println!("transfer {id}: forgotten");
            Ok(0)
        }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().min(4))
        .unwrap_or(2)
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    }
}

/// Where the progress bar reads bytes done: this process's counters (all its ranks), or the
/// journals of every rank (an MPI job, whose other ranks live in other processes).
struct BarSource {
    counters: Arc<Progress>,
    journals: bool,
    transfer: std::sync::Mutex<Option<(TransferDir, u64)>>,
}

/// Run `f` on every rank (this process's one, `--ranks N` threads, or this MPI rank), with a
/// progress bar on rank 0; returns this process's rank-0 (or own) result.
fn run_ranks<F>(out: &Output, launch: Launch, f: F) -> ferry::Result<Summary>
where
    F: Fn(&dyn Comm, &RunOptions) -> ferry::Result<Summary> + Sync,
{
    if out.ranks == 0 {
        return Err(Error::usage("--ranks must be at least 1"));
    }
    let root = comm::thread_rank().0 == 0;
    let src = Arc::new(BarSource {
        counters: Arc::new(Progress::default()),
        journals: !matches!(launch, Launch::Local),
        transfer: std::sync::Mutex::new(None),
    });
    let quiet_json = out.json;
    let announce_src = src.clone();
    let run = RunOptions {
        progress: Some(src.counters.clone()),
        announce: Some(Arc::new(
            move |id: &str, dir: &std::path::Path, total: u64| {
                if !quiet_json {
                    println!("{id}");
                    let _ = std::io::stdout().flush();
                }
                log::debug!("transfer {id}: state in '{}'", dir.display());
                if let Ok(mut a) = ANNOUNCED.lock() {
                    *a = Some(id.to_string());
                }
                if let Ok(mut t) = announce_src.transfer.lock() {
                    *t = Some((
                        TransferDir::from_path(dir.to_path_buf(), id.to_string()),
                        total,
                    ));
                }
            },
        )),
        retry: RetryPolicy {
            attempts: out.retries,
            max_time: out.retry_time,
            ..RetryPolicy::default()
        },
        ..RunOptions::default()
    };
    let show =
        root && (out.progress || (!out.quiet && !out.json && std::io::stderr().is_terminal()));
    let done = Arc::new(AtomicBool::new(false));
    let bar = show.then(|| {
        let (s, d) = (src.clone(), done.clone());
        std::thread::spawn(move || draw_progress(&s, &d))
    });
    let result = match launch {
        #[cfg(feature = "mpi")]
        Launch::Mpi(c) => {
            if out.ranks > 1 {
                Err(Error::usage(
                    "--ranks runs ranks as threads without a launcher; under mpirun or srun the \
                     launcher gives the ranks",
                ))
            } else {
                f(c, &run)
            }
        }
        _ if out.ranks == 1 => f(&SingleComm, &run),
        _ => comm::run_threads(out.ranks, |c| f(c, &run))
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(Error::internal("no ranks ran"))),
    };
    done.store(true, Ordering::Relaxed);
    if let Some(b) = bar {
        let _ = b.join();
    }
    result
}

fn draw_progress(src: &BarSource, done: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut watch = ferry::journal::Watch::default();
    let mut sample = || {
        if src.journals {
            let t = src.transfer.lock().ok().and_then(|t| t.clone());
            match t {
                Some((td, total)) => (watch.poll(&td), total),
                None => (0, 0),
            }
        } else {
            (
                src.counters.done.load(Ordering::Relaxed),
                src.counters.total.load(Ordering::Relaxed),
            )
        }
    };
    while !done.load(Ordering::Relaxed) {
        let (d, t) = sample();
        bar.set_length(t);
        bar.set_position(d);
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
}

fn report(sum: &Summary, out: &Output) {
    if comm::thread_rank().0 != 0 {
        return; // only rank 0 speaks for the job
    }
    if out.json {
        match serde_json::to_string_pretty(sum) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("ferry: cannot encode the summary: {e}"),
        }
        return;
    }
    if out.quiet {
        return;
    }
    if sum.already_committed {
        eprintln!(
            "ferry: transfer {} was already committed; nothing to do{}",
            sum.id,
            if sum.sources_removed == Some(true) {
                " (sources removed)"
            } else {
                ""
            }
        );
        return;
    }
    let rate = if sum.seconds > 0.0 {
        sum.bytes_copied as f64 / sum.seconds
    } else {
        0.0
    };
    eprintln!(
        "ferry: transfer {} committed: {} files, {} directories, {} symlinks, {} on {} rank(s) \
         in {:.2} s ({}/s)",
        sum.id,
        sum.files,
        sum.dirs,
        sum.symlinks,
        human(sum.bytes_total),
        sum.ranks,
        sum.seconds,
        human(rate as u64)
    );
    if sum.bytes_reused > 0 || sum.records_discarded > 0 {
        eprintln!(
            "ferry: copied {} in this run; {} were already durable from earlier runs{}",
            human(sum.bytes_copied),
            human(sum.bytes_reused),
            if sum.records_discarded > 0 {
                format!(
                    "; {} damaged journal record(s) discarded",
                    sum.records_discarded
                )
            } else {
                String::new()
            }
        );
    }
    if sum.not_preserved > 0 {
        eprintln!(
            "ferry: warning: {} owner, group, extended-attribute or set-id change(s) could not \
             be made; each is named above",
            sum.not_preserved
        );
    }
    if sum.sources_removed == Some(true) {
        eprintln!("ferry: sources removed");
    }
}

fn print_status(st: &Status) {
    println!("transfer {}: {}", st.id, st.state);
    if let (Some(start), Some(by)) = (&st.started, &st.started_by) {
        println!("  started   {start} by {by}");
    }
    if let Some(l) = st.layout {
        println!("  layout    {l}, planned on {} rank(s)", st.ranks);
    }
    if !st.sources.is_empty() {
        println!("  from      {}", st.sources.join(" "));
        println!("  to        {}", st.dest);
    }
    println!(
        "  progress  {} of {} ({:.1}%), {} of {} units; {} files, {} directories, {} symlinks",
        human(st.bytes_done),
        human(st.bytes_total),
        percent(st.bytes_done, st.bytes_total),
        st.units_done,
        st.units_total,
        st.files,
        st.dirs,
        st.symlinks
    );
    if let Some(l) = &st.live {
        println!("  running   {l}");
    }
    if let Some(f) = &st.finished {
        println!("  finished  {f}");
    }
    if let Some(r) = st.sources_removed {
        println!(
            "  sources   {}",
            if r { "removed" } else { "not yet removed" }
        );
    }
    if let Some(e) = &st.error {
        println!("  error     {e}");
    }
    println!("  state dir {}", st.state_dir.display());
}
