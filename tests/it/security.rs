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

/// The run stopped with `permission` (exit 6), naming `path` as a symbolic link.
fn expect_link_refused(o: &std::process::Output, path: &str) {
    expect_code(o, 6);
    let err = stderr(o);
    assert!(
        err.contains("permission") && err.contains(path) && err.contains("symbolic link"),
        "{err}"
    );
}

/// Nothing outside the tree changed: the canary directory holds exactly `want`, and the canary
/// its bytes.
fn canary_untouched(s: &Scratch, want: &[&str]) {
    assert_eq!(names(&s.path("outside")), want, "nothing written outside");
    assert_eq!(fs::read(s.path("outside/canary")).unwrap(), b"canary");
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
    expect_link_refused(&o, "dst/sub");
    canary_untouched(&s, &["canary"]);
    // A resume refuses too while the link is there; once it is gone, the copy completes.
    expect_code(&s.run(&["resume", "planted"]), 6);
    fs::remove_file(s.path("dst/sub")).unwrap();
    expect_code(&s.run(&["resume", "planted"]), 0);
    assert_same_tree(&s.path("src"), &s.path("dst"));
    canary_untouched(&s, &["canary"]);
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

/// Run `ferry ARGS` paused at failpoint `point`, let `tamper` change the trees, then let it go
/// on; returns its output.
#[cfg(feature = "failpoints")]
fn tampered_at(
    s: &Scratch,
    point: &str,
    args: &[&str],
    tamper: impl FnOnce(),
) -> std::process::Output {
    let mut child = s
        .ferry()
        .args(args)
        .env("FERRY_FAILPOINTS", format!("{point}=pause"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn_tracked();
    s.wait_paused(&mut child);
    tamper();
    s.release();
    child.wait_with_output().unwrap()
}

/// `dir` moved aside and a symlink to the canary directory put in its place.
#[cfg(feature = "failpoints")]
fn swap_for_link(s: &Scratch, dir: &str) {
    fs::rename(s.path(dir), s.path(&format!("{dir}.moved"))).unwrap();
    symlink(s.path("outside"), s.path(dir)).unwrap();
}

#[cfg(feature = "failpoints")]
#[test]
fn a_destination_directory_swapped_for_a_symlink_while_copying_is_never_written_through() {
    let s = Scratch::new();
    tree(&s);
    let o = tampered_at(
        &s,
        "copy::unit_synced",
        &["copy", "--id", "swap", "--threads", "1", "src", "dst"],
        || swap_for_link(&s, "dst/sub"),
    );
    expect_link_refused(&o, "dst/sub");
    canary_untouched(&s, &["canary"]);
    // Once the tree is put back, the resume completes.
    fs::remove_file(s.path("dst/sub")).unwrap();
    fs::rename(s.path("dst/sub.moved"), s.path("dst/sub")).unwrap();
    expect_code(&s.run(&["resume", "swap"]), 0);
    assert_same_tree(&s.path("src"), &s.path("dst"));
    canary_untouched(&s, &["canary"]);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_destination_directory_swapped_for_a_symlink_during_the_commit_is_refused() {
    let s = Scratch::new();
    tree(&s);
    // Paused before the first rename of the commit (the decision is durable by then).
    let o = tampered_at(
        &s,
        "commit::file_finished",
        &["copy", "--id", "late", "--threads", "1", "src", "dst"],
        || swap_for_link(&s, "dst/sub"),
    );
    expect_link_refused(&o, "dst/sub");
    canary_untouched(&s, &["canary"]);
    let st = stdout(&s.run(&["status", "late"]));
    assert!(!st.contains("committed\n"), "not committed: {st}");
}

#[cfg(feature = "failpoints")]
#[test]
fn delete_source_never_removes_through_a_source_directory_swapped_for_a_symlink() {
    let s = Scratch::new();
    tree(&s);
    // What the link will point at holds files of the same names as the planned sources.
    fs::write(s.path("outside/b.dat"), b"not yours").unwrap();
    fs::create_dir_all(s.path("outside/deeper")).unwrap();
    fs::write(s.path("outside/deeper/a.dat"), b"not yours either").unwrap();
    let o = tampered_at(
        &s,
        "delete::source",
        &[
            "copy",
            "--id",
            "del",
            "--threads",
            "1",
            "--delete-source",
            "src",
            "dst",
        ],
        || swap_for_link(&s, "src/sub"),
    );
    expect_link_refused(&o, "src/sub");
    canary_untouched(&s, &["b.dat", "canary", "deeper"]);
    assert_eq!(fs::read(s.path("outside/b.dat")).unwrap(), b"not yours");
    assert_eq!(
        fs::read(s.path("outside/deeper/a.dat")).unwrap(),
        b"not yours either"
    );
    // The copy itself is committed and whole.
    assert_eq!(
        fs::read(s.path("dst/sub/b.dat")).unwrap(),
        fs::read(s.path("src/sub.moved/b.dat")).unwrap()
    );
}

/// Whether this test process runs as root (the owner tests need it; CI runs as root).
fn root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    let r = unsafe { libc::geteuid() } == 0;
    if !r {
        eprintln!("skipped: needs root to give files away");
    }
    r
}

/// A POSIX ACL as Linux stores it in `system.posix_acl_*`: version 2, then (tag, perm, id)
/// entries sorted by tag: the owner `rw`, user `uid` read-only, the group read-only, mask read,
/// others nothing.
fn acl(uid: u32) -> Vec<u8> {
    const UNDEF: u32 = u32::MAX;
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, UNDEF),
        (0x02, 4, uid),
        (0x04, 4, UNDEF),
        (0x10, 4, UNDEF),
        (0x20, 0, UNDEF),
    ] {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

/// Every extended attribute of `p` (not following a symlink), sorted.
fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap();
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut v = vec![0u8; 65536];
        let m = rustix::fs::lgetxattr(p, name.as_str(), &mut v[..]).unwrap();
        v.truncate(m);
        out.push((name, v));
    }
    out.sort();
    out
}

/// (uid, gid, mode) of `p` itself.
fn owner_mode(p: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
fn root_with_preserve_keeps_owners_groups_xattrs_and_acls_in_another_users_tree() {
    use std::os::unix::fs::{chown, lchown, PermissionsExt};
    if !root() {
        return;
    }
    let s = Scratch::new();
    let mut r = Rng::new(5);
    write_file(&s.path("src/a.dat"), 70_000, &mut r);
    write_file(&s.path("src/acl.dat"), 100, &mut r);
    write_file(&s.path("src/shared/b.dat"), 9_000_000, &mut r);
    symlink("a.dat", s.path("src/link")).unwrap();
    set_xattr(&s.path("src/a.dat"), "user.ckpt.step", b"42");
    set_xattr(
        &s.path("src/acl.dat"),
        "system.posix_acl_access",
        &acl(4321),
    );
    set_xattr(
        &s.path("src/shared"),
        "system.posix_acl_default",
        &acl(4321),
    );
    set_xattr(&s.path("src/shared"), "user.note", b"dir attr");
    fs::set_permissions(s.path("src/a.dat"), fs::Permissions::from_mode(0o4750)).unwrap();
    for (p, uid, gid) in [
        ("src", 1234, 2345),
        ("src/a.dat", 1234, 2345),
        ("src/acl.dat", 4321, 4321),
        ("src/shared", 1234, 2345),
        ("src/shared/b.dat", 4321, 2345),
    ] {
        chown(s.path(p), Some(uid), Some(gid)).unwrap();
    }
    // chown clears set-id bits: put it back, the copy must keep it.
    fs::set_permissions(s.path("src/a.dat"), fs::Permissions::from_mode(0o4750)).unwrap();
    lchown(s.path("src/link"), Some(4321), Some(4321)).unwrap();
    // The destination is another user's project directory.
    fs::create_dir(s.path("proj")).unwrap();
    chown(s.path("proj"), Some(1234), Some(2345)).unwrap();
    // Whatever is made in it inherits an ACL; the copies of sources without one must not keep it.
    set_xattr(&s.path("proj"), "system.posix_acl_default", &acl(777));

    let o = s.run(&["copy", "--preserve", "src", "proj/ckpt"]);
    expect_code(&o, 0);
    assert!(!stderr(&o).contains("not kept"), "{}", stderr(&o));
    assert_same_tree(&s.path("src"), &s.path("proj/ckpt"));
    for p in [
        "",
        "/a.dat",
        "/acl.dat",
        "/shared",
        "/shared/b.dat",
        "/link",
    ] {
        let (src, dst) = (s.path(&format!("src{p}")), s.path(&format!("proj/ckpt{p}")));
        if p != "/link" {
            assert_eq!(
                owner_mode(&dst),
                owner_mode(&src),
                "owner, group, mode of {p}"
            );
            assert_eq!(xattrs(&dst), xattrs(&src), "extended attributes of {p}");
        } else {
            assert_eq!(owner_mode(&dst).0, 4321, "owner of the symlink");
            assert_eq!(owner_mode(&dst).1, 4321);
        }
    }
    assert_eq!(owner_mode(&s.path("proj/ckpt/a.dat")).2, 0o4750);
    assert!(xattrs(&s.path("proj/ckpt/acl.dat"))
        .iter()
        .any(|(n, _)| n == "system.posix_acl_access"));

    // Without --preserve the copy belongs to whoever ran it; modes and times are still kept,
    // but a set-user-ID bit never goes to a file of another owner than the source's.
    let o = s.run(&["copy", "src", "proj/plain"]);
    expect_code(&o, 0);
    let (uid, _, mode) = owner_mode(&s.path("proj/plain/acl.dat"));
    assert_eq!(uid, 0);
    assert_eq!(mode, owner_mode(&s.path("src/acl.dat")).2);
    assert!(!xattrs(&s.path("proj/plain/a.dat"))
        .iter()
        .any(|(n, _)| n.starts_with("user.")));
    assert_eq!(owner_mode(&s.path("proj/plain/a.dat")).2, 0o750);
    let err = stderr(&o);
    assert!(
        err.contains("proj/plain/a.dat") && err.contains("set-id bits 4000 dropped"),
        "{err}"
    );
}

#[test]
fn an_unprivileged_run_with_preserve_warns_per_file_it_cannot_give_away() {
    use std::os::unix::fs::{chown, PermissionsExt};
    if !root() {
        return;
    }
    const NOBODY: u32 = 65534;
    // In the system's temp directory, which every user can reach (the scratch may not be), with
    // a copy of the binary.
    let base = tempfile::Builder::new()
        .prefix("ferry-unpriv")
        .tempdir()
        .unwrap();
    let at = |p: &str| base.path().join(p);
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy(env!("CARGO_BIN_EXE_ferry"), at("ferry")).unwrap();
    let mut r = Rng::new(6);
    write_file(&at("src/root.dat"), 5000, &mut r);
    write_file(&at("src/mine.dat"), 6000, &mut r);
    write_file(&at("src/sub/deep.dat"), 7000, &mut r);
    set_xattr(&at("src/root.dat"), "user.origin", b"root");
    for p in ["src", "src/sub"] {
        fs::set_permissions(at(p), fs::Permissions::from_mode(0o755)).unwrap();
    }
    for p in ["src/root.dat", "src/mine.dat", "src/sub/deep.dat"] {
        fs::set_permissions(at(p), fs::Permissions::from_mode(0o644)).unwrap();
    }
    // A set-user-ID program of root's: its copy, which root will not own, must not keep the bit.
    write_file(&at("src/suid"), 100, &mut r);
    fs::set_permissions(at("src/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    chown(at("src/mine.dat"), Some(NOBODY), Some(NOBODY)).unwrap();
    for d in ["out", "home"] {
        fs::create_dir(at(d)).unwrap();
        chown(at(d), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(at("ferry"))
        .args(["copy", "--preserve"])
        .arg(at("src"))
        .arg(at("out/dst"))
        .env("FERRY_HOME", at("home"))
        .env("HOME", at("home"))
        .env_remove("FERRY_FAILPOINTS")
        .output()
        .unwrap();
    expect_code(&o, 0);
    let err = stderr(&o);
    // One warning, with its class, for each root-owned entry; none for the user's own file.
    for p in [
        "out/dst'",
        "out/dst/root.dat",
        "out/dst/sub'",
        "out/dst/sub/deep.dat",
        "out/dst/suid'",
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(p))
            .unwrap_or_else(|| panic!("no warning for {p}:\n{err}"));
        assert!(
            line.contains("permission") && line.contains("owner and group 0:0 not kept"),
            "{line}"
        );
    }
    assert!(!err.contains("mine.dat"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("out/dst/suid") && l.contains("set-id bits 4000 dropped")),
        "{err}"
    );
    assert_eq!(owner_mode(&at("out/dst/suid")), (NOBODY, NOBODY, 0o755));
    fs::remove_file(at("src/suid")).unwrap();
    fs::remove_file(at("out/dst/suid")).unwrap();
    // root.dat, sub, sub/deep.dat, the top directory, suid (owner), suid (its set-id bit).
    assert!(
        err.contains("6 owner, group, extended-attribute or set-id change(s)"),
        "{err}"
    );
    assert_same_tree(&at("src"), &at("out/dst"));
    for p in ["root.dat", "mine.dat", "sub/deep.dat"] {
        let (uid, gid, mode) = owner_mode(&at(&format!("out/dst/{p}")));
        assert_eq!((uid, gid, mode), (NOBODY, NOBODY, 0o644), "{p}");
    }
    // What the user may set is kept: the user's own extended attributes.
    assert_eq!(
        xattrs(&at("out/dst/root.dat")),
        [("user.origin".to_string(), b"root".to_vec())]
    );
}

#[test]
fn with_several_sources_a_planted_link_at_dst_name_is_refused() {
    let s = Scratch::new();
    tree(&s);
    let mut r = Rng::new(32);
    write_file(&s.path("other/x.dat"), 100, &mut r);
    fs::create_dir_all(s.path("dst")).unwrap();
    // DST is the user's; DST/src, where the first source goes, was planted by someone else.
    symlink(s.path("outside"), s.path("dst/src")).unwrap();
    let o = s.run(&["copy", "src", "other", "dst"]);
    expect_link_refused(&o, "dst/src");
    canary_untouched(&s, &["canary"]);
    fs::remove_file(s.path("dst/src")).unwrap();
    expect_code(&s.run(&["copy", "src", "other", "dst"]), 0);
    assert_same_tree(&s.path("src"), &s.path("dst/src"));
    assert_same_tree(&s.path("other"), &s.path("dst/other"));
}

#[cfg(feature = "failpoints")]
#[test]
fn a_hard_link_planted_at_a_temporary_name_is_never_written_through() {
    let s = Scratch::new();
    tree(&s);
    fs::create_dir_all(s.path("dst")).unwrap();
    // Temporary names carry the plan's random nonce, so nobody can plant one before the plan:
    // plant it once the plan is durable, at the name top.dat (entry 5 of the plan: src, sub,
    // sub/b.dat, sub/deeper, sub/deeper/a.dat, top.dat) will get in attempt 1.
    let c = spawn_paused(
        &s,
        "plan::written=pause",
        &["copy", "--id", "hl", "src", "dst"],
    );
    let nonce = plan_nonce(&s.path("dst/.ferry"), "hl");
    let planted = s.path(&format!("dst/.ferry-hl-{nonce}-5-1.tmp"));
    fs::hard_link(s.path("outside/canary"), &planted).unwrap();
    s.release();
    let o = c.wait_with_output().unwrap();
    expect_code(&o, 8);
    assert!(
        stderr(&o).contains("not the file ferry made there"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(s.path("outside/canary")).unwrap(), b"canary");
    // Never removed as ferry's either; the resume copies the file under its own new name.
    expect_code(&s.run(&["resume", "hl"]), 0);
    assert_eq!(fs::read(&planted).unwrap(), b"canary");
    fs::remove_file(&planted).unwrap();
    assert_same_tree(&s.path("src"), &s.path("dst"));
    assert_eq!(fs::read(s.path("outside/canary")).unwrap(), b"canary");
}

#[test]
fn a_state_directory_planted_as_a_link_in_the_destination_is_refused() {
    let s = Scratch::new();
    tree(&s);
    fs::create_dir_all(s.path("dst")).unwrap();
    // DST/.ferry, where the transfer's state goes by default, points elsewhere.
    symlink(s.path("outside"), s.path("dst/.ferry")).unwrap();
    let o = s.run(&["copy", "src", "dst"]);
    expect_link_refused(&o, "dst/.ferry");
    canary_untouched(&s, &["canary"]);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_source_directory_swapped_for_a_symlink_while_copying_is_never_read_through() {
    let s = Scratch::new();
    tree(&s);
    // What the link will point at holds look-alikes of the planned sources: same names, sizes
    // and mtimes, other bytes (another user's files the attacker wants copied out).
    for (rel, alike) in [
        ("sub/b.dat", "outside/b.dat"),
        ("sub/deeper/a.dat", "outside/deeper/a.dat"),
    ] {
        let planned = fs::metadata(s.path(&format!("src/{rel}"))).unwrap();
        fs::create_dir_all(s.path(alike).parent().unwrap()).unwrap();
        fs::write(s.path(alike), vec![b'x'; planned.len() as usize]).unwrap();
        fs::File::options()
            .write(true)
            .open(s.path(alike))
            .unwrap()
            .set_modified(planned.modified().unwrap())
            .unwrap();
    }
    let o = tampered_at(
        &s,
        "copy::unit_start",
        &["copy", "--id", "srcswap", "--threads", "1", "src", "dst"],
        || swap_for_link(&s, "src/sub"),
    );
    expect_link_refused(&o, "src/sub");
    assert!(!s.path("dst/sub/b.dat").exists(), "nothing committed");
}

#[cfg(feature = "hdf5")]
#[test]
fn ferry_gen_replaces_links_planted_at_its_outputs_never_writes_through_them() {
    let s = Scratch::new();
    fs::create_dir_all(s.path("gen/rank0")).unwrap();
    fs::create_dir_all(s.path("outside")).unwrap();
    fs::write(s.path("outside/canary"), b"canary").unwrap();
    for name in ["ckpt.h5", "restart.bin", "run.log"] {
        symlink(
            s.path("outside/canary"),
            s.path(&format!("gen/rank0/{name}")),
        )
        .unwrap();
    }
    expect_code(&s.run(&["gen", "gen", "--size", "1MiB", "--seed", "4"]), 0);
    assert_eq!(fs::read(s.path("outside/canary")).unwrap(), b"canary");
    for name in ["ckpt.h5", "restart.bin", "run.log"] {
        assert!(fs::symlink_metadata(s.path(&format!("gen/rank0/{name}")))
            .unwrap()
            .is_file());
    }
}
