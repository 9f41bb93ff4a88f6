//! Every wrong thing a user can type gets a one-line error naming the thing, the exit code of the
//! brief's table, and loses nothing.

use std::fs;

use crate::util::*;

fn first_error_line(o: &std::process::Output) -> String {
    stderr(o)
        .lines()
        .find(|l| l.starts_with("ferry: error:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn missing_source_is_not_found() {
    let s = Scratch::new();
    let o = s.run(&["copy", "no-such-dir", "dst"]);
    expect_code(&o, 7);
    assert!(
        first_error_line(&o).contains("no-such-dir"),
        "{}",
        stderr(&o)
    );
    assert!(!s.path("dst").exists(), "nothing may be created");
}

#[test]
fn destination_inside_or_equal_to_source_is_refused() {
    let s = Scratch::new();
    let mut r = Rng::new(1);
    write_file(&s.path("src/a"), 10, &mut r);
    let before = diff_trees(&s.path("src"), &s.path("src"));
    assert!(before.is_empty());
    for dst in ["src/inner", "src", "src/."] {
        let o = s.run(&["copy", "src", dst]);
        expect_code(&o, 2);
        let line = first_error_line(&o);
        assert!(line.contains("src"), "{line}");
    }
    // The source is untouched: no state, no temporaries, no new directory.
    let names: Vec<_> = fs::read_dir(s.path("src"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("a")]);
    // Destination containing the source.
    let o = s.run(&["copy", "src", "."]);
    expect_code(&o, 2);
}

#[test]
fn unknown_id_is_a_usage_error() {
    let s = Scratch::new();
    for cmd in ["resume", "status", "cancel", "verify", "forget"] {
        let o = s.run(&[
            cmd,
            "nope-123",
            "--state-dir",
            s.path("st").to_str().unwrap(),
        ]);
        expect_code(&o, 2);
        assert!(
            first_error_line(&o).contains("nope-123"),
            "{cmd}: {}",
            stderr(&o)
        );
    }
    let o = s.run(&["status", "../evil"]);
    expect_code(&o, 2);
}

#[test]
fn bad_flags_are_usage_errors() {
    let s = Scratch::new();
    let mut r = Rng::new(1);
    write_file(&s.path("src/a"), 10, &mut r);
    for args in [
        vec!["copy", "--chunk-size", "12parsecs", "src", "dst"],
        vec!["copy", "--chunk-size", "0", "src", "dst"],
        vec!["copy", "--threads", "0", "src", "dst"],
        vec!["copy", "--layout", "diagonal", "src", "dst"],
        vec!["copy", "--layout", "shared", "src{rank}", "dst"],
        vec!["copy", "--id", "a/b", "src", "dst"],
        vec!["copy", "src"],
    ] {
        let o = s.run(&args);
        expect_code(&o, 2);
    }
    assert!(!s.path("dst").exists());
}

#[test]
fn resume_of_a_committed_transfer_is_a_no_op_that_says_so() {
    let s = Scratch::new();
    let mut r = Rng::new(1);
    write_file(&s.path("src/a"), 1000, &mut r);
    let o = s.run(&["copy", "src", "dst"]);
    expect_code(&o, 0);
    let id = id_of(&o);
    let commit = s.path("dst/.ferry").join(&id).join("commit");
    let before = fs::read(&commit).unwrap();
    let o = s.run(&["resume", &id]);
    expect_code(&o, 0);
    assert!(stderr(&o).contains("already committed"), "{}", stderr(&o));
    assert_eq!(fs::read(&commit).unwrap(), before, "committed exactly once");
    // An id is never reused.
    let o = s.run(&["copy", "--id", &id, "src", "dst"]);
    expect_code(&o, 2);
    assert!(first_error_line(&o).contains(&id));
    // Cancelling a committed transfer is refused.
    let o = s.run(&["cancel", &id]);
    expect_code(&o, 2);
    assert!(first_error_line(&o).contains("committed"), "{}", stderr(&o));
}

#[test]
fn an_unreadable_plan_is_a_clear_error_never_a_fresh_start() {
    let s = Scratch::new();
    let mut r = Rng::new(1);
    write_file(&s.path("src/a"), 100_000, &mut r);
    let o = s.run(&["copy", "--id", "t1", "src", "dst"]);
    expect_code(&o, 0);
    // Make it look unfinished, then damage the plan.
    let td = s.path("dst/.ferry/t1");
    fs::remove_file(td.join("commit")).unwrap();
    let plan = td.join("plan");
    let mut b = fs::read(&plan).unwrap();
    let n = b.len();
    b[n - 10] ^= 0x40;
    fs::write(&plan, &b).unwrap();
    let dst_before = fs::read(s.path("dst/a")).unwrap();
    let o = s.run(&["resume", "t1"]);
    expect_code(&o, 8);
    let line = first_error_line(&o);
    assert!(
        line.contains("integrity") && line.contains("plan"),
        "{line}"
    );
    assert_eq!(fs::read(s.path("dst/a")).unwrap(), dst_before);
    let st = status(&s, "t1", &s.path("dst/.ferry"));
    assert_eq!(st["state"], "unknown");
    assert_eq!(st["error"]["class"], "integrity");
    // A plan that is gone altogether is just as clear.
    fs::remove_file(&plan).unwrap();
    let o = s.run(&["resume", "t1"]);
    assert_ne!(code(&o), 0);
    assert!(first_error_line(&o).contains("plan"), "{}", stderr(&o));
}

#[test]
fn a_directory_onto_an_existing_file_is_refused_before_anything_is_made() {
    let s = Scratch::new();
    let mut r = Rng::new(1);
    write_file(&s.path("src/a"), 10, &mut r);
    fs::write(s.path("taken"), b"a file").unwrap();
    let o = s.run(&["copy", "src", "taken"]);
    expect_code(&o, 2);
    assert!(
        first_error_line(&o).contains("not a directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(s.path("taken")).unwrap(), b"a file");
}

/// Everything under `root` (but ferry's state directories), with each file's content hash, size,
/// mode and mtime, and each symlink's target: two snapshots are equal only if nothing changed.
fn snapshot(root: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let what = if md.is_dir() {
                if p.file_name() == Some(std::ffi::OsStr::new(".ferry")) {
                    continue;
                }
                stack.push(p.clone());
                "dir".to_string()
            } else if md.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(&p).unwrap())
            } else if md.is_file() {
                format!("file {:08x}", crc32fast::hash(&fs::read(&p).unwrap()))
            } else {
                "special".to_string()
            };
            out.insert(
                p,
                format!("{what} {} {:o} {}", md.size(), md.mode(), md.mtime()),
            );
        }
    }
    out
}

/// One wrong thing to do: `setup` prepares it in a scratch holding `src/` and `done/` (a
/// committed copy of `src/` by transfer `base`) and returns the arguments; ferry must exit with
/// `code`, name `class` and mention `names` in its error line, and change nothing.
struct Case {
    what: &'static str,
    setup: fn(&Scratch) -> Vec<String>,
    code: i32,
    class: &'static str,
    names: &'static str,
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Rewrite a framed state file's body (and its frame) with `f`.
fn reframe(path: &std::path::Path, kind: &str, version: &str, f: impl Fn(String) -> String) {
    let bytes = fs::read(path).unwrap();
    let body = ferry::state::unframe(kind, &bytes, path).unwrap();
    let body = f(String::from_utf8(body.to_vec()).unwrap());
    let mut framed = ferry::state::frame(kind, body.as_bytes());
    let nl = framed.iter().position(|&b| b == b'\n').unwrap();
    let header = String::from_utf8(framed[..nl].to_vec()).unwrap();
    let header = header.replacen(" 1 ", &format!(" {version} "), 1);
    framed.splice(..nl, header.into_bytes());
    fs::write(path, framed).unwrap();
}

/// A transfer `half` that looks interrupted before its commit decision (its decision and commit
/// records removed; the destination files are there, as after a crash during the renames).
fn interrupted(s: &Scratch, extra: &[&str]) {
    let mut a = vec!["copy", "--id", "half"];
    a.extend_from_slice(extra);
    let o = s.run(&a);
    expect_code(&o, 0);
    fs::remove_file(s.path("half/.ferry/half/commit")).unwrap();
    fs::remove_file(s.path("half/.ferry/half/decision")).unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        // The command line.
        Case {
            what: "unknown flag",
            setup: |_| args(&["copy", "--frobnicate", "src", "out"]),
            code: 2,
            class: "usage",
            names: "--frobnicate",
        },
        Case {
            what: "chunk size 0",
            setup: |_| args(&["copy", "--chunk-size", "0", "src", "out"]),
            code: 2,
            class: "usage",
            names: "chunk-size",
        },
        Case {
            what: "chunk size with a bad unit",
            setup: |_| args(&["copy", "--chunk-size", "12XB", "src", "out"]),
            code: 2,
            class: "usage",
            names: "12XB",
        },
        Case {
            what: "negative chunk size",
            setup: |_| args(&["copy", "--chunk-size=-5", "src", "out"]),
            code: 2,
            class: "usage",
            names: "-5",
        },
        Case {
            what: "chunk size that overflows",
            setup: |_| args(&["copy", "--chunk-size", "99999999999GiB", "src", "out"]),
            code: 2,
            class: "usage",
            names: "99999999999GiB",
        },
        Case {
            what: "zero threads",
            setup: |_| args(&["copy", "--threads", "0", "src", "out"]),
            code: 2,
            class: "usage",
            names: "threads",
        },
        Case {
            what: "threads not a number",
            setup: |_| args(&["copy", "--threads", "many", "src", "out"]),
            code: 2,
            class: "usage",
            names: "many",
        },
        Case {
            what: "zero ranks",
            setup: |_| args(&["copy", "--ranks", "0", "src", "out"]),
            code: 2,
            class: "usage",
            names: "ranks",
        },
        Case {
            what: "unknown layout",
            setup: |_| args(&["copy", "--layout", "diagonal", "src", "out"]),
            code: 2,
            class: "usage",
            names: "diagonal",
        },
        Case {
            what: "{rank} in the shared layout",
            setup: |_| args(&["copy", "--layout", "shared", "src{rank}", "out"]),
            code: 2,
            class: "usage",
            names: "{rank}",
        },
        Case {
            what: "id with a slash",
            setup: |_| args(&["copy", "--id", "a/b", "src", "out"]),
            code: 2,
            class: "usage",
            names: "a/b",
        },
        Case {
            what: "id starting with a dot",
            setup: |_| args(&["copy", "--id", ".x", "src", "out"]),
            code: 2,
            class: "usage",
            names: ".x",
        },
        Case {
            what: "id too long",
            setup: |_| args(&["copy", "--id", &"i".repeat(65), "src", "out"]),
            code: 2,
            class: "usage",
            names: "iiii",
        },
        Case {
            what: "no destination",
            setup: |_| args(&["copy", "src"]),
            code: 2,
            class: "usage",
            names: "",
        },
        Case {
            what: "no command",
            setup: |_| args(&[]),
            code: 2,
            class: "",
            names: "",
        },
        Case {
            what: "unknown command",
            setup: |_| args(&["teleport", "src", "out"]),
            code: 2,
            class: "usage",
            names: "teleport",
        },
        Case {
            what: "zero retries",
            setup: |_| args(&["copy", "--retries", "0", "src", "out"]),
            code: 2,
            class: "usage",
            names: "retries",
        },
        Case {
            what: "retry time not a duration",
            setup: |_| args(&["copy", "--retry-time", "soon", "src", "out"]),
            code: 2,
            class: "usage",
            names: "soon",
        },
        Case {
            what: "--progress with --quiet",
            setup: |_| args(&["copy", "--progress", "--quiet", "src", "out"]),
            code: 2,
            class: "usage",
            names: "quiet",
        },
        // Sources.
        Case {
            what: "missing source",
            setup: |_| args(&["copy", "nothing-here", "out"]),
            code: 7,
            class: "not-found",
            names: "nothing-here",
        },
        Case {
            what: "dangling symlink as the source",
            setup: |s| {
                std::os::unix::fs::symlink("gone", s.path("dangle")).unwrap();
                args(&["copy", "dangle", "out"])
            },
            code: 7,
            class: "not-found",
            names: "dangle",
        },
        Case {
            what: "symlink loop as the source",
            setup: |s| {
                std::os::unix::fs::symlink("loop", s.path("loop")).unwrap();
                args(&["copy", "loop", "out"])
            },
            code: 2,
            class: "usage",
            names: "loop",
        },
        Case {
            what: "FIFO in the source",
            setup: |s| {
                mkfifo(&s.path("src/sub/pipe"));
                args(&["copy", "src", "out"])
            },
            code: 2,
            class: "usage",
            names: "sub/pipe",
        },
        Case {
            what: "socket in the source",
            setup: |s| {
                std::os::unix::net::UnixListener::bind(s.path("src/sock")).unwrap();
                args(&["copy", "src", "out"])
            },
            code: 2,
            class: "usage",
            names: "src/sock",
        },
        Case {
            what: "device file in the source",
            setup: |s| {
                mknod_null(&s.path("src/null"));
                args(&["copy", "src", "out"])
            },
            code: 2,
            class: "usage",
            names: "src/null",
        },
        Case {
            what: "FIFO as the source",
            setup: |s| {
                mkfifo(&s.path("pipe"));
                args(&["copy", "pipe", "out"])
            },
            code: 2,
            class: "usage",
            names: "pipe",
        },
        Case {
            what: "overlapping sources",
            setup: |_| args(&["copy", "src", "src/sub", "out"]),
            code: 2,
            class: "usage",
            names: "src/sub",
        },
        Case {
            what: "the same source twice",
            setup: |_| args(&["copy", "src", "src", "out"]),
            code: 2,
            class: "usage",
            names: "src",
        },
        // Destinations.
        Case {
            what: "destination inside the source",
            setup: |_| args(&["copy", "src", "src/inner"]),
            code: 2,
            class: "usage",
            names: "src/inner",
        },
        Case {
            what: "destination equal to the source",
            setup: |_| args(&["copy", "src", "src/."]),
            code: 2,
            class: "usage",
            names: "src",
        },
        Case {
            what: "source inside the destination",
            setup: |_| args(&["copy", "src/sub", "."]),
            code: 2,
            class: "usage",
            names: "src/sub",
        },
        Case {
            what: "destination is an existing file",
            setup: |s| {
                fs::write(s.path("taken"), b"mine").unwrap();
                args(&["copy", "src", "taken"])
            },
            code: 2,
            class: "usage",
            names: "taken",
        },
        Case {
            what: "destination under a file",
            setup: |s| {
                fs::write(s.path("taken"), b"mine").unwrap();
                args(&["copy", "src", "taken/out"])
            },
            code: 2,
            class: "usage",
            names: "taken",
        },
        Case {
            what: "destination name longer than NAME_MAX",
            setup: |_| args(&["copy", "src", &"n".repeat(256)]),
            code: 2,
            class: "usage",
            names: "NAME_MAX",
        },
        Case {
            what: "destination path longer than PATH_MAX",
            setup: |_| args(&["copy", "src", &vec!["d".repeat(200); 21].join("/")]),
            code: 2,
            class: "usage",
            names: "PATH_MAX",
        },
        Case {
            what: "state dir that is a file",
            setup: |s| {
                fs::write(s.path("st"), b"mine").unwrap();
                args(&["copy", "--state-dir", "st", "src", "out"])
            },
            code: 2,
            class: "usage",
            names: "st",
        },
        Case {
            what: "two ranks planning one destination",
            setup: |_| args(&["copy", "--ranks", "2", "--layout", "local", "src", "out"]),
            code: 2,
            class: "usage",
            names: "out",
        },
        // Transfers.
        Case {
            what: "resume of an unknown id",
            setup: |_| args(&["resume", "nope-1"]),
            code: 2,
            class: "usage",
            names: "nope-1",
        },
        Case {
            what: "status of an unknown id",
            setup: |_| args(&["status", "nope-2"]),
            code: 2,
            class: "usage",
            names: "nope-2",
        },
        Case {
            what: "cancel of an unknown id",
            setup: |_| args(&["cancel", "nope-3"]),
            code: 2,
            class: "usage",
            names: "nope-3",
        },
        Case {
            what: "verify of an unknown id",
            setup: |_| args(&["verify", "nope-4"]),
            code: 2,
            class: "usage",
            names: "nope-4",
        },
        Case {
            what: "forget of an unknown id",
            setup: |_| args(&["forget", "nope-5"]),
            code: 2,
            class: "usage",
            names: "nope-5",
        },
        Case {
            what: "an id that walks out of the state dir",
            setup: |_| args(&["status", "../evil"]),
            code: 2,
            class: "usage",
            names: "../evil",
        },
        Case {
            what: "status of a forgotten id",
            setup: |s| {
                expect_code(&s.run(&["forget", "base"]), 0);
                args(&["status", "base"])
            },
            code: 2,
            class: "usage",
            names: "base",
        },
        Case {
            what: "resume of a forgotten id",
            setup: |s| {
                expect_code(&s.run(&["forget", "base"]), 0);
                args(&["resume", "base"])
            },
            code: 2,
            class: "usage",
            names: "base",
        },
        Case {
            what: "an id used before",
            setup: |_| args(&["copy", "--id", "base", "src", "out"]),
            code: 2,
            class: "usage",
            names: "base",
        },
        Case {
            what: "cancel of a committed transfer",
            setup: |_| args(&["cancel", "base"]),
            code: 2,
            class: "usage",
            names: "committed",
        },
        Case {
            what: "forget of an interrupted transfer",
            setup: |s| {
                interrupted(s, &["src", "half"]);
                args(&["forget", "half"])
            },
            code: 2,
            class: "usage",
            names: "interrupted",
        },
        Case {
            what: "verify of an uncommitted transfer",
            setup: |s| {
                interrupted(s, &["src", "half"]);
                args(&["verify", "half"])
            },
            code: 2,
            class: "usage",
            names: "not committed",
        },
        Case {
            what: "resume of a cancelled transfer",
            setup: |s| {
                interrupted(s, &["src", "half"]);
                expect_code(&s.run(&["cancel", "half"]), 0);
                args(&["resume", "half"])
            },
            code: 2,
            class: "usage",
            names: "cancelled",
        },
        Case {
            what: "local layout resumed on another rank count",
            setup: |s| {
                for r in 0..2 {
                    fs::create_dir_all(s.path(&format!("p{r}"))).unwrap();
                    fs::write(s.path(&format!("p{r}/f")), b"x").unwrap();
                }
                interrupted(s, &["--ranks", "2", "p{rank}", "half/r{rank}"]);
                args(&["resume", "half", "--ranks", "3"])
            },
            code: 2,
            class: "usage",
            names: "2 ranks",
        },
        Case {
            what: "a plan from a newer ferry",
            setup: |s| {
                interrupted(s, &["src", "half"]);
                reframe(&s.path("half/.ferry/half/plan"), "plan", "1", |b| {
                    b.replacen("\"format\":1", "\"format\":99", 1)
                });
                args(&["resume", "half"])
            },
            code: 2,
            class: "usage",
            names: "newer ferry",
        },
        Case {
            what: "a state record framed by a newer ferry (or damaged: its frame header has no checksum)",
            setup: |s| {
                interrupted(s, &["src", "half"]);
                reframe(&s.path("half/.ferry/half/plan"), "plan", "7", |b| b);
                args(&["resume", "half"])
            },
            code: 8,
            class: "integrity",
            names: "newer ferry",
        },
        Case {
            what: "a damaged plan",
            setup: |s| {
                interrupted(s, &["src", "half"]);
                let p = s.path("half/.ferry/half/plan");
                let mut b = fs::read(&p).unwrap();
                let n = b.len();
                b[n - 5] ^= 0x20;
                fs::write(&p, b).unwrap();
                args(&["resume", "half"])
            },
            code: 8,
            class: "integrity",
            names: "plan",
        },
    ]
}

fn mkfifo(p: &std::path::Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

fn mknod_null(p: &std::path::Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mknod(2) of a character device like /dev/null (1, 3); the tests run as root.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
}

#[test]
fn every_bad_input_gets_its_class_and_exit_code_and_changes_nothing() {
    let cases = cases();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let s = Scratch::new();
        let mut r = Rng::new(11);
        write_file(&s.path("src/a"), 10_000, &mut r);
        write_file(&s.path("src/sub/b"), 3_000, &mut r);
        write_file(&s.path("src/sub/c"), 0, &mut r);
        expect_code(&s.run(&["copy", "--id", "base", "src", "done"]), 0);
        let a = (c.setup)(&s);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let top = |s: &Scratch| -> Vec<_> {
            let mut v: Vec<_> = fs::read_dir(s.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "home")
                .collect();
            v.sort();
            v
        };
        let before = (snapshot(&s.path("src")), snapshot(&s.path("done")), top(&s));
        let o = s.run(&a);
        let after = (snapshot(&s.path("src")), snapshot(&s.path("done")), top(&s));
        let line = first_error_line(&o);
        let class = line
            .strip_prefix("ferry: error: ")
            .and_then(|l| l.split(':').next())
            .unwrap_or("");
        let mut why = Vec::new();
        if code(&o) != c.code {
            why.push(format!("exit {} (want {})", code(&o), c.code));
        }
        if class != c.class && !c.class.is_empty() {
            why.push(format!("class '{class}' (want '{}')", c.class));
        }
        if !line.contains(c.names) {
            why.push(format!("error line does not name '{}'", c.names));
        }
        if before != after {
            why.push("something changed in src/, done/ or the scratch directory".into());
        }
        if !why.is_empty() {
            failures.push(format!(
                "{} ({:?}): {}\n    stderr: {}",
                c.what,
                a,
                why.join("; "),
                stderr(&o).trim()
            ));
        }
    }
    eprintln!("{} bad-input cases run", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn awkward_but_valid_sources_are_copied_exactly() {
    let s = Scratch::new();
    let src = s.path("src");
    let mut r = Rng::new(13);
    // A newline in a name, a name of NAME_MAX bytes, a path near PATH_MAX, links that loop or
    // dangle inside the tree (copied as links, never followed).
    write_file(&src.join("two\nlines"), 1000, &mut r);
    write_file(&src.join("x".repeat(255)), 2000, &mut r);
    let deep: std::path::PathBuf = std::iter::repeat_n("d".repeat(250), 14).collect();
    let deep = src.join(deep).join("leaf");
    assert!(deep.as_os_str().len() > 3500, "{}", deep.as_os_str().len());
    write_file(&deep, 3000, &mut r);
    std::os::unix::fs::symlink("loop", src.join("loop")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", src.join("dangling")).unwrap();
    let o = s.run(&["copy", "src", "d"]);
    expect_code(&o, 0);
    assert_same_tree(&src, &s.path("d"));

    // A FIFO, left out with --skip-special and a warning naming it.
    mkfifo(&src.join("pipe"));
    let o = s.run(&["copy", "--skip-special", "src", "d2"]);
    expect_code(&o, 0);
    assert!(stderr(&o).contains("src/pipe"), "{}", stderr(&o));
    assert!(fs::symlink_metadata(s.path("d2/pipe")).is_err());
    fs::remove_file(src.join("pipe")).unwrap();
    assert_same_tree(&src, &s.path("d2"));
}

#[test]
fn delete_source_across_file_systems_copies_then_removes() {
    let s = Scratch::new();
    let Some(other) = Tmpfs::mount(&s.path("bb"), "size=16m") else {
        panic!("mounting a tmpfs is not permitted here: the cross-file-system case cannot run");
    };
    let src = other.dir.join("ckpt");
    let mut r = Rng::new(14);
    write_file(&src.join("rank0.dat"), 3 << 20, &mut r);
    write_file(&src.join("meta/info"), 100, &mut r);
    let keep = s.path("keep");
    cp_a(&src, &keep);
    let o = s.run(&["copy", "--delete-source", "--json", "bb/ckpt", "pfs/ckpt"]);
    expect_code(&o, 0);
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(sum["sources_removed"], true, "{sum}");
    assert!(
        !src.exists(),
        "the source is gone once the copy is committed"
    );
    assert_same_tree(&keep, &s.path("pfs/ckpt"));
}

#[cfg(feature = "failpoints")]
#[test]
fn a_running_transfer_cannot_be_forgotten_nor_joined_by_another_into_its_destination() {
    let s = Scratch::new();
    let mut r = Rng::new(15);
    write_file(&s.path("src/a"), 200_000, &mut r);
    write_file(&s.path("other/b"), 1000, &mut r);
    let mut child = s
        .ferry()
        .args(["copy", "--id", "run", "src", "dst"])
        .env("FERRY_FAILPOINTS", "copy::unit_synced=pause")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn_tracked();
    s.wait_paused(&mut child);
    let before = snapshot(&s.path("src"));
    // A second transfer into the same destination, with its own state dir.
    let o = s.run(&["copy", "--id", "two", "--state-dir", "st2", "other", "dst"]);
    expect_code(&o, 2);
    let (line, class) = error_line(&o);
    assert_eq!(class, "usage", "{line}");
    assert!(
        line.contains("dst") && line.contains("another ferry transfer"),
        "{line}"
    );
    assert!(!s.path("dst/b").exists() && !s.path("st2/two").exists());
    // Forgetting the running one is refused.
    let o = s.run(&["forget", "run"]);
    expect_code(&o, 2);
    assert!(first_error_line(&o).contains("run"), "{}", stderr(&o));
    s.release();
    wait_for(std::time::Duration::from_secs(60), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(child.wait().unwrap().success());
    assert_eq!(snapshot(&s.path("src")), before);
    assert_same_tree(&s.path("src"), &s.path("dst"));
}
