//! Helpers: a seeded tree generator, a tree comparator (the oracle), and a way to run the real
//! `ferry` binary with an isolated registry.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A small, seeded PRNG (xorshift64*), so every tree can be made again.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Write a file of `size` seeded bytes.
pub fn write_file(path: &Path, size: u64, rng: &mut Rng) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    let mut f = fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        std::io::Write::write_all(&mut f, &buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// Set a path's mtime (not following symlinks).
pub fn set_mtime(path: &Path, secs: i64) {
    ferry::fsio::set_times_nofollow(path, (secs, 123_456_789)).unwrap();
}

/// The awkward tree of the issue: files of 0, 1, chunk-1, chunk, chunk+1 bytes and a larger one,
/// nested and empty directories, symlinks (also dangling), names with spaces, UTF-8 and non-UTF-8
/// bytes, unusual modes and old mtimes.
pub fn awkward_tree(root: &Path, chunk: u64, big: u64, seed: u64) {
    let mut r = Rng::new(seed);
    fs::create_dir_all(root).unwrap();
    let sizes = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 17, big];
    for (i, s) in sizes.iter().enumerate() {
        write_file(&root.join(format!("f{i}_{s}")), *s, &mut r);
    }
    write_file(
        &root.join("deep/er/still deeper/file with spaces.dat"),
        chunk + 5,
        &mut r,
    );
    write_file(&root.join("deep/ünïcødé 名前.bin"), 777, &mut r);
    let raw = OsString::from_vec(vec![b'r', b'a', b'w', 0xff, 0xfe, b'.', b'b']);
    write_file(&root.join("deep").join(&raw), 4096, &mut r);
    fs::create_dir_all(root.join("empty dir")).unwrap();
    fs::create_dir_all(root.join("deep/er/empty")).unwrap();
    std::os::unix::fs::symlink("f1_1", root.join("link to f1")).unwrap();
    std::os::unix::fs::symlink("../no/such/target", root.join("deep/dangling")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("absolute link")).unwrap();
    let ro = root.join("read only.txt");
    write_file(&ro, 100, &mut r);
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o444)).unwrap();
    let ex = root.join("deep/run.sh");
    write_file(&ex, 10, &mut r);
    fs::set_permissions(&ex, fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("deep/er"), fs::Permissions::from_mode(0o705)).unwrap();
    set_mtime(&root.join("f1_1"), 1_000_000_000);
    set_mtime(&root.join("deep/er"), 1_100_000_000);
    set_mtime(&root.join("link to f1"), 1_200_000_000);
}

/// `files` seeded files `d{i % dirs}/f{i}` under `root`, file i of `base + i * step` bytes.
pub fn numbered_files(root: &Path, files: u64, dirs: u64, base: u64, step: u64, rng: &mut Rng) {
    for i in 0..files {
        write_file(
            &root.join(format!("d{}/f{i}", i % dirs)),
            base + i * step,
            rng,
        );
    }
}

/// Many small files in a few directories.
pub fn small_files(root: &Path, dirs: usize, per_dir: usize, size: u64, seed: u64) {
    let mut r = Rng::new(seed);
    for d in 0..dirs {
        for f in 0..per_dir {
            let s = if size == 0 { 0 } else { 1 + r.below(size) };
            write_file(&root.join(format!("d{d:03}/f{f:04}")), s, &mut r);
        }
    }
}

#[derive(Debug, PartialEq)]
enum Node {
    Dir {
        mode: u32,
        mtime: i64,
    },
    File {
        mode: u32,
        mtime: (i64, i64),
        data: Vec<u8>,
    },
    Link {
        target: PathBuf,
    },
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<(Vec<u8>, Node)>, top: bool) {
    let p = root.join(rel);
    let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let key = rel.as_os_str().as_bytes().to_vec();
    if md.file_type().is_symlink() {
        out.push((
            key,
            Node::Link {
                target: fs::read_link(&p).unwrap(),
            },
        ));
    } else if md.is_file() {
        out.push((
            key,
            Node::File {
                mode: md.mode() & 0o7777,
                mtime: (md.mtime(), md.mtime_nsec()),
                data: fs::read(&p).unwrap(),
            },
        ));
    } else if md.is_dir() {
        if !top {
            out.push((
                key,
                Node::Dir {
                    mode: md.mode() & 0o7777,
                    mtime: md.mtime(),
                },
            ));
        }
        let mut names: Vec<OsString> = fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            if top && n == ".ferry" {
                continue;
            }
            collect(root, &rel.join(&n), out, false);
        }
    }
}

/// Differences between two trees (contents, symlink targets, modes, file mtimes, directory modes
/// and mtimes), ignoring a top-level `.ferry`. Empty means identical.
pub fn diff_trees(a: &Path, b: &Path) -> Vec<String> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    collect(a, Path::new(""), &mut x, true);
    collect(b, Path::new(""), &mut y, true);
    let mut out = Vec::new();
    let xs: std::collections::BTreeMap<_, _> = x.into_iter().collect();
    let ys: std::collections::BTreeMap<_, _> = y.into_iter().collect();
    for (k, v) in &xs {
        let name = String::from_utf8_lossy(k);
        match ys.get(k) {
            None => out.push(format!("missing in destination: {name}")),
            Some(w) if w != v => out.push(format!("differs: {name}: {}", describe(v, w))),
            _ => {}
        }
    }
    for k in ys.keys() {
        if !xs.contains_key(k) {
            out.push(format!(
                "extra in destination: {}",
                String::from_utf8_lossy(k)
            ));
        }
    }
    out
}

fn describe(a: &Node, b: &Node) -> String {
    match (a, b) {
        (
            Node::File {
                mode: m1,
                mtime: t1,
                data: d1,
            },
            Node::File {
                mode: m2,
                mtime: t2,
                data: d2,
            },
        ) => {
            format!(
                "mode {m1:o}/{m2:o} mtime {t1:?}/{t2:?} size {}/{} same-bytes {}",
                d1.len(),
                d2.len(),
                d1 == d2
            )
        }
        _ => format!("{a:?} vs {b:?}").chars().take(300).collect(),
    }
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    let d = diff_trees(a, b);
    assert!(d.is_empty(), "trees differ:\n{}", d.join("\n"));
}

/// A scratch directory with its own ferry registry (FERRY_HOME), so tests never see each other.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let base = std::env::var_os("FERRY_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&base).unwrap();
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("ferry-it-")
                .tempdir_in(base)
                .unwrap(),
        }
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn home(&self) -> PathBuf {
        self.path("home")
    }
    /// The ferry binary with this scratch's registry.
    pub fn ferry(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env("FERRY_HOME", self.home())
            .env_remove("FERRY_FAILPOINTS")
            .env_remove("FERRY_STATE_DIR")
            .env("FERRY_FAILPOINTS_GATE", self.path("gate"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        c
    }
    /// Run ferry with `args`, returning its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.ferry().args(args).output().unwrap()
    }
    /// Open the gate of a paused failpoint.
    pub fn release(&self) {
        let _ = fs::remove_file(self.path("gate.paused"));
        fs::write(self.path("gate"), b"go").unwrap();
    }
    /// Wait until a `pause` failpoint was reached (it leaves `gate.paused`).
    pub fn wait_paused(&self, child: &mut Child) {
        wait_for(Duration::from_secs(60), || {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("ferry exited ({s}) before reaching its pause failpoint");
            }
            self.path("gate.paused").exists()
        });
    }
}

/// `mpirun -n N ferry` for this scratch: Open MPI's run-as-root variables and
/// `--oversubscribe`, which the project sets so a user never has to, and the scratch's registry.
pub fn mpirun_ferry(s: &Scratch, n: usize) -> Command {
    mpirun_exe(s, n, Path::new(env!("CARGO_BIN_EXE_ferry")))
}

/// `mpirun -n N EXE` for this scratch, set up as [`mpirun_ferry`] (EXE: ferry, or a C program
/// built against ferry's libraries).
pub fn mpirun_exe(s: &Scratch, n: usize, exe: &Path) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_base_warn_component_unused", "0")
        .env("FERRY_HOME", s.home())
        .env("FERRY_TEST_TAG", s.dir.path())
        .env("FERRY_FAILPOINTS_GATE", s.path("gate"))
        .env_remove("FERRY_FAILPOINTS")
        .current_dir(s.dir.path())
        .stdin(Stdio::null())
        .args(["--oversubscribe", "--bind-to", "none", "-n", &n.to_string()])
        .arg(exe);
    c
}

/// Poll `cond` until it holds (observing, not sleeping a fixed time); panic after `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "condition not reached within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert an exit code, showing stderr when it is not.
#[track_caller]
pub fn expect_code(o: &Output, want: i32) {
    assert_eq!(
        code(o),
        want,
        "exit code; stderr:\n{}\nstdout:\n{}",
        stderr(o),
        stdout(o)
    );
}

/// The first line of stdout: the transfer id.
pub fn id_of(o: &Output) -> String {
    stdout(o)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `ferry status --json` parsed.
pub fn status(s: &Scratch, id: &str, state_dir: &Path) -> serde_json::Value {
    let o = s.run(&[
        "status",
        id,
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--json",
    ]);
    expect_code(&o, 0);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Files at a final name in `dst` (ignoring ferry's temporaries and state) that are not complete
/// and byte-identical to their source in `src`: invariant 2 says there are none.
pub fn torn_finals(src: &Path, dst: &Path) -> Vec<String> {
    fn walk(src: &Path, dst: &Path, rel: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dst.join(rel)) else {
            return;
        };
        for e in rd {
            let Ok(e) = e else { continue };
            let name = e.file_name();
            let nb = name.as_bytes();
            if rel.as_os_str().is_empty() && nb == b".ferry" {
                continue;
            }
            if nb.starts_with(b".ferry-") && nb.ends_with(b".tmp") {
                continue;
            }
            let r = rel.join(&name);
            let Ok(md) = fs::symlink_metadata(dst.join(&r)) else {
                continue;
            };
            if md.is_dir() {
                walk(src, dst, &r, out);
            } else if md.is_file() {
                let want = fs::read(src.join(&r)).unwrap_or_default();
                let got = fs::read(dst.join(&r)).unwrap_or_default();
                if want != got {
                    out.push(format!(
                        "torn or wrong file at a final name: {} ({} of {} bytes)",
                        r.display(),
                        got.len(),
                        want.len()
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(src, dst, Path::new(""), &mut out);
    out
}

/// Invariant 2, asserted.
#[track_caller]
pub fn assert_no_torn_finals(src: &Path, dst: &Path) {
    let t = torn_finals(src, dst);
    assert!(t.is_empty(), "{}", t.join("\n"));
}

/// Temporary files ferry left in a tree.
pub fn temps_in(dst: &Path) -> Vec<PathBuf> {
    files_under(dst)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().as_bytes();
            n.starts_with(b".ferry-") && n.ends_with(b".tmp")
        })
        .collect()
}

/// Every non-directory under `dir`, at any depth (none if `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

static CHILDREN: std::sync::Mutex<Vec<(std::thread::ThreadId, u32)>> =
    std::sync::Mutex::new(Vec::new());

/// Spawn and remember the child: if the test panics, every ferry, mpirun or srun it started that
/// is still running is stopped, so a failed test never leaves a paused run behind.
pub trait SpawnTracked {
    fn spawn_tracked(&mut self) -> Child;
}

impl SpawnTracked for Command {
    fn spawn_tracked(&mut self) -> Child {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default(info);
                // Only the panicking test's children: the tests running beside it go on.
                let me = std::thread::current().id();
                let pids: Vec<u32> = CHILDREN
                    .lock()
                    .map(|v| v.iter().filter(|c| c.0 == me).map(|c| c.1).collect())
                    .unwrap_or_default();
                for pid in pids {
                    let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let cmd = String::from_utf8_lossy(&cmd);
                    // A launcher passes SIGTERM on to its ranks; ferry itself gets SIGKILL, since
                    // a run paused at a failpoint cannot finish the graceful stop SIGTERM asks for.
                    let sig = if cmd.contains("mpirun") || cmd.contains("srun") {
                        libc::SIGTERM
                    } else if cmd.contains("ferry") {
                        libc::SIGKILL
                    } else {
                        continue;
                    };
                    // SAFETY: kill(2) on a pid we spawned; at worst it is already gone.
                    unsafe { libc::kill(pid as i32, sig) };
                }
            }));
        });
        let child = self.spawn().unwrap();
        CHILDREN
            .lock()
            .unwrap()
            .push((std::thread::current().id(), child.id()));
        child
    }
}

/// Read the first line a spawned ferry prints (the transfer id).
pub fn read_id(child: &mut Child) -> String {
    use std::io::{BufRead, BufReader};
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    let id = line.trim().to_string();
    assert!(!id.is_empty(), "no transfer id printed");
    id
}

/// A source file taken away and put back as it was (content, mtime, and its directory's mtime),
/// the way a user restores a file a transfer could not find.
pub struct Vanished {
    path: PathBuf,
    data: Vec<u8>,
    mtime: std::time::SystemTime,
    dir_mtime: (i64, u32),
}

impl Vanished {
    pub fn remove(path: &Path) -> Vanished {
        let dir = path.parent().unwrap();
        let d = fs::metadata(dir).unwrap();
        let v = Vanished {
            path: path.to_path_buf(),
            data: fs::read(path).unwrap(),
            mtime: fs::metadata(path).unwrap().modified().unwrap(),
            dir_mtime: (d.mtime(), d.mtime_nsec() as u32),
        };
        fs::remove_file(path).unwrap();
        v
    }

    pub fn restore(self) {
        fs::write(&self.path, &self.data).unwrap();
        fs::File::options()
            .write(true)
            .open(&self.path)
            .unwrap()
            .set_modified(self.mtime)
            .unwrap();
        ferry::fsio::set_times_nofollow(self.path.parent().unwrap(), self.dir_mtime).unwrap();
    }
}

/// A tmpfs mounted for a test (real ENOSPC, real EROFS), unmounted when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs with `opts` (e.g. `size=4m`) at `dir`; `None` where mounting is not
    /// permitted (the caller then falls back to another real fault).
    pub fn mount(dir: &Path, opts: &str) -> Option<Tmpfs> {
        fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Change its options (`size=64m`, `ro`, `rw`).
    pub fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "remount {opts}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The first `ferry: error:` line of a run, and its class.
pub fn error_line(o: &Output) -> (String, String) {
    let line = stderr(o)
        .lines()
        .find(|l| l.starts_with("ferry: error:"))
        .unwrap_or_default()
        .to_string();
    let class = line
        .strip_prefix("ferry: error: ")
        .and_then(|l| l.split(':').next())
        .unwrap_or("")
        .to_string();
    (line, class)
}

/// `cp HOW FROM TO` (e.g. `-a`, `-al`) after removing TO.
pub fn cp(from: &Path, to: &Path, how: &str) {
    let _ = fs::remove_dir_all(to);
    let ok = Command::new("cp")
        .arg(how)
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp {how} {} {}", from.display(), to.display());
}

/// `cp -a FROM TO` after removing TO.
pub fn cp_a(from: &Path, to: &Path) {
    cp(from, to, "-a")
}

/// The random nonce of transfer `id`'s plan in `state_dir` (part of its temporary names).
pub fn plan_nonce(state_dir: &Path, id: &str) -> String {
    let b = fs::read(state_dir.join(id).join("plan")).unwrap();
    let body = &b[b.iter().position(|&c| c == b'\n').unwrap() + 1..];
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["nonce"].as_str().unwrap().to_string()
}

/// `ferry ARGS` with failpoints `fp`, run until a `pause` failpoint is reached (stderr piped, for
/// the caller's `wait_with_output`).
pub fn spawn_paused(s: &Scratch, fp: &str, args: &[&str]) -> Child {
    let mut c = s
        .ferry()
        .env("FERRY_FAILPOINTS", fp)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_tracked();
    s.wait_paused(&mut c);
    c
}
