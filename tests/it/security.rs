//! Planted symlinks in the destination and private temporaries (first part of issue 10): no
//! write lands outside the destination tree, checked with canaries outside it.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use crate::util::*;

/// Names in `dir` (a canary directory outside the destination).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn tree(s: &Scratch) {
    let mut r = Rng::new(31);
    write_file(&s.path("src/sub/deeper/a.dat"), 300_000, &mut r);
    write_file(&s.path("src/sub/b.dat"), 1000, &mut r);
    write_file(&s.path("src/top.dat"), 10, &mut r);
    fs::create_dir_all(s.path("outside")).unwrap();
    fs::write(s.path("outside/canary"), b"canary").unwrap();
}

#[test]
fn a_directory_symlink_planted_in_the_destination_is_refused_before_any_write() {
    let s = Scratch::new();
    tree(&s);
    fs::create_dir_all(s.path("dst")).unwrap();
    // Someone made dst/sub point elsewhere before the copy.
    symlink(s.path("outside"), s.path("dst/sub")).unwrap();
    let o = s.run(&["copy", "--id", "planted", "src", "dst"]);
    expect_code(&o, 6);
    let err = stderr(&o);
    assert!(
        err.contains("permission") && err.contains("dst/sub") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(
        names(&s.path("outside")),
        ["canary"],
        "nothing written outside"
    );
    assert_eq!(fs::read(s.path("outside/canary")).unwrap(), b"canary");
    // A resume refuses too while the link is there; once it is gone, the copy completes.
    expect_code(&s.run(&["resume", "planted"]), 6);
    fs::remove_file(s.path("dst/sub")).unwrap();
    expect_code(&s.run(&["resume", "planted"]), 0);
    assert_same_tree(&s.path("src"), &s.path("dst"));
    assert_eq!(names(&s.path("outside")), ["canary"]);
}

#[test]
fn a_file_symlink_planted_at_a_final_name_is_replaced_never_written_through() {
    let s = Scratch::new();
    tree(&s);
    fs::create_dir_all(s.path("dst/sub")).unwrap();
    symlink(s.path("outside/canary"), s.path("dst/sub/b.dat")).unwrap();
    expect_code(&s.run(&["copy", "src", "dst"]), 0);
    assert_eq!(fs::read(s.path("outside/canary")).unwrap(), b"canary");
    assert!(fs::symlink_metadata(s.path("dst/sub/b.dat"))
        .unwrap()
        .is_file());
    assert_same_tree(&s.path("src"), &s.path("dst"));
}

#[cfg(feature = "failpoints")]
#[test]
fn temporaries_are_private_while_in_flight_and_get_their_mode_at_the_commit() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    tree(&s);
    fs::set_permissions(s.path("src/sub/b.dat"), fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = s
        .ferry()
        .args(["copy", "--id", "m", "src", "dst"])
        .env("FERRY_FAILPOINTS", "copy::unit_synced=pause")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn_tracked();
    s.wait_paused(&mut child);
    let temps = temps_in(&s.path("dst"));
    assert!(!temps.is_empty());
    for t in &temps {
        let mode = fs::metadata(t).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "{} is mode {mode:o} in flight",
            t.display()
        );
    }
    let state = fs::metadata(s.path("dst/.ferry/m"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(state, 0o700, "the state directory is private");
    s.release();
    wait_for(std::time::Duration::from_secs(60), || {
        child.try_wait().unwrap().is_some()
    });
    let mode = fs::metadata(s.path("dst/sub/b.dat"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o644, "the final mode at the commit");
}
