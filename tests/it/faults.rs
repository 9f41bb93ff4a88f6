//! Real faults, not injected ones: permission denied for an unprivileged user, a full
//! destination, a read-only destination, a file-size limit. Each run stops with the class of the
//! brief naming the path, loses nothing, and resumes to an identical copy once the cause is fixed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::util::*;

/// A scratch directory in /tmp that the unprivileged user `nobody` can reach, with a copy of the
/// ferry binary (the build tree may sit in a directory only root can enter).
struct Nobody {
    dir: tempfile::TempDir,
}

impl Nobody {
    fn new() -> Nobody {
        let dir = tempfile::Builder::new()
            .prefix("ferry-nobody-")
            .tempdir_in("/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::copy(env!("CARGO_BIN_EXE_ferry"), dir.path().join("ferry")).unwrap();
        for d in ["pub", "pub/home"] {
            fs::create_dir(dir.path().join(d)).unwrap();
            fs::set_permissions(dir.path().join(d), fs::Permissions::from_mode(0o777)).unwrap();
        }
        Nobody { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Run ferry as `nobody` (uid/gid 65534, no supplementary groups), in `pub/`.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(self.path("ferry"))
            .args(args)
            .env("FERRY_HOME", self.path("pub/home"))
            .env_remove("FERRY_FAILPOINTS")
            .current_dir(self.path("pub"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A root-owned source tree (mode 0755 directories, 0644 files).
    fn source(&self) -> PathBuf {
        let src = self.path("src");
        let mut r = Rng::new(21);
        for (name, size) in [("a", 300_000u64), ("sub/b", 5_000), ("sub/secret", 70_000)] {
            write_file(&src.join(name), size, &mut r);
            fs::set_permissions(src.join(name), fs::Permissions::from_mode(0o644)).unwrap();
        }
        for d in ["", "sub"] {
            fs::set_permissions(src.join(d), fs::Permissions::from_mode(0o755)).unwrap();
        }
        src
    }
}

fn state_of(state_dir: &Path, id: &str) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["status", id, "--json", "--state-dir"])
        .arg(state_dir)
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)))
}

#[test]
fn permission_denied_as_an_unprivileged_user_names_the_path_and_resumes_once_fixed() {
    let n = Nobody::new();
    let src = n.source();
    // An unreadable source file.
    fs::set_permissions(src.join("sub/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let o = n.run(&["copy", "--id", "p1", "../src", "dst"]);
    expect_code(&o, 6);
    let (line, class) = error_line(&o);
    assert_eq!(class, "permission", "{line}");
    assert!(
        line.contains("sub/secret") && line.contains("errno 13"),
        "{line}"
    );
    assert!(!n.path("pub/dst/sub/secret").exists());
    let st = state_of(&n.path("pub/dst/.ferry"), "p1");
    assert_eq!(st["state"], "failed");
    assert_eq!(st["error"]["class"], "permission");
    fs::set_permissions(src.join("sub/secret"), fs::Permissions::from_mode(0o644)).unwrap();
    expect_code(&n.run(&["resume", "p1"]), 0);
    // The mode is the one planned (0600); the bytes are the source's.
    let md = fs::metadata(n.path("pub/dst/sub/secret")).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    fs::set_permissions(src.join("sub/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_same_tree(&src, &n.path("pub/dst"));
    fs::set_permissions(src.join("sub/secret"), fs::Permissions::from_mode(0o644)).unwrap();

    // A destination directory the user may not write into.
    let locked = n.path("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    let o = n.run(&[
        "copy",
        "--id",
        "p2",
        "--state-dir",
        "st",
        "../src",
        "../locked/dst",
    ]);
    expect_code(&o, 6);
    let (line, class) = error_line(&o);
    assert_eq!(class, "permission", "{line}");
    assert!(line.contains("locked/dst"), "{line}");
    assert_eq!(state_of(&n.path("pub/st"), "p2")["state"], "failed");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o777)).unwrap();
    expect_code(&n.run(&["resume", "p2"]), 0);
    assert_same_tree(&src, &locked.join("dst"));

    // A state directory the user may not create: nothing is made anywhere.
    let o = n.run(&["copy", "--state-dir", "../locked2/st", "../src", "dst3"]);
    expect_code(&o, 6);
    let (line, class) = error_line(&o);
    assert_eq!(class, "permission", "{line}");
    assert!(line.contains("locked2"), "{line}");
    assert!(!n.path("pub/dst3").exists());
}

#[test]
fn a_full_destination_stops_with_resource_loses_nothing_and_resumes_once_space_is_freed() {
    let s = Scratch::new();
    let src = s.path("src");
    let mut r = Rng::new(8);
    for i in 0..3 {
        write_file(&src.join(format!("f{i}")), 2 << 20, &mut r);
    }
    let before = diff_trees(&src, &src);
    assert!(before.is_empty());
    let Some(fs_) = Tmpfs::mount(&s.path("full"), "size=4m") else {
        panic!("mounting a tmpfs is not permitted here: the full-destination case cannot run");
    };
    // The state lives on the full tier too (DST/.ferry), as it does by default.
    let o = s.run(&["copy", "--id", "full", "src", "full/dst"]);
    expect_code(&o, 5);
    let (line, class) = error_line(&o);
    assert_eq!(class, "resource", "{line}");
    assert!(
        line.contains("full/dst") && line.contains("errno 28"),
        "{line}"
    );
    assert!(stderr(&o).contains("ferry resume full"), "{}", stderr(&o));
    assert_no_torn_finals(&src, &s.path("full/dst"));
    assert!(!s.path("full/dst/.ferry/full/commit").exists());
    let st = status(&s, "full", &s.path("full/dst/.ferry"));
    assert!(
        st["state"] == "failed" || st["state"] == "interrupted",
        "{st}"
    );
    fs_.remount("size=64m");
    let o = s.run(&["resume", "full", "--json"]);
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(sum["bytes_reused"].as_u64().unwrap() > 0, "{sum}");
    assert_same_tree(&src, &s.path("full/dst"));
}

#[test]
fn large_files_copy_identically_across_file_systems_and_without_copy_file_range() {
    // copy_file_range fails with EXDEV between file systems (here a tmpfs source and the scratch
    // disk): ferry falls back to read and write. FERRY_NO_COPY_FILE_RANGE forces the fallback.
    let s = Scratch::new();
    let Some(_fs) = Tmpfs::mount(&s.path("mem"), "size=64m") else {
        panic!("mounting a tmpfs is not permitted here: the cross-file-system case cannot run");
    };
    let mut r = Rng::new(12);
    write_file(&s.path("mem/src/a"), (20 << 20) + 7, &mut r);
    write_file(&s.path("mem/src/b"), 9 << 20, &mut r);
    expect_code(
        &s.run(&["copy", "--chunk-size", "8MiB", "mem/src", "dst1"]),
        0,
    );
    assert_same_tree(&s.path("mem/src"), &s.path("dst1"));
    // The other way (disk to disk, same file system) without copy_file_range.
    let o = s
        .ferry()
        .env("FERRY_NO_COPY_FILE_RANGE", "1")
        .args(["copy", "--chunk-size", "8MiB", "dst1", "dst2"])
        .output()
        .unwrap();
    expect_code(&o, 0);
    assert_same_tree(&s.path("mem/src"), &s.path("dst2"));
    let id = id_of(&o);
    expect_code(&s.run(&["verify", &id]), 0);
}

#[test]
fn a_file_size_limit_is_a_resource_error_not_a_silent_death() {
    let s = Scratch::new();
    let src = s.path("src");
    let mut r = Rng::new(9);
    write_file(&src.join("small"), 100_000, &mut r);
    write_file(&src.join("big"), 3 << 20, &mut r);
    // Above the small-unit size: copied with copy_file_range, whose EFBIG must name the file too.
    write_file(&src.join("huge"), 12 << 20, &mut r);
    let mut c = s.ferry();
    c.args(["copy", "--id", "fsize", "src", "dst"]);
    // SAFETY: setrlimit(2) in the child before exec; no allocation, no locks.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().unwrap();
    expect_code(&o, 5);
    let (line, class) = error_line(&o);
    assert_eq!(class, "resource", "{line}");
    assert!(line.contains("errno 27"), "EFBIG: {line}");
    assert_no_torn_finals(&src, &s.path("dst"));
    expect_code(&s.run(&["resume", "fsize"]), 0);
    assert_same_tree(&src, &s.path("dst"));
}

#[test]
fn a_read_only_destination_is_a_permission_error_and_resumes_once_writable() {
    let s = Scratch::new();
    let src = s.path("src");
    let mut r = Rng::new(10);
    write_file(&src.join("a"), 500_000, &mut r);
    write_file(&src.join("d/b"), 1000, &mut r);
    let Some(ro) = Tmpfs::mount(&s.path("ro"), "size=16m") else {
        panic!("mounting a tmpfs is not permitted here: the read-only case cannot run");
    };
    ro.remount("ro");
    let o = s.run(&["copy", "--id", "ro", "--state-dir", "st", "src", "ro/dst"]);
    expect_code(&o, 6);
    let (line, class) = error_line(&o);
    assert_eq!(class, "permission", "{line}");
    assert!(
        line.contains("ro/dst") && line.contains("errno 30"),
        "{line}"
    );
    ro.remount("rw");
    expect_code(&s.run(&["resume", "ro"]), 0);
    assert_same_tree(&src, &s.path("ro/dst"));
}

/// An unprivileged user's run stopped after its temporaries got their final mode (0444, read
/// only) but before their renames: the resume opens ferry's own read-only temporaries (to check
/// them and set their metadata) and commits. It used to open them for writing, get EACCES, and
/// refuse them as foreign files on every resume.
#[cfg(feature = "failpoints")]
#[test]
fn a_resume_commits_an_unprivileged_users_read_only_temporaries() {
    let s = Nobody::new();
    let src = s.path("pub/src");
    let mut r = Rng::new(5);
    for (name, size) in [("ro.dat", 300_000u64), ("small.txt", 100)] {
        write_file(&src.join(name), size, &mut r);
        fs::set_permissions(src.join(name), fs::Permissions::from_mode(0o444)).unwrap();
        std::os::unix::fs::chown(src.join(name), Some(65534), Some(65534)).unwrap();
    }
    std::os::unix::fs::chown(&src, Some(65534), Some(65534)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(s.path("ferry"))
        .args(["copy", "--id", "ro", "src", "out"])
        .env("FERRY_HOME", s.path("pub/home"))
        .env("FERRY_FAILPOINTS", "commit::file_finished=exit")
        .current_dir(s.path("pub"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(ferry::failpoints::EXIT_CODE),
        "{}",
        stderr(&o)
    );
    let staged: Vec<PathBuf> = temps_in(&s.path("pub/out"));
    assert!(
        staged
            .iter()
            .any(|t| fs::metadata(t).unwrap().permissions().mode() & 0o777 == 0o444),
        "a temporary with its final, read-only mode: {staged:?}"
    );
    let o = s.run(&["resume", "ro", "--state-dir", "out/.ferry"]);
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("pub/out"));
}
