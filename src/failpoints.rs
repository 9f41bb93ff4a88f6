//! Named failpoints (`phase::step`) that crash tests trip to kill or fail ferry at an exact line.
//!
//! Compiled in only with the cargo feature `failpoints`; without it every call is an empty inline
//! function. Activated through the environment so they reach every rank under a launcher:
//!
//! ```text
//! FERRY_FAILPOINTS="copy::unit_synced=exit@1#3;commit::decision_written=panic"
//! ```
//!
//! Each item is `name=action[@rank][#nth[*count]]`: `action` is `exit` (leave the process at once
//! without unwinding or flushing, what SIGKILL does), `panic`, `error(ERRNO)` with ERRNO one of
//! `EIO`, `ENOSPC`, `EACCES`, `EPERM`, `EROFS`, `EFBIG`, `EAGAIN`, `ETIMEDOUT`, `EINTR`, `ENOLCK` (the error
//! of the operation named by the point's last part: `copy::read` fails a read), `powerloss` (as `exit`, after recording what a power loss would keep:
//! see the `powerloss` module), or `pause` (create `$FERRY_FAILPOINTS_GATE.paused`, then wait until the
//! file `$FERRY_FAILPOINTS_GATE` exists, and remove it: tests use it to look at, or tamper with, a run at an
//! exact point), or `delay(MS)` (sleep MS milliseconds on this and every later hit: slows a
//! run down so a test can kill it mid-copy); `@rank` limits it to one rank; `#nth` fires on the nth hit on that rank
//! (default: the first), `#nth*count` on `count` hits from the nth, `#nth*` on every hit from the
//! nth. `FERRY_FAILPOINTS_LIST=1` prints every point as it is passed, so tests
//! can see which points a run goes through.
//!
//! This module only decides whether to fire; it must not change behaviour when nothing is set.

use std::path::Path;

use crate::error::Result;

/// The exit code of the `exit` action (distinct from every ferry exit code).
pub const EXIT_CODE: i32 = 99;

/// Every failpoint in the engine, in the order a run meets them. A test keeps this list, the
/// source and docs/failure-analysis.md in step.
pub const DECLARED: &[&str] = &[
    "locks::dest",
    "plan::walked",
    "plan::written",
    "comm::before_agree",
    "comm::after_agree",
    "journal::append",
    "journal::written",
    "journal::synced",
    "copy::unit_start",
    "copy::read",
    "copy::unit_written",
    "copy::unit_synced",
    "copy::all_done",
    "commit::before_decision",
    "commit::decision_written",
    "commit::file_finished",
    "commit::renamed",
    "commit::dirs_synced",
    "commit::before_record",
    "commit::record_written",
    "delete::source",
    "delete::dir",
    "delete::recorded",
    "cancel::temps_removed",
    "forget::start",
    "fsio::sync_data",
    "fsio::sync_all",
    "fsio::fsync_dir",
    "fsio::syncfs",
    "fsio::rename",
];

/// Pass a failpoint that is not tied to a path.
#[inline]
pub fn hit(name: &str) -> Result<()> {
    imp::hit(name, None)
}

/// Pass a failpoint in front of an I/O operation on `path`.
#[inline]
pub fn io(name: &str, path: &Path) -> Result<()> {
    imp::hit(name, Some(path))
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    use super::*;

    #[inline(always)]
    pub fn hit(_name: &str, _path: Option<&Path>) -> Result<()> {
        Ok(())
    }
}

#[cfg(feature = "failpoints")]
mod imp {
    use super::*;
    use crate::error::Error;
    use std::collections::HashMap;
    use std::io;
    use std::sync::{Mutex, OnceLock};

    #[derive(Debug)]
    enum Action {
        PowerLoss,
        Delay(u64),
        Pause,
        Exit,
        Panic,
        Error(i32),
    }

    #[derive(Debug)]
    struct Point {
        name: String,
        action: Action,
        rank: Option<usize>,
        nth: u64,
        /// Hits it fires on, from the nth (`u64::MAX`: every one).
        count: u64,
    }

    fn parse(spec: &str) -> Vec<Point> {
        spec.split(';')
            .filter(|s| !s.trim().is_empty())
            .filter_map(|item| {
                let (name, rest) = item.trim().split_once('=')?;
                let (rest, nth, count) = match rest.split_once('#') {
                    Some((r, n)) => match n.split_once('*') {
                        Some((n, "")) => (r, n.parse().ok()?, u64::MAX),
                        Some((n, c)) => (r, n.parse().ok()?, c.parse().ok()?),
                        None => (r, n.parse().ok()?, 1),
                    },
                    None => (rest, 1, 1),
                };
                let (act, rank) = match rest.split_once('@') {
                    Some((a, r)) => (a, Some(r.parse().ok()?)),
                    None => (rest, None),
                };
                let action = match act {
                    "exit" => Action::Exit,
                    "pause" => Action::Pause,
                    "powerloss" => Action::PowerLoss,
                    a if a.starts_with("delay(") && a.ends_with(')') => {
                        Action::Delay(a[6..a.len() - 1].parse().ok()?)
                    }
                    "panic" => Action::Panic,
                    "error" => Action::Error(libc::EIO),
                    a if a.starts_with("error(") && a.ends_with(')') => {
                        Action::Error(match &a[6..a.len() - 1] {
                            "EIO" => libc::EIO,
                            "ENOSPC" => libc::ENOSPC,
                            "EACCES" => libc::EACCES,
                            "EPERM" => libc::EPERM,
                            "EROFS" => libc::EROFS,
                            "EFBIG" => libc::EFBIG,
                            "EAGAIN" => libc::EAGAIN,
                            "ETIMEDOUT" => libc::ETIMEDOUT,
                            "EINTR" => libc::EINTR,
                            "ENOLCK" => libc::ENOLCK,
                            _ => return None,
                        })
                    }
                    _ => return None,
                };
                Some(Point {
                    name: name.to_string(),
                    action,
                    rank,
                    nth,
                    count,
                })
            })
            .collect()
    }

    struct Registry {
        points: Vec<Point>,
        list: bool,
        hits: Mutex<HashMap<(String, usize), u64>>,
    }

    fn registry() -> &'static Registry {
        static R: OnceLock<Registry> = OnceLock::new();
        R.get_or_init(|| {
            crate::powerloss::start_if_configured();
            new_registry()
        })
    }

    fn new_registry() -> Registry {
        Registry {
            points: parse(&std::env::var("FERRY_FAILPOINTS").unwrap_or_default()),
            list: std::env::var_os("FERRY_FAILPOINTS_LIST").is_some(),
            hits: Mutex::new(HashMap::new()),
        }
    }

    pub fn hit(name: &str, path: Option<&Path>) -> Result<()> {
        let reg = registry();
        let rank = crate::comm::thread_rank().0;
        if reg.list {
            // One write per line: under a launcher, ranks' stderr chunks interleave.
            use std::io::Write;
            let line = format!("failpoint {name} r{rank}\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        let Some(p) = reg
            .points
            .iter()
            .find(|p| p.name == name && p.rank.is_none_or(|r| r == rank))
        else {
            return Ok(());
        };
        let n = {
            let mut hits = reg.hits.lock().unwrap_or_else(|e| e.into_inner());
            let c = hits.entry((name.to_string(), rank)).or_insert(0);
            *c += 1;
            *c
        };
        if let Action::Delay(ms) = p.action {
            if n >= p.nth {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            return Ok(());
        }
        if n < p.nth || n - p.nth >= p.count {
            return Ok(());
        }
        match p.action {
            Action::PowerLoss => {
                eprintln!("failpoint {name}: power loss on rank {rank}, hit {n}");
                crate::powerloss::dump();
                // SAFETY: as for `exit`: the process ends here, nothing flushed.
                unsafe { libc::_exit(EXIT_CODE) }
            }
            Action::Delay(_) => Ok(()),
            Action::Pause => {
                let gate = std::env::var_os("FERRY_FAILPOINTS_GATE")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| std::path::PathBuf::from("ferry-gate"));
                let mut paused = gate.clone().into_os_string();
                paused.push(".paused");
                let _ = std::fs::write(&paused, format!("{name} r{rank}"));
                while !gate.exists() {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                // Ready for the next pause.
                let _ = std::fs::remove_file(&gate);
                Ok(())
            }
            Action::Exit => {
                eprintln!("failpoint {name}: exit on rank {rank}, hit {n}");
                // SAFETY: _exit ends the process at once; nothing is flushed, as with SIGKILL.
                unsafe { libc::_exit(EXIT_CODE) }
            }
            Action::Panic => panic!("failpoint {name}: panic on rank {rank}, hit {n}"),
            Action::Error(errno) => {
                eprintln!("failpoint {name}: error {errno} on rank {rank}, hit {n}");
                let p = path.unwrap_or(Path::new(name));
                // `copy::read` fails as a read would (EIO there is transient), other points
                // under their own name.
                let op = match name.rsplit_once("::") {
                    Some((_, "read")) => "read",
                    _ => name,
                };
                Err(Error::io(op, p, io::Error::from_raw_os_error(errno)))
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse() {
            let p = parse(
                "a::b=exit@1#3; c::d=error(ENOSPC);bad;e=panic;f=delay(20);g=error(EAGAIN)#2*3;h=error(ETIMEDOUT)#1*",
            );
            assert_eq!(p.len(), 6);
            assert_eq!((p[4].nth, p[4].count), (2, 3));
            assert!(matches!(p[4].action, Action::Error(libc::EAGAIN)));
            assert_eq!((p[5].nth, p[5].count), (1, u64::MAX));
            assert_eq!(p[0].count, 1);
            assert!(matches!(p[3].action, Action::Delay(20)));
            assert_eq!(p[0].rank, Some(1));
            assert_eq!(p[0].nth, 3);
            assert!(matches!(p[1].action, Action::Error(libc::ENOSPC)));
            assert!(matches!(p[2].action, Action::Panic));
        }
    }
}

#[cfg(test)]
mod declared {
    use super::DECLARED;
    use std::collections::BTreeSet;

    /// Every file below `dir`, modules in subdirectories (`src/fsio/tree.rs`) included.
    fn files_below(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files_below(&p, out);
            } else {
                out.push(p);
            }
        }
    }

    fn named_in_source() -> BTreeSet<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        files_below(&dir, &mut files);
        let mut out = BTreeSet::new();
        for path in files {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for pat in ["failpoints::hit(\"", "failpoints::io(\""] {
                for (at, _) in text.match_indices(pat) {
                    let rest = &text[at + pat.len()..];
                    if let Some(end) = rest.find('"') {
                        out.insert(rest[..end].to_string());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_failpoint_in_the_source_is_declared_and_every_declared_one_exists() {
        let src = named_in_source();
        let decl: BTreeSet<String> = DECLARED.iter().map(|s| s.to_string()).collect();
        assert_eq!(src, decl);
    }

    #[test]
    fn the_failure_analysis_covers_every_failpoint_and_names_no_other() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/failure-analysis.md"),
        )
        .unwrap();
        let mut named = BTreeSet::new();
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // Rows of the crash-point tables: | number (4, 4a) | ... (`phase::step`) ... |
            if cells.len() > 2
                && cells[1].starts_with(|c: char| c.is_ascii_digit())
                && cells[1].chars().all(|c| c.is_ascii_alphanumeric())
            {
                for tok in cells[2].split('`').skip(1).step_by(2) {
                    named.insert(tok.to_string());
                }
            }
        }
        let decl: BTreeSet<String> = DECLARED.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            named, decl,
            "docs/failure-analysis.md rows vs failpoints::DECLARED"
        );
    }
}
