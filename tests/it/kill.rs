//! SIGKILL at random moments of a ~1 GiB copy, then resume, many times over: the end is always
//! identical, no final name ever holds a partial file, no commit record appears before every byte
//! is durable, and a resume re-copies only what was not journaled.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ferry::state::TransferDir;
use ferry::State;

use crate::util::*;

fn seed() -> u64 {
    let s = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill test seed: {s} (set FERRY_TEST_SEED to repeat)");
    s
}

/// Start `args`, wait for the id line, then until `bytes_done >= target` (or the run ends), and
/// SIGKILL it. Returns the id and whether the run finished before it could be killed.
fn run_and_kill(s: &Scratch, args: &[&str], state: &Path, target: u64) -> (String, bool) {
    let mut child = s
        .ferry()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn_tracked();
    let id = read_id(&mut child);
    let td = TransferDir::new(state, &id);
    let mut finished = false;
    wait_for(Duration::from_secs(120), || {
        if let Ok(Some(_)) = child.try_wait() {
            finished = true;
            return true;
        }
        ferry::status::status(&td).bytes_done >= target
    });
    let _ = child.kill();
    let st = child.wait().unwrap();
    if !finished {
        finished = st.success();
    }
    (id, finished)
}

#[test]
fn sigkill_at_random_moments_then_resume_converges() {
    let s = Scratch::new();
    let src = s.path("src");
    let mut r = Rng::new(seed());
    for i in 0..3 {
        write_file(&src.join(format!("big{i}.dat")), 256 << 20, &mut r);
    }
    write_file(&src.join("odd/size.dat"), (200 << 20) + 12345, &mut r);
    small_files(&src.join("small"), 6, 50, 64 << 10, r.next());
    let dst = s.path("dst");
    let state = dst.join(".ferry");
    let big: u64 = 3 * (256 << 20) + (200 << 20) + 12345;

    let mut id = String::new();
    let mut done = false;
    for round in 0..6 {
        // Mostly mid-copy, sometimes at the very start or the very end.
        let target = match round {
            0 => big / 3,
            1 => 0,
            3 => big * 99 / 100,
            _ => big / 20 + r.below(big * 9 / 10),
        };
        let (src_s, dst_s) = (
            src.to_str().unwrap().to_string(),
            dst.to_str().unwrap().to_string(),
        );
        let args: Vec<&str> = if round == 0 {
            vec![
                "copy",
                "--ranks",
                "2",
                "--threads",
                "2",
                "--chunk-size",
                "16MiB",
                &src_s,
                &dst_s,
            ]
        } else {
            vec![
                "resume",
                &id,
                "--ranks",
                if round % 2 == 0 { "3" } else { "1" },
            ]
        };
        let (got, finished) = run_and_kill(&s, &args, &state, target);
        id = got;
        // Invariants on the disk exactly as the kill left it.
        assert_no_torn_finals(&src, &dst);
        let td = TransferDir::new(&state, &id);
        let st = ferry::status::status(&td);
        if td.file("commit").exists() {
            assert_same_tree(&src, &dst);
            assert_eq!(st.state, State::Committed);
            done = true;
            break;
        }
        assert!(!finished, "the run ended without committing");
        assert_eq!(st.state, State::Interrupted, "after SIGKILL, round {round}");
    }
    eprintln!("committed during the kill rounds: {done}");
    if !done {
        let td = TransferDir::new(&state, &id);
        let before = ferry::status::status(&td).bytes_done;
        let o = s.run(&["resume", &id, "--json", "--ranks", "2"]);
        expect_code(&o, 0);
        let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        // Only what was not journaled is copied again.
        assert_eq!(sum["bytes_reused"].as_u64().unwrap(), before, "{sum}");
        let total = sum["bytes_total"].as_u64().unwrap();
        assert!(total > big);
        assert_eq!(
            sum["bytes_copied"].as_u64().unwrap(),
            total - before,
            "{sum}"
        );
    }
    assert_same_tree(&src, &dst);
    assert!(temps_in(&dst).is_empty());
    let v = s.run(&["verify", &id]);
    expect_code(&v, 0);
}
