//! The AXL-compatible C interface (libaxl, libaxl_mpi): C programs built with `mpicc` against
//! ferry's libraries and headers, run as a checkpoint library would run them. `make test` builds
//! the libraries (with failpoints) before this suite.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use ferry::state::TransferDir;

use crate::util::*;
use crate::{piped, DEADLINE};

struct Programs {
    tool: PathBuf,
    config: PathBuf,
    scr_flush: PathBuf,
    poststage: PathBuf,
}

/// The directory of the ferry binary under test, where cargo put libaxl*.so too.
fn libdir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ferry"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// Compile the C test programs once, warnings as errors, against ferry's headers and libraries.
fn programs() -> &'static Programs {
    static P: OnceLock<Programs> = OnceLock::new();
    P.get_or_init(|| {
        let lib = libdir();
        for l in ["libaxl.so", "libaxl_mpi.so", "libaxl.a", "libaxl_mpi.a"] {
            assert!(
                lib.join(l).exists(),
                "{} is missing: `make test` builds it (cargo build -p ferry-axl -p ferry-axl-mpi)",
                lib.join(l).display()
            );
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = lib.join("axl-tests");
        fs::create_dir_all(&out).unwrap();
        let build = |src: &str, name: &str, axl: &str| {
            let exe = out.join(name);
            let o = Command::new("mpicc")
                .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-rdynamic", "-o"])
                .arg(&exe)
                .arg(root.join(src))
                .arg(format!("-I{}", root.join("axl/include").display()))
                .arg(format!("-I{}", root.join("axl-mpi/include").display()))
                .arg(format!("-L{}", lib.display()))
                .arg(format!("-l{axl}"))
                .arg(format!("-Wl,-rpath,{}", lib.display()))
                .output()
                .expect("mpicc");
            assert!(o.status.success(), "mpicc {src}: {}", stderr(&o));
            exe
        };
        Programs {
            tool: build("mpi-tests/c/axl_tool.c", "axl_tool", "axl"),
            config: build("mpi-tests/c/axl_config.c", "axl_config", "axl"),
            scr_flush: build("docs/examples/scr_flush.c", "scr_flush", "axl_mpi"),
            poststage: build("mpi-tests/c/scr_poststage.c", "scr_poststage", "axl_mpi"),
        }
    })
}

/// `axl_tool ARGS` in the scratch directory, with its own registry.
fn tool(s: &Scratch, args: &[&str]) -> Command {
    let mut c = Command::new(&programs().tool);
    c.args(args)
        .current_dir(s.dir.path())
        .env("FERRY_HOME", s.home())
        .env("FERRY_AXL_STATE_DIR", s.path("axl-state"))
        .env("FERRY_TEST_TAG", s.dir.path())
        .env_remove("FERRY_FAILPOINTS")
        .stdin(Stdio::null());
    c
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
}

fn tree(s: &Scratch, name: &str, files: u64, size: u64) -> PathBuf {
    let src = s.path(name);
    let mut r = Rng::new(8);
    numbered_files(&src, files, 3, size, 4099, &mut r);
    fs::create_dir_all(src.join("empty")).unwrap();
    src
}

#[test]
fn a_serial_flush_of_a_tree_commits_with_every_transfer_type() {
    let s = Scratch::new();
    let src = tree(&s, "cache", 9, 3 << 20);
    for t in [
        "SYNC",
        "PTHREAD",
        "DEFAULT",
        "NATIVE",
        "ASYNC_DW",
        "ASYNC_BBAPI",
    ] {
        let dst = s.path(&format!("pfs/{t}"));
        let o =
            piped(tool(&s, &["serial", t, "cache", dst.to_str().unwrap()]).env("AXL_DEBUG", "1"));
        ok(&o);
        assert_same_tree(&src, &dst);
        assert!(temps_in(&dst).is_empty(), "{t}");
        // Free removed ferry's journal of a transfer without a state file.
        assert!(files_under(&s.path("axl-state")).is_empty(), "{t}");
    }
}

#[test]
fn misuse_returns_the_failure_code_with_a_message_and_crashes_nothing() {
    let s = Scratch::new();
    let dir = s.path("m");
    fs::create_dir_all(&dir).unwrap();
    let o = piped(&mut tool(&s, &["misuse", dir.to_str().unwrap()]));
    ok(&o);
    let err = stderr(&o);
    for said in [
        "AXL_Add(id 12345): no such transfer",
        "AXL_Create: transfer type 3 (ASYNC_DAEMON) is not one ferry can run",
        "AXL_Add(id 0): source is NULL",
        "AXL_Wait(id 0): it was not dispatched",
        "AXL_Add(id 0): files can be added only before Dispatch",
        "was added already",
        "is of a transfer of type 2 (SYNC), not 7 (PTHREAD)",
        "corrupt.state' is unusable",
        "shorter than a KVTree header",
    ] {
        assert!(err.contains(said), "missing {said:?} in:\n{err}");
    }
    // The good transfer of the same run committed, and its state file went with Free.
    assert_eq!(
        fs::read(dir.join("out/dst.dat")).unwrap(),
        b"checkpoint bytes\n"
    );
    assert!(!dir.join("sync.state").exists());
}

#[test]
fn axl_config_takes_what_scr_sends_and_refuses_unknown_keys() {
    let o = Command::new(&programs().config).output().unwrap();
    ok(&o);
    assert!(
        stderr(&o).contains("NO_SUCH_OPTION: unknown option"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn cancel_then_free_leaves_no_file_in_the_destination() {
    let s = Scratch::new();
    tree(&s, "cache", 12, 4 << 20);
    let o = piped(&mut tool(&s, &["cancel", "cache", "pfs"]));
    ok(&o);
    assert!(
        files_under(&s.path("pfs")).is_empty(),
        "{:?}",
        files_under(&s.path("pfs"))
    );
    assert_eq!(files_under(&s.path("cache")).len(), 12, "sources untouched");
}

/// `axl_tool flush STATE cache pfs`, each unit slowed down, SIGKILLed once some units are
/// durable (files of 8 MiB and more are journaled one by one; smaller ones in batches).
fn killed_flush(s: &Scratch) -> (PathBuf, PathBuf) {
    let src = tree(s, "cache", 6, 9 << 20);
    let state = s.path("pfs.state");
    let mut child = tool(s, &["flush", state.to_str().unwrap(), "cache", "pfs"])
        .env("FERRY_FAILPOINTS", "copy::unit_written=delay(300)")
        .env("FERRY_AXL_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    let td = TransferDir::new(&s.path(".pfs.state.ferry"), "xfer");
    wait_for(DEADLINE, || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the flush ended ({st}) before it could be killed");
        }
        ferry::status::status(&td).bytes_done > 0
    });
    child.kill().unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let st = ferry::status::status(&td);
    assert!(st.bytes_done < st.bytes_total, "{st:?}");
    // The state file is an AXL (KVTree) file, readable by AXL itself.
    assert_eq!(&fs::read(&state).unwrap()[..4], &[0x95, 0x1f, 0xc3, 0xf5]);
    (src, state)
}

#[test]
fn a_flush_killed_mid_way_is_resumed_from_its_state_file_to_identical_files() {
    let s = Scratch::new();
    let (src, state) = killed_flush(&s);
    let dst = s.path("pfs");
    // Only ferry's temporaries, and the killed run's destination lock file (in `.ferry`).
    assert!(
        files_under(&dst)
            .iter()
            .all(|p| temps_in(&dst).contains(p) || p.ends_with(".ferry/.dest.lock")),
        "no final file before the commit: {:?}",
        files_under(&dst)
    );
    // Someone else's file now sits at a final name (AXL would append to it and succeed).
    let victim = dst.join("d1/f1");
    fs::create_dir_all(victim.parent().unwrap()).unwrap();
    fs::write(&victim, vec![b'x'; 5000]).unwrap();
    let o = piped(tool(&s, &["resume", state.to_str().unwrap()]).env("AXL_DEBUG", "1"));
    ok(&o);
    assert!(stderr(&o).contains("re-created from"), "{}", stderr(&o));
    assert_same_tree(&src, &dst);
    assert!(temps_in(&dst).is_empty());
    assert!(!state.exists(), "Free removes the state file");
    assert!(!s.path(".pfs.state.ferry").exists(), "and ferry's journal");
}

#[test]
fn stop_after_a_restart_cancels_and_frees_what_the_killed_run_left() {
    let s = Scratch::new();
    let (src, state) = killed_flush(&s);
    let dst = s.path("pfs");
    assert!(!temps_in(&dst).is_empty());
    // The same program, restarted in the same place: AXL_Stop cleans the plate.
    let o = piped(&mut tool(&s, &["stop"]));
    ok(&o);
    assert!(files_under(&dst).is_empty(), "{:?}", files_under(&dst));
    assert!(!state.exists());
    assert!(!s.path(".pfs.state.ferry").exists());
    assert_eq!(files_under(&src).len(), 6, "sources untouched");
    // Nothing left to stop.
    ok(&piped(&mut tool(&s, &["stop"])));
}

/// `mpirun -n N scr_flush-like EXE CACHE PFS FILES MIB` in the scratch.
fn flush_cmd(s: &Scratch, exe: &Path, n: usize, files: u32, mib: u32) -> Command {
    let mut c = mpirun_exe(s, n, exe);
    c.env("FERRY_AXL_STATE_DIR", s.path("axl-state"))
        .args([s.path("cache"), s.path("pfs")])
        .args([files.to_string(), mib.to_string()]);
    c
}

fn scr_flush(s: &Scratch, n: usize, broken: Option<usize>) -> Output {
    let mut c = flush_cmd(s, &programs().scr_flush, n, 3, 4);
    if let Some(r) = broken {
        c.env("SCR_FLUSH_BREAK_RANK", r.to_string());
    }
    piped(&mut c)
}

#[test]
fn an_mpi_flush_commits_on_every_rank_only_after_all_succeeded() {
    let s = Scratch::new();
    let o = scr_flush(&s, 4, None);
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("flush of 4 ranks x 3 files: committed"),
        "{out}"
    );
    for r in 0..4 {
        assert_same_tree(
            &s.path(&format!("cache/rank{r}")),
            &s.path(&format!("pfs/ckpt.1/rank{r}")),
        );
    }
    assert!(s.path("pfs/ckpt.1/COMPLETE").exists());

    // Rank 2 cannot write its destination: no rank's checkpoint appears, none is marked.
    let s = Scratch::new();
    let o = scr_flush(&s, 4, Some(2));
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("failed, checkpoint not marked"), "{out}");
    assert!(
        stderr(&o).contains("ferry-axl rank 2: AXL_Wait(id 0)"),
        "{}",
        stderr(&o)
    );
    assert!(
        files_under(&s.path("pfs")).is_empty(),
        "{:?}",
        files_under(&s.path("pfs"))
    );
    assert!(
        files_under(&s.path("axl-state")).is_empty(),
        "Free cleaned up: {:?}",
        files_under(&s.path("axl-state"))
    );
}

/// `scr_flush` under `mpirun -n 2` in a scratch of its own (2 files of 1 MiB per rank), with
/// `ld_path` first on LD_LIBRARY_PATH; a success is checked for its checkpoint.
fn flush_2(exe: &Path, ld_path: Option<&Path>) -> Output {
    let run = Scratch::new();
    let mut c = flush_cmd(&run, exe, 2, 2, 1);
    // (cargo runs tests with its target directory, which holds ferry's libaxl*, on it)
    match ld_path {
        Some(p) => c.env("LD_LIBRARY_PATH", p),
        None => c.env_remove("LD_LIBRARY_PATH"),
    };
    let o = piped(&mut c);
    if o.status.success() {
        for r in 0..2 {
            assert_same_tree(
                &run.path(&format!("cache/rank{r}")),
                &run.path(&format!("pfs/ckpt.1/rank{r}")),
            );
        }
        assert!(
            run.path("pfs/ckpt.1/COMPLETE").exists(),
            "{}",
            exe.display()
        );
    }
    o
}

/// `scripts/install.sh PREFIX` with the libraries under test, then a CMake project that uses
/// `find_package(axl)` and AXL's four imported targets, and a pkg-config build.
#[test]
fn an_installed_ferry_serves_cmake_and_pkg_config_projects_built_for_axl() {
    let s = Scratch::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let prefix = s.path("prefix");
    let o = Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .arg(&prefix)
        .arg(libdir())
        .output()
        .unwrap();
    ok(&o);
    for f in [
        "bin/ferry",
        "lib/libaxl.so",
        "lib/libaxl.a",
        "lib/libaxl_mpi.so",
        "lib/libaxl_mpi.a",
        "include/axl.h",
        "include/axl_mpi.h",
        "share/axl/cmake/axlConfig.cmake",
        "share/axl/cmake/axlConfigVersion.cmake",
        "lib/pkgconfig/axl.pc",
        "lib/pkgconfig/axl_mpi.pc",
    ] {
        assert!(prefix.join(f).exists(), "{f} not installed");
    }
    let build = s.path("build");
    let cmake = |args: &[&str]| {
        let o = Command::new("cmake")
            .args(args)
            .env("CC", "mpicc")
            .current_dir(s.dir.path())
            .output()
            .unwrap();
        ok(&o);
    };
    cmake(&[
        "-S",
        root.join("mpi-tests/cmake-consumer").to_str().unwrap(),
        "-B",
        build.to_str().unwrap(),
        &format!("-DCMAKE_PREFIX_PATH={}", prefix.display()),
    ]);
    cmake(&["--build", build.to_str().unwrap(), "-j", "2"]);
    // The shared and the static MPI builds flush; the static serial tool copies.
    for exe in ["scr_flush", "scr_flush_static"] {
        let o = flush_2(&build.join(exe), None);
        ok(&o);
    }
    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(build.join("scr_flush_static"))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&dynamic.stdout).contains("libaxl"),
        "static means static"
    );

    // A program built against another libaxl_mpi.so (here a stub whose calls all fail), found
    // through its RUNPATH, runs on ferry's when ferry's lib directory comes first on
    // LD_LIBRARY_PATH: the run-time swap an already-built SCR gets.
    let stub = s.path("stub");
    fs::create_dir_all(&stub).unwrap();
    let cc = |args: &[&str]| {
        let o = Command::new("mpicc").args(args).output().unwrap();
        ok(&o);
    };
    let inc = format!("-I{}/include", prefix.display());
    cc(&[
        "-shared",
        "-fPIC",
        "-Wl,-soname,libaxl_mpi.so",
        &inc,
        "-o",
        stub.join("libaxl_mpi.so").to_str().unwrap(),
        root.join("mpi-tests/c/axl_stub.c").to_str().unwrap(),
    ]);
    let prebuilt = s.path("prebuilt_scr_flush");
    cc(&[
        &inc,
        "-o",
        prebuilt.to_str().unwrap(),
        root.join("docs/examples/scr_flush.c").to_str().unwrap(),
        &format!("-L{}", stub.display()),
        "-laxl_mpi",
        &format!("-Wl,-rpath,{}", stub.display()),
    ]);
    let o = flush_2(&prebuilt, None);
    assert!(
        !o.status.success() && stderr(&o).contains("original AXL stub"),
        "{}",
        stderr(&o)
    );
    ok(&flush_2(&prebuilt, Some(&prefix.join("lib"))));
    let src = tree(&s, "cache", 3, 1 << 20);
    let o = Command::new(build.join("axl_tool_static"))
        .args(["serial", "SYNC", "cache", "out"])
        .current_dir(s.dir.path())
        .env("FERRY_HOME", s.home())
        .env("FERRY_AXL_STATE_DIR", s.path("axl-state"))
        .output()
        .unwrap();
    ok(&o);
    assert_same_tree(&src, &s.path("out"));
    // pkg-config knows both libraries.
    let o = Command::new("pkg-config")
        .args(["--cflags", "--libs", "axl_mpi"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap();
    ok(&o);
    let flags = String::from_utf8_lossy(&o.stdout);
    assert!(
        flags.contains("-laxl_mpi") && flags.contains(&format!("-I{}/include", prefix.display())),
        "{flags}"
    );
}

/// `axl_tool flush STATE SRC DST` of a one-file checkpoint, SIGKILLed once its file is durable
/// under its temporary name (journaled), before its commit; `meanwhile` runs just before the
/// kill, while the flush is held there.
fn killed_one_file_flush(
    s: &Scratch,
    state: &str,
    src: &str,
    dst: &str,
    meanwhile: impl FnOnce(&Scratch),
) {
    let mut child = tool(s, &["flush", state, src, dst])
        .env("FERRY_FAILPOINTS", "commit::before_decision=delay(60000)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_tracked();
    let td = TransferDir::new(&s.path(&format!(".{state}.ferry")), "xfer");
    wait_for(DEADLINE, || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the flush ended ({st}) before it could be killed");
        }
        let st = ferry::status::status(&td);
        st.bytes_total > 0 && st.bytes_done == st.bytes_total
    });
    meanwhile(s);
    child.kill().unwrap();
    assert!(!child.wait_with_output().unwrap().status.success());
}

/// SCR's post-stage pattern, serially: two AXL transfers with their own state files flush into
/// one directory and are killed before their commit, then resumed from their state files, in
/// either order. Every AXL transfer with a state file is named `xfer`, but their temporary names
/// carry each plan's nonce: each resume commits its own bytes, never the other transfer's. A
/// third flush onto a final name one of them is writing is refused while that one runs.
#[test]
fn two_state_file_transfers_into_one_directory_never_trade_bytes() {
    for order in [["a", "b"], ["b", "a"]] {
        let s = Scratch::new();
        let mut r = Rng::new(21);
        write_file(&s.path("a/a.dat"), 3 << 20, &mut r);
        write_file(&s.path("b/b.dat"), 3 << 20, &mut r);
        write_file(&s.path("c/a.dat"), 3 << 20, &mut r);
        fs::create_dir_all(s.path("ckpt")).unwrap();
        // One file each, both into ckpt/ (as SCR adds each rank's files to ckpt.N/).
        killed_one_file_flush(&s, "a.state", "a/a.dat", "ckpt/a.dat", |s| {
            // While a runs, another flush of the name a.dat fails and writes nothing.
            let o = piped(&mut tool(s, &["flush", "c.state", "c/a.dat", "ckpt/a.dat"]));
            assert!(
                !o.status.success() && stderr(&o).contains("another ferry transfer"),
                "{}",
                stderr(&o)
            );
            assert!(!s.path("ckpt/a.dat").exists());
        });
        killed_one_file_flush(&s, "b.state", "b/b.dat", "ckpt/b.dat", |_| {});
        assert_eq!(temps_in(&s.path("ckpt")).len(), 2, "both staged in ckpt/");
        for t in order {
            ok(&piped(&mut tool(&s, &["resume", &format!("{t}.state")])));
            assert!(
                fs::read(s.path(&format!("ckpt/{t}.dat"))).unwrap()
                    == fs::read(s.path(&format!("{t}/{t}.dat"))).unwrap(),
                "the resumed transfer {t} committed its own bytes ({order:?})"
            );
        }
        assert!(temps_in(&s.path("ckpt")).is_empty());
        assert!(
            !s.path("ckpt/.ferry/.dest.lock").exists(),
            "no lock file left"
        );
    }
}

/// SCR's post-stage pattern under `mpirun -n 4`: one state file per rank, every rank flushing into
/// one directory, a rank killed after all dispatched (the job goes down), then the next job
/// restarts every rank's transfer from its state file: every file holds its own rank's bytes,
/// committed once, and no temporary file is left.
#[test]
fn scr_post_stage_with_a_state_file_per_rank_survives_a_killed_rank_and_a_restart() {
    let s = Scratch::new();
    let mut r = Rng::new(44);
    for k in 0..4 {
        write_file(&s.path(&format!("cache/rank{k}.ckpt")), 2 << 20, &mut r);
    }
    fs::create_dir_all(s.path("ckpt.1")).unwrap();
    fs::create_dir_all(s.path("scr")).unwrap();
    let exe = &programs().poststage;
    let o = piped(
        mpirun_exe(&s, 4, exe)
            .env("FERRY_AXL_STATE_DIR", s.path("axl-state"))
            .env("SCR_POSTSTAGE_KILL_RANK", "2")
            .args(["flush", "cache", "ckpt.1", "scr"]),
    );
    assert!(
        !o.status.success(),
        "the job was taken down by its killed rank"
    );
    // The killed rank's file is not at its final name; what is there is whole.
    assert!(!s.path("ckpt.1/rank2.ckpt").exists());
    assert!(s.path("scr/rank_2.state_file").exists());
    assert_no_torn_finals(&s.path("cache"), &s.path("ckpt.1"));
    let o = piped(
        mpirun_exe(&s, 4, exe)
            .env("FERRY_AXL_STATE_DIR", s.path("axl-state"))
            .args(["restart", "scr"]),
    );
    ok(&o);
    for k in 0..4 {
        let name = format!("rank{k}.ckpt");
        assert!(
            fs::read(s.path("ckpt.1").join(&name)).unwrap()
                == fs::read(s.path("cache").join(&name)).unwrap(),
            "{name} holds its own rank's bytes"
        );
    }
    assert!(temps_in(&s.path("ckpt.1")).is_empty());
}
