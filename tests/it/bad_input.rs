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
