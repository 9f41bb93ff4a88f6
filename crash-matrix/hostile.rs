//! The hostile-world matrix (issue 17), beside the crash matrix: the world around ferry gets in
//! the way between and during attempts. Foreign files at temporary names, stale files of the same
//! size at final names, sources replaced, rewritten, truncated or grown, a second transfer in the
//! same directory, failed fsync / fdatasync / syncfs / directory fsync on every rank, the state
//! directory swapped or its plan replaced, `--verify` failures before and after the decision.
//!
//! Every cell runs the real binary, applies its disturbance, resumes, and checks on the disk:
//! whenever a commit record exists the destination holds exactly the bytes the cell expects;
//! nothing foreign was written, trusted or removed; a source is never lost before its commit;
//! every exit is 0 or a clear error (2-8). A cell ends `survived` (committed, right bytes),
//! `safe-fail` (a clear error, nothing false committed; the cells that must recover did) or
//! `violation`, which fails the suite. One JSON line per cell in target/hostile-matrix.jsonl
//! (`FERRY_HOSTILE_OUT`); `FERRY_HOSTILE_ONLY=substring` runs the cells whose name holds it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Instant;

use super::{ferry_env, hit_counts, make_sources, Launch};
use crate::util::*;
use std::collections::BTreeMap;

/// What a cell's steps found.
struct Ctx<'a> {
    s: &'a Scratch,
    ranks: usize,
    problems: Vec<String>,
    clean_errors: usize,
    /// The transfer the cell is about and whether its last step committed it.
    committed: bool,
    /// For a failpoint cell, whether the failpoint fired.
    fired: Option<bool>,
    /// The mtime the copied tree's root must have (its source's when planned).
    root_mtime: Option<(i64, i64)>,
}

fn mtime_of(p: &Path) -> Option<(i64, i64)> {
    fs::metadata(p).map(|m| (m.mtime(), m.mtime_nsec())).ok()
}

const ID: &str = "h";

impl<'a> Ctx<'a> {
    fn new(s: &'a Scratch, ranks: usize) -> Ctx<'a> {
        Ctx {
            s,
            ranks,
            problems: Vec::new(),
            clean_errors: 0,
            committed: false,
            fired: None,
            root_mtime: None,
        }
    }

    fn launch(&self) -> Launch {
        Launch::Threads(self.ranks)
    }

    /// Note a step's exit: 0, a clear error (2-8), or a problem.
    fn step(&mut self, what: &str, o: &Output) -> i32 {
        let code = o.status.code().unwrap_or(-1);
        match code {
            0 => {}
            2..=8 => self.clean_errors += 1,
            _ => self.problems.push(format!(
                "{what}: exit {code}: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .rfind(|l| !l.starts_with("failpoint "))
                    .unwrap_or_default()
            )),
        }
        code
    }

    /// `ferry copy --id ID` of `srcs` into `dst` (16 KiB units, one thread per rank), stopped by
    /// failpoint `fp` if given (its `exit` leaves as SIGKILL would).
    fn copy(
        &mut self,
        id: &str,
        extra: &[&str],
        srcs: &[&str],
        dst: &str,
        fp: Option<&str>,
    ) -> Output {
        let mut args = vec!["copy", "--id", id, "--chunk-size", "16K", "--threads", "1"];
        args.extend(extra);
        args.extend(srcs);
        args.push(dst);
        let o = ferry_env(self.s, self.launch(), &args, fp, &[]);
        if fp.is_none() || o.status.code() != Some(ferry::failpoints::EXIT_CODE) {
            self.step(&format!("copy {id}"), &o);
        }
        o
    }

    /// The same copy, started and held at `fp` (a `pause` failpoint) until [`Ctx::release`].
    fn copy_paused(&self, id: &str, srcs: &[&str], dst: &str, fp: &str) -> Child {
        let mut c = self.s.ferry();
        c.env("FERRY_FAILPOINTS", fp)
            .args(["copy", "--id", id, "--chunk-size", "16K", "--threads", "1"])
            .args(srcs)
            .arg(dst)
            .args(["--ranks", &self.ranks.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn_tracked();
        self.s.wait_paused(&mut child);
        child
    }

    /// Open the gate of a held run and wait for it (at most two minutes: a run that hangs is a
    /// problem of the cell, not a hung suite).
    fn release(&mut self, what: &str, mut c: Child) -> i32 {
        self.s.release();
        let t = Instant::now();
        while c.try_wait().unwrap().is_none() {
            if t.elapsed().as_secs() > 120 {
                let _ = c.kill();
                self.problems
                    .push(format!("{what}: still running 120 s after release"));
                let _ = c.wait();
                return -1;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let o = c.wait_with_output().unwrap();
        self.step(what, &o)
    }

    /// `ferry resume ID` with `extra` flags, state in `state`.
    fn resume(&mut self, id: &str, state: &Path, extra: &[&str]) -> i32 {
        let st = state.to_str().unwrap().to_string();
        let mut args = vec!["resume", id, "--state-dir", &st];
        args.extend(extra);
        let o = ferry_env(self.s, self.launch(), &args, None, &[]);
        self.step(&format!("resume {id} {extra:?}"), &o)
    }

    /// Resume until committed or `tries` resumes failed.
    fn resume_until_done(&mut self, id: &str, state: &Path, tries: usize) {
        for _ in 0..tries {
            if state.join(id).join("commit").exists() {
                break;
            }
            self.resume(id, state, &[]);
        }
    }

    /// Check transfer `id` into `dst`: if it is committed, `dst` matches `want` exactly (but
    /// for the names in `planted`), `ferry verify` agrees, and no temporary of ferry's is left.
    fn check(&mut self, id: &str, want: &Path, dst: &Path, planted: &[PathBuf]) {
        let state = dst.join(".ferry");
        self.committed = state.join(id).join("commit").exists();
        let shown: Vec<String> = planted
            .iter()
            .filter_map(|p| p.strip_prefix(dst).ok())
            .map(|p| p.display().to_string())
            .collect();
        if self.committed {
            for d in diff_trees(want, dst) {
                if !shown.iter().any(|n| d.ends_with(n.as_str())) {
                    self.problems.push(format!("committed, but {d}"));
                }
            }
            let st = state.to_str().unwrap().to_string();
            let o = self.s.run(&["verify", id, "--state-dir", &st]);
            if !o.status.success() {
                self.problems
                    .push(format!("committed, but verify says: {}", stderr(&o).trim()));
            }
            for t in temps_in(dst) {
                if !planted.contains(&t) {
                    self.problems
                        .push(format!("committed, but temporary left: {}", t.display()));
                }
            }
            self.no_guard_left(dst);
            // The tree's root keeps its source's mtime as planned (diff_trees leaves the root
            // out): nothing ferry does after the commit (a lock file's removal) changes it.
            if self.root_mtime.is_some() && self.root_mtime != mtime_of(dst) {
                self.problems.push(format!(
                    "committed, but the root's mtime is {:?}, not {:?}",
                    mtime_of(dst),
                    self.root_mtime
                ));
            }
        } else {
            self.problems.extend(torn_finals(want, dst));
        }
    }

    /// Once every run has ended, no destination lock file of ferry's is left under `dst`.
    fn no_guard_left(&mut self, dst: &Path) {
        for f in files_under(dst) {
            if f.ends_with(".ferry/.dest.lock") {
                self.problems
                    .push(format!("lock file left: {}", f.display()));
            }
        }
    }

    fn outcome(&self, must_survive: bool, may_miss: bool) -> (&'static str, String) {
        if self.fired == Some(false) && may_miss && self.problems.is_empty() {
            ("not-reached", "this run made fewer of those calls".into())
        } else if !self.problems.is_empty() {
            ("violation", self.problems.join("; "))
        } else if must_survive && !self.committed {
            ("violation", "did not recover: no commit".into())
        } else if self.fired == Some(false) {
            (
                "violation",
                "the failpoint never fired: the cell tested nothing".into(),
            )
        } else if self.clean_errors > 0 {
            ("safe-fail", String::new())
        } else if self.committed {
            ("survived", String::new())
        } else {
            ("violation", "no commit and no error".into())
        }
    }
}

/// What a planted object is, to see that ferry left it alone.
#[derive(Debug, PartialEq)]
struct Print {
    ino: u64,
    mode: u32,
    uid: u32,
    nlink: u64,
    link: Option<PathBuf>,
    data: Option<Vec<u8>>,
}

fn print(p: &Path) -> Option<Print> {
    let md = fs::symlink_metadata(p).ok()?;
    Some(Print {
        ino: md.ino(),
        mode: md.mode(),
        uid: md.uid(),
        nlink: md.nlink(),
        link: fs::read_link(p).ok(),
        data: md.is_file().then(|| fs::read(p).unwrap_or_default()),
    })
}

/// The kinds of foreign object planted where ferry expects its own temporary file.
const FOREIGN: [&str; 5] = [
    "other-owner",
    "other-transfer",
    "hard-link",
    "symlink",
    "fifo",
];

/// Plant a foreign object of `kind` at `at` (the canary outside the tree is the target of links).
fn plant(s: &Scratch, kind: &str, at: &Path) {
    let canary = s.path("outside/canary");
    match kind {
        "other-owner" => {
            fs::write(at, b"someone else's").unwrap();
            fs::set_permissions(at, fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(at, Some(65534), Some(65534)).unwrap();
        }
        // Looks exactly like a temporary of ferry's, and is one: of another transfer.
        "other-transfer" => {
            fs::write(at, b"another transfer's bytes").unwrap();
            fs::set_permissions(at, fs::Permissions::from_mode(0o600)).unwrap();
        }
        "hard-link" => fs::hard_link(&canary, at).unwrap(),
        "symlink" => symlink(&canary, at).unwrap(),
        "fifo" => {
            let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        }
        _ => unreachable!(),
    }
}

fn setup(s: &Scratch, reference: &Path) {
    cp_a(reference, &s.path("src"));
    assert_eq!(mtime_of(reference), mtime_of(&s.path("src")));
    fs::create_dir_all(s.path("outside")).unwrap();
    fs::write(s.path("outside/canary"), b"canary").unwrap();
}

/// Foreign objects at ferry-like names, before the run (names of another transfer: this run's
/// names hold its random nonce) or, between attempts, at a temporary name the journal records.
fn foreign(c: &mut Ctx, reference: &Path, kind: &str, between: bool) {
    let s = c.s;
    setup(s, reference);
    c.root_mtime = mtime_of(reference);
    let dst = s.path("dst");
    let mut planted = Vec::new();
    if between {
        c.copy(ID, &[], &["src"], "dst", Some("journal::synced=exit#1"));
        let mut temps = temps_in(&dst);
        temps.sort();
        let Some(t) = temps.into_iter().next() else {
            c.problems.push("no temporary to replace".into());
            return;
        };
        fs::remove_file(&t).unwrap();
        let at = if kind == "other-transfer" {
            // Another transfer's temporary beside this one's.
            t.with_file_name(".ferry-other-0123456789abcdef-0-1.tmp")
        } else {
            t
        };
        plant(s, kind, &at);
        planted.push(at);
    } else {
        fs::create_dir_all(dst.join("d0")).unwrap();
        for name in [".ferry-other-0123456789abcdef-0-1.tmp", ".ferry-xfer-0.tmp"] {
            let at = dst.join("d0").join(name);
            plant(s, kind, &at);
            planted.push(at);
        }
    }
    let before: Vec<Option<Print>> = planted.iter().map(|p| print(p)).collect();
    if between {
        c.resume_until_done(ID, &dst.join(".ferry"), 1);
    } else {
        c.copy(ID, &[], &["src"], "dst", None);
    }
    let after: Vec<Option<Print>> = planted.iter().map(|p| print(p)).collect();
    if before != after {
        c.problems.push(format!(
            "a planted {kind} was changed: {before:?} -> {after:?}"
        ));
    }
    if fs::read(s.path("outside/canary")).unwrap() != b"canary" {
        c.problems.push("written through a link".into());
    }
    c.check(ID, &s.path("src"), &dst, &planted);
}

/// Set `p`'s mtime to exactly `t` (to the nanosecond, as `cp -p` and `touch -r` do).
fn put_mtime(p: &Path, t: std::time::SystemTime) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.set_modified(t).unwrap();
}

/// Replace `p` with a new file (another inode) of the same size and mtime, other bytes.
fn stale_at(p: &Path, seed: u64) {
    let md = fs::metadata(p).unwrap();
    let tmp = p.with_extension("stale");
    let mut r = Rng::new(seed);
    write_file(&tmp, md.len(), &mut r);
    put_mtime(&tmp, md.modified().unwrap());
    fs::rename(&tmp, p).unwrap();
}

/// A stale file of the same size at a final name: before the run, after the decision (the
/// temporary still there), after some renames (the renamed final replaced), and the last one
/// resumed with `--verify` first. All with `--delete-source`.
fn stale(c: &mut Ctx, reference: &Path, when: &str) {
    let s = c.s;
    setup(s, reference);
    c.root_mtime = mtime_of(reference);
    let dst = s.path("dst");
    let state = dst.join(".ferry");
    let flags = ["--delete-source"];
    match when {
        "before-the-run" => {
            fs::create_dir_all(dst.join("d0")).unwrap();
            fs::copy(s.path("src/d0/f0"), dst.join("d0/f0")).unwrap();
            stale_at(&dst.join("d0/f0"), 7);
            c.copy(ID, &flags, &["src"], "dst", None);
        }
        "after-the-decision" => {
            c.copy(
                ID,
                &flags,
                &["src"],
                "dst",
                Some("commit::decision_written=exit"),
            );
            fs::create_dir_all(dst.join("d0")).unwrap();
            fs::copy(reference.join("d0/f0"), dst.join("d0/f0")).unwrap();
            stale_at(&dst.join("d0/f0"), 7);
            c.resume_until_done(ID, &state, 2);
        }
        "after-some-renames" | "after-some-renames-verify" => {
            c.copy(ID, &flags, &["src"], "dst", Some("commit::renamed=exit#1"));
            let mut n = 0;
            for f in files_under(&dst) {
                let rel = f.strip_prefix(&dst).unwrap();
                let name = f.file_name().unwrap().as_encoded_bytes();
                if rel.starts_with(".ferry") || name.starts_with(b".ferry-") || !f.is_file() {
                    continue;
                }
                if fs::symlink_metadata(&f).unwrap().len() > 0 {
                    stale_at(&f, 9 + n);
                    n += 1;
                }
            }
            if n == 0 {
                c.problems.push("no renamed final to replace".into());
            }
            if when.ends_with("verify") {
                c.resume(ID, &state, &["--verify"]);
            }
            c.resume_until_done(ID, &state, 2);
        }
        _ => unreachable!(),
    }
    if !state.join(ID).join("commit").exists() && !s.path("src").exists() {
        c.problems.push("the source is gone, and no commit".into());
    }
    c.check(ID, reference, &dst, &[]);
}

/// Change source `p`: replaced by another file, rewritten in place, truncated or grown; its
/// mtime put back each time.
fn change(p: &Path, how: &str) {
    let md = fs::metadata(p).unwrap();
    let mut r = Rng::new(77);
    match how {
        "replaced" => stale_at(p, 77),
        "rewritten-in-place" => {
            let mut buf = vec![0u8; md.len() as usize];
            r.fill(&mut buf);
            let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all(&buf).unwrap();
        }
        "truncated" => {
            let f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(md.len() / 2).unwrap();
        }
        "grown" => {
            let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(&[7u8; 10_000]).unwrap();
        }
        _ => unreachable!(),
    }
    put_mtime(p, md.modified().unwrap());
}

/// A source changed between attempts, during the copy of a unit, or after the decision. What a
/// commit must hold: the source as it is when copied (its new version), or, after the
/// decision, the version the decision covered.
fn source(c: &mut Ctx, reference: &Path, how: &str, when: &str) {
    let s = c.s;
    setup(s, reference);
    c.root_mtime = mtime_of(reference);
    let dst = s.path("dst");
    let state = dst.join(".ferry");
    let big = s.path("src/big");
    match when {
        "between-attempts" => {
            c.copy(ID, &[], &["src"], "dst", Some("journal::synced=exit#1"));
            change(&big, how);
            c.resume_until_done(ID, &state, 2);
        }
        "during-a-unit" => {
            let child = c.copy_paused(ID, &["src"], "dst", "copy::unit_written=pause@0#2");
            change(&big, how);
            c.release("copy", child);
            c.resume_until_done(ID, &state, 2);
        }
        "after-the-decision" => {
            c.copy(
                ID,
                &[],
                &["src"],
                "dst",
                Some("commit::decision_written=exit"),
            );
            change(&big, how);
            c.resume_until_done(ID, &state, 2);
        }
        _ => unreachable!(),
    }
    let want = if when == "after-the-decision" {
        reference.to_path_buf()
    } else {
        s.path("src")
    };
    c.check(ID, &want, &dst, &[]);
}

/// Two transfers into one directory: at once (another name goes on, the same name is refused),
/// and both killed before their decision and resumed in either order.
fn two(c: &mut Ctx, case: &str) {
    let s = c.s;
    let mut r = Rng::new(5);
    write_file(&s.path("a/fa"), 200_000, &mut r);
    write_file(&s.path("b/fb"), 150_000, &mut r);
    write_file(&s.path("b2/fa"), 200_000, &mut r);
    let dst = s.path("dst");
    fs::create_dir_all(&dst).unwrap();
    let state = dst.join(".ferry");
    let same = case.contains("same-name");
    let b_src = if same { "b2/fa" } else { "b/fb" };
    let b_final = if same { "fa" } else { "fb" };
    match case {
        "at-once-other-name" | "at-once-same-name" => {
            let a = c.copy_paused("a", &["a/fa"], "dst/", "copy::unit_start=pause@0");
            let o = ferry_env(
                s,
                c.launch(),
                &["copy", "--id", "b", b_src, "dst/"],
                None,
                &[],
            );
            let code = c.step("second copy", &o);
            if same && code != 2 {
                c.problems.push(format!(
                    "the same name at once was not refused (exit {code})"
                ));
            }
            if !same && code != 0 {
                c.problems
                    .push(format!("another name was refused (exit {code})"));
            }
            c.release("first copy", a);
        }
        "killed-a-then-b-other-name"
        | "killed-b-then-a-other-name"
        | "killed-a-then-b-same-name"
        | "killed-b-then-a-same-name" => {
            let fp = Some("journal::synced=exit#1");
            c.copy("a", &[], &["a/fa"], "dst/", fp);
            c.copy("b", &[], &[b_src], "dst/", fp);
            let order = if case.contains("a-then-b") {
                ["a", "b"]
            } else {
                ["b", "a"]
            };
            for id in order {
                c.resume_until_done(id, &state, 1);
            }
            // The later one's bytes at a shared name, each file whole.
            if same {
                let last = if order[1] == "a" { "a/fa" } else { "b2/fa" };
                if fs::read(dst.join("fa")).ok() != fs::read(s.path(last)).ok() {
                    c.problems
                        .push(format!("dst/fa is not {last}, the last committed"));
                }
            }
        }
        _ => unreachable!(),
    }
    let a_ok = state.join("a/commit").exists();
    let b_ok = state.join("b/commit").exists();
    c.committed = a_ok && (b_ok || case == "at-once-same-name");
    if case == "at-once-same-name" && fs::read(dst.join("fa")).ok() != fs::read(s.path("a/fa")).ok()
    {
        c.problems.push("dst/fa is not the first transfer's".into());
    }
    if !same {
        for (f, from) in [("fa", "a/fa"), (b_final, b_src)] {
            if fs::read(dst.join(f)).ok() != fs::read(s.path(from)).ok() {
                c.problems.push(format!("dst/{f} does not hold {from}"));
            }
        }
    }
    if !temps_in(&dst).is_empty() {
        c.problems.push("temporaries left".into());
    }
    c.no_guard_left(&dst);
}

/// The destination locks themselves: nested trees, a linked destination, many runs ending
/// together in one directory, the local layout's ranks writing into one directory, another
/// user's `.ferry` in a shared directory.
fn locks(c: &mut Ctx, reference: &Path, case: &str) {
    let s = c.s;
    setup(s, reference);
    c.root_mtime = mtime_of(reference);
    let mut r = Rng::new(8);
    write_file(&s.path("one/f"), 5000, &mut r);
    let refused = |c: &mut Ctx, args: &[&str], what: &str| {
        let o = s.run(args);
        if o.status.code() != Some(2) || !stderr(&o).contains("another ferry transfer") {
            c.problems
                .push(format!("{what} was not refused: {}", stderr(&o).trim()));
        } else {
            c.clean_errors += 1;
        }
    };
    match case {
        "nested-and-enclosing-while-a-tree-runs" => {
            fs::create_dir_all(s.path("top")).unwrap();
            let a = c.copy_paused(ID, &["src"], "top/t", "copy::unit_start=pause@0");
            refused(c, &["copy", "src", "top/t/d0/in"], "a tree inside it");
            refused(c, &["copy", "src", "top"], "a tree around it");
            refused(c, &["copy", "one/f", "top/t/"], "a file into its root");
            refused(
                c,
                &["copy", "one/f", "top/t/d0/"],
                "a file into a directory of it",
            );
            let o = s.run(&["copy", "one/f", "top/"]);
            c.step("a file beside it", &o);
            c.release("held copy", a);
            c.check(ID, &s.path("src"), &s.path("top/t"), &[]);
            c.no_guard_left(&s.path("top"));
        }
        "a-linked-destination" => {
            fs::create_dir_all(s.path("real")).unwrap();
            symlink(s.path("real"), s.path("link")).unwrap();
            let a = c.copy_paused(ID, &["src"], "link", "copy::unit_start=pause@0");
            refused(
                c,
                &["copy", "src", "real"],
                "the same tree by its real path",
            );
            refused(
                c,
                &["copy", "one/f", "real/d0/"],
                "a file into it by its real path",
            );
            c.release("held copy", a);
            c.check(ID, &s.path("src"), &s.path("real"), &[]);
        }
        "many-runs-of-other-names-at-once-in-one-directory" => {
            fs::create_dir_all(s.path("ckpt")).unwrap();
            let mut kids = Vec::new();
            for k in 0..8 {
                write_file(&s.path(&format!("cache/rank_{k}.ckpt")), 40_000, &mut r);
                let src = format!("cache/rank_{k}.ckpt");
                kids.push(
                    s.ferry()
                        .args(["copy", "--state-dir", "st", &src, "ckpt/"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn_tracked(),
                );
            }
            for k in kids {
                let o = k.wait_with_output().unwrap();
                if c.step("one of eight copies", &o) != 0 {
                    c.problems.push(format!("refused: {}", stderr(&o).trim()));
                }
            }
            for k in 0..8 {
                let f = format!("rank_{k}.ckpt");
                if fs::read(s.path("ckpt").join(&f)).ok() != fs::read(s.path("cache").join(&f)).ok()
                {
                    c.problems.push(format!("ckpt/{f} is wrong"));
                }
            }
            c.no_guard_left(&s.path("ckpt"));
            c.committed = c.problems.is_empty();
        }
        "the-local-layout's-ranks-into-one-directory" => {
            for k in 0..4 {
                write_file(&s.path(&format!("node{k}/part{k}")), 30_000, &mut r);
            }
            let o = ferry_env(
                s,
                Launch::Threads(4),
                &["copy", "--id", ID, "node{rank}/part{rank}", "out/"],
                None,
                &[],
            );
            c.step("local copy", &o);
            for k in 0..4 {
                let f = format!("part{k}");
                if fs::read(s.path("out").join(&f)).ok()
                    != fs::read(s.path(&format!("node{k}/{f}"))).ok()
                {
                    c.problems.push(format!("out/{f} is wrong"));
                }
            }
            c.no_guard_left(&s.path("out"));
            c.committed = s.path("out/.ferry").join(ID).join("commit").exists();
        }
        "another-user's-.ferry-in-a-shared-directory" => {
            let shared = s.path("shared");
            fs::create_dir_all(shared.join(".ferry")).unwrap();
            fs::set_permissions(shared.join(".ferry"), fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(shared.join(".ferry"), Some(65534), Some(65534)).unwrap();
            let before = print(&shared.join(".ferry"));
            let o = s.run(&["copy", "--state-dir", "st", "one/f", "shared/"]);
            c.step("copy into a shared directory", &o);
            if fs::read(shared.join("f")).ok() != fs::read(s.path("one/f")).ok() {
                c.problems.push("shared/f is wrong".into());
            }
            if print(&shared.join(".ferry")) != before {
                c.problems.push("the other user's .ferry changed".into());
            }
            c.committed = o.status.success();
        }
        _ => unreachable!(),
    }
}

/// A failed sync (EIO) on `victim` at the `hit`th call of `point`: the run stops (`integrity`,
/// written data was lost) or the call is never reached; the resume commits the right bytes.
fn sync_eio(c: &mut Ctx, reference: &Path, point: &str, hit: u64, victim: usize) {
    let s = c.s;
    setup(s, reference);
    c.root_mtime = mtime_of(reference);
    let dst = s.path("dst");
    let fp = format!("{point}=error(EIO)@{victim}#{hit}");
    let o = c.copy(ID, &["--delete-source"], &["src"], "dst", Some(&fp));
    c.fired = Some(stderr(&o).contains(&format!("failpoint {point}: ")));
    if !dst.join(".ferry").join(ID).join("commit").exists() {
        if !s.path("src").exists() {
            c.problems.push("the source is gone, and no commit".into());
        }
        if dst.join(".ferry").join(ID).join("plan").exists() {
            c.resume_until_done(ID, &dst.join(".ferry"), 1);
        } else {
            c.copy(ID, &["--delete-source"], &["src"], "dst", None);
        }
    }
    c.check(ID, reference, &dst, &[]);
}

/// The state directory swapped for a link to another transfer's state, or its plan replaced by
/// another transfer's, while a run is held at a phase or between attempts.
fn state_swap(c: &mut Ctx, reference: &Path, case: &str) {
    let s = c.s;
    setup(s, reference);
    c.root_mtime = mtime_of(reference);
    // Another transfer, committed, whose state is the forgery.
    let mut r = Rng::new(11);
    write_file(&s.path("osrc/x"), 50_000, &mut r);
    c.copy("other", &[], &["osrc"], "odst", None);
    let other_state = s.path("odst/.ferry/other");
    let other_before = files_under(&s.path("odst"))
        .into_iter()
        .map(|p| (fs::read(&p).ok(), p))
        .collect::<Vec<_>>();
    let dst = s.path("dst");
    let mine = dst.join(".ferry").join(ID);
    let swap = |mine: &Path| {
        fs::rename(mine, mine.with_extension("moved")).unwrap();
        symlink(&other_state, mine).unwrap();
    };
    match case {
        "dir-swapped-while-held-at-the-first-unit" | "dir-swapped-while-held-at-the-decision" => {
            let fp = if case.ends_with("first-unit") {
                "copy::unit_start=pause@0"
            } else {
                "commit::decision_written=pause@0"
            };
            let child = c.copy_paused(ID, &["src"], "dst", fp);
            swap(&mine);
            let code = c.release("held copy", child);
            if code != 0 {
                c.problems
                    .push(format!("the held run did not finish its own copy ({code})"));
            }
            // Its own state went with it: look there.
            fs::remove_file(&mine).unwrap();
            fs::rename(mine.with_extension("moved"), &mine).unwrap();
        }
        "dir-swapped-between-attempts" => {
            c.copy(ID, &[], &["src"], "dst", Some("journal::synced=exit#1"));
            swap(&mine);
            if c.resume(ID, &dst.join(".ferry"), &[]) == 0 {
                c.problems.push("a resume through a link succeeded".into());
            }
            fs::remove_file(&mine).unwrap();
            fs::rename(mine.with_extension("moved"), &mine).unwrap();
            c.resume_until_done(ID, &dst.join(".ferry"), 1);
        }
        "plan-replaced-between-attempts" => {
            c.copy(ID, &[], &["src"], "dst", Some("journal::synced=exit#1"));
            let plan = mine.join("plan");
            let own = fs::read(&plan).unwrap();
            fs::copy(other_state.join("plan"), &plan).unwrap();
            if c.resume(ID, &dst.join(".ferry"), &[]) == 0 {
                c.problems
                    .push("a resume with another transfer's plan succeeded".into());
            }
            fs::write(&plan, own).unwrap();
            c.resume_until_done(ID, &dst.join(".ferry"), 1);
        }
        _ => unreachable!(),
    }
    let other_after = files_under(&s.path("odst"))
        .into_iter()
        .map(|p| (fs::read(&p).ok(), p))
        .collect::<Vec<_>>();
    // The other transfer's lock files may be rewritten by a resume that only looked; its data
    // and records must not change.
    let data = |v: &[(Option<Vec<u8>>, PathBuf)]| {
        v.iter()
            .filter(|(_, p)| !p.ends_with("lock") && !p.ends_with("members"))
            .cloned()
            .collect::<Vec<_>>()
    };
    if data(&other_before) != data(&other_after) {
        c.problems.push("the other transfer's files changed".into());
    }
    c.check(ID, &s.path("src"), &dst, &[]);
}

/// A `--verify` resume that finds a damaged temporary, before or after the decision, then a
/// plain resume. With `--delete-source`: the source must outlive the damage.
fn verify_fails(c: &mut Ctx, reference: &Path, after_decision: bool) {
    let s = c.s;
    setup(s, reference);
    c.root_mtime = mtime_of(reference);
    let dst = s.path("dst");
    let state = dst.join(".ferry");
    let fp = if after_decision {
        "commit::decision_written=exit"
    } else {
        "copy::all_done=exit"
    };
    c.copy(ID, &["--delete-source"], &["src"], "dst", Some(fp));
    let mut temps: Vec<PathBuf> = temps_in(&dst)
        .into_iter()
        .filter(|t| fs::metadata(t).map(|m| m.len() > 0).unwrap_or(false))
        .collect();
    temps.sort();
    let Some(t) = temps.first() else {
        c.problems.push("no temporary to damage".into());
        return;
    };
    let mut b = fs::read(t).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    let f = fs::OpenOptions::new().write(true).open(t).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &b[mid..mid + 1], mid as u64).unwrap();
    let st = state.to_str().unwrap().to_string();
    let o = ferry_env(
        s,
        c.launch(),
        &["resume", ID, "--state-dir", &st, "--verify"],
        None,
        &[],
    );
    if c.step("resume --verify", &o) != 8 {
        c.problems.push(format!(
            "a --verify resume over damaged {} did not fail with integrity: exit {:?}: {}",
            t.display(),
            o.status.code(),
            stderr(&o)
                .lines()
                .rfind(|l| !l.starts_with("failpoint "))
                .unwrap_or_default()
        ));
    }
    if !s.path("src").exists() {
        c.problems
            .push("the source is gone after a failed verify".into());
    }
    c.resume_until_done(ID, &state, 1);
    c.check(ID, reference, &dst, &[]);
}

/// What a cell does, given its context and the reference tree.
type CellFn = Box<dyn Fn(&mut Ctx, &Path)>;

struct HCell {
    name: String,
    ranks: usize,
    must_survive: bool,
    /// Its failpoint may not be reached in a given run (see the sync cells).
    may_miss: bool,
    run: CellFn,
}

/// Every cell; `counts` are how often each failpoint is passed on each rank of an undisturbed
/// copy on 1 and 4 ranks (the fewest and the most of three runs).
fn cells(counts: &BTreeMap<(usize, String, usize), (u64, u64)>) -> Vec<HCell> {
    let mut v: Vec<HCell> = Vec::new();
    let mut extra: Vec<HCell> = Vec::new();
    let mut add = |name: String, ranks: usize, must: bool, run: CellFn| {
        v.push(HCell {
            name,
            ranks,
            must_survive: must,
            may_miss: false,
            run,
        })
    };
    for kind in FOREIGN {
        add(
            format!("foreign {kind} at a temporary name, before the run"),
            1,
            true,
            Box::new(move |c, r| foreign(c, r, kind, false)),
        );
        for ranks in [1, 4] {
            add(
                format!("foreign {kind} at a temporary name, between attempts"),
                ranks,
                true,
                Box::new(move |c, r| foreign(c, r, kind, true)),
            );
        }
    }
    for when in [
        "before-the-run",
        "after-the-decision",
        "after-some-renames",
        "after-some-renames-verify",
    ] {
        for ranks in [1, 4] {
            add(
                format!("stale same-size final, {when}"),
                ranks,
                true,
                Box::new(move |c, r| stale(c, r, when)),
            );
        }
    }
    for how in ["replaced", "rewritten-in-place", "truncated", "grown"] {
        for when in ["between-attempts", "during-a-unit", "after-the-decision"] {
            // A same-size change before the decision is copied from its new version; a size
            // change cannot be (the plan's units are of the old size): integrity.
            let must = !(matches!(how, "truncated" | "grown") && when != "after-the-decision");
            for ranks in [1, 4] {
                add(
                    format!("source {how}, {when}"),
                    ranks,
                    must,
                    Box::new(move |c, r| source(c, r, how, when)),
                );
            }
        }
    }
    for case in [
        "at-once-other-name",
        "at-once-same-name",
        "killed-a-then-b-other-name",
        "killed-b-then-a-other-name",
        "killed-a-then-b-same-name",
        "killed-b-then-a-same-name",
    ] {
        add(
            format!("two transfers in one directory, {case}"),
            1,
            true,
            Box::new(move |c, _| two(c, case)),
        );
    }
    // Each sync on each rank that makes that call in a copy: its first and its middle call
    // (the counts of an undisturbed copy); a rank that never makes it cannot fail there.
    for point in [
        "fsio::sync_data",
        "fsio::sync_all",
        "fsio::syncfs",
        "fsio::fsync_dir",
    ] {
        for ranks in [1, 4] {
            for victim in 0..ranks {
                let Some(&(calls, most)) = counts.get(&(ranks, point.to_string(), victim)) else {
                    continue;
                };
                let mut hits = vec![1, calls.div_ceil(2)];
                hits.dedup();
                for hit in hits {
                    let mut cell = HCell {
                        name: format!("{point} EIO, call {hit} of {calls}, rank {victim}"),
                        ranks,
                        must_survive: true,
                        // A count that differs between runs (which rank makes a shared
                        // directory first) may fall short of this call: then the cell is
                        // `not-reached`, never counted as survived.
                        may_miss: calls != most,
                        run: Box::new(move |c, r| sync_eio(c, r, point, hit, victim)),
                    };
                    if cell.may_miss {
                        cell.name.push_str(&format!(" (of {calls}-{most})"));
                    }
                    extra.push(cell);
                }
            }
        }
    }
    for case in [
        "dir-swapped-while-held-at-the-first-unit",
        "dir-swapped-while-held-at-the-decision",
        "dir-swapped-between-attempts",
        "plan-replaced-between-attempts",
    ] {
        add(
            format!("state {case}"),
            1,
            true,
            Box::new(move |c, r| state_swap(c, r, case)),
        );
    }
    for case in [
        "nested-and-enclosing-while-a-tree-runs",
        "a-linked-destination",
        "many-runs-of-other-names-at-once-in-one-directory",
        "the-local-layout's-ranks-into-one-directory",
        "another-user's-.ferry-in-a-shared-directory",
    ] {
        add(
            format!("locks {case}"),
            1,
            true,
            Box::new(move |c, r| locks(c, r, case)),
        );
    }
    for after in [false, true] {
        for ranks in [1, 4] {
            add(
                format!(
                    "--verify fails {} the decision, then resume",
                    if after { "after" } else { "before" }
                ),
                ranks,
                true,
                Box::new(move |c, r| verify_fails(c, r, after)),
            );
        }
    }
    v.extend(extra);
    v
}

#[test]
fn hostile_matrix() {
    let out_path = std::env::var_os("FERRY_HOSTILE_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/hostile-matrix.jsonl")
        });
    let mut out = fs::File::create(&out_path).unwrap();
    let only = std::env::var("FERRY_HOSTILE_ONLY").ok();
    let t0 = Instant::now();
    let base = Scratch::new();
    let reference = base.path("reference");
    make_sources(&reference);
    // How often each rank passes each failpoint, the fewest of three undisturbed copies: some
    // counts depend on timing (which rank makes a shared directory first fsyncs its parent), and
    // a cell's call must be one every run makes.
    let mut counts: BTreeMap<(usize, String, usize), (u64, u64)> = BTreeMap::new();
    let mut seen: BTreeMap<(usize, String, usize), u32> = BTreeMap::new();
    for ranks in [1, 1, 1, 4, 4, 4] {
        let s = Scratch::new();
        setup(&s, &reference);
        let args = [
            "copy",
            "--chunk-size",
            "16K",
            "--threads",
            "1",
            "--delete-source",
            "src",
            "dst",
        ];
        let o = ferry_env(&s, Launch::Threads(ranks), &args, None, &[]);
        assert!(o.status.success(), "probe: {}", stderr(&o));
        for ((point, rank), n) in hit_counts(&o) {
            let c = counts.entry((ranks, point.clone(), rank)).or_insert((n, n));
            *c = (c.0.min(n), c.1.max(n));
            *seen.entry((ranks, point, rank)).or_insert(0) += 1;
        }
    }
    // A call some run did not make at all has no cell.
    counts.retain(|k, _| seen.get(k) == Some(&3));
    let (mut cells_run, mut survived, mut safe_fail, mut violations) = (0, 0, 0, 0);
    let mut not_reached = 0;
    for cell in cells(&counts) {
        if only.as_deref().is_some_and(|o| !cell.name.contains(o)) {
            continue;
        }
        let t = Instant::now();
        let s = Scratch::new();
        let mut c = Ctx::new(&s, cell.ranks);
        (cell.run)(&mut c, &reference);
        let (outcome, detail) = c.outcome(cell.must_survive, cell.may_miss);
        cells_run += 1;
        match outcome {
            "survived" => survived += 1,
            "safe-fail" => safe_fail += 1,
            "not-reached" => not_reached += 1,
            _ => violations += 1,
        }
        let line = serde_json::json!({
            "cell": cell.name, "ranks": cell.ranks, "outcome": outcome,
            "must_survive": cell.must_survive, "clear_errors": c.clean_errors, "fired": c.fired,
            "seconds": (t.elapsed().as_secs_f64() * 100.0).round() / 100.0, "detail": detail,
        });
        writeln!(out, "{line}").unwrap();
        if outcome == "violation" {
            eprintln!("VIOLATION {line}");
        }
    }
    println!(
        "hostile cells: {cells_run}, survived: {survived}, safe-fail: {safe_fail}, not reached: \
         {not_reached}, violations: {violations}; {:.0} s; cells in {}",
        t0.elapsed().as_secs_f64(),
        out_path.display()
    );
    assert_eq!(violations, 0, "see {}", out_path.display());
}
