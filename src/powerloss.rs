//! A power-loss model for crash tests (cargo feature `failpoints`): what would survive if the
//! machine lost power now, as opposed to SIGKILL, which keeps the page cache.
//!
//! With `FERRY_POWERLOSS_ROOT=DIR` set, the model starts from everything under DIR (taken as
//! durable) and follows the only two things that make state durable, both in [`crate::fsio`]: a
//! file fsync makes that inode's current bytes durable; a directory fsync makes that directory's
//! current entries durable (new names, renames and removals in it). The `powerloss` failpoint
//! action writes the model beside DIR and ends the process; [`apply`], called by the test after
//! the process is gone, rewrites DIR to the durable state: entries never made durable vanish,
//! entries removed or renamed without a directory fsync come back, and a file's bytes are those of
//! its last fsync — zeros of the same length if it was never fsynced, the worst a size check can
//! be fooled by. Metadata (modes, times) is not modelled. Writes nothing unless configured.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Node {
    File { ino: u64 },
    Dir,
    Link { ino: u64, target: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Model {
    root: String,
    /// Durable directory entries: path → what it names.
    entries: BTreeMap<String, Node>,
    /// Durable bytes of each inode.
    data: HashMap<u64, Vec<u8>>,
}

static MODEL: Mutex<Option<Model>> = Mutex::new(None);

/// Renames and removals ([`op_guard`], shared) against the whole-tree snapshot of a `syncfs`
/// ([`fs_synced`], exclusive): a snapshot taken while another rank thread renames a temporary
/// file to its final name would see neither name, and the model would lose a file whose data
/// an earlier `syncfs` had made durable.
static OPS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by `fsio` around a rename or a removal while a model runs.
pub fn op_guard() -> Option<std::sync::RwLockReadGuard<'static, ()>> {
    let active = MODEL.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    active.then(|| OPS.read().unwrap_or_else(|e| e.into_inner()))
}

fn key(p: &Path) -> String {
    crate::pathser::encode(p)
}

fn node_of(p: &Path) -> Option<Node> {
    let md = fs::symlink_metadata(p).ok()?;
    Some(if md.file_type().is_symlink() {
        Node::Link {
            ino: md.ino(),
            target: key(&fs::read_link(p).ok()?),
        }
    } else if md.is_dir() {
        Node::Dir
    } else {
        Node::File { ino: md.ino() }
    })
}

fn snapshot(m: &mut Model, dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Some(node) = node_of(&p) else { continue };
        match &node {
            Node::Dir => snapshot(m, &p),
            Node::File { ino } => {
                if let Ok(b) = fs::read(&p) {
                    m.data.insert(*ino, b);
                }
            }
            Node::Link { .. } => {}
        }
        m.entries.insert(key(&p), node);
    }
}

/// Start the model if `FERRY_POWERLOSS_ROOT` is set (once per process).
pub fn start_if_configured() {
    if let Some(root) = std::env::var_os("FERRY_POWERLOSS_ROOT") {
        start(Path::new(&root));
    }
}

/// Start the model of `root`: what is there now counts as durable.
pub fn start(root: &Path) {
    let mut g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        let mut m = Model {
            root: key(root),
            ..Model::default()
        };
        snapshot(&mut m, root);
        *g = Some(m);
    }
}

fn under_root(m: &Model, p: &Path) -> bool {
    crate::pathser::decode(&m.root).is_ok_and(|r| p.starts_with(r))
}

/// A file's current bytes became durable (called by `fsio` after a successful fsync).
pub fn file_synced(path: &Path) {
    // A pinned transfer directory is reached through /proc/self/fd: the model keeps real paths.
    let path = &crate::state::shown(path);
    let mut g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(m) = g.as_mut() else { return };
    if !under_root(m, path) {
        return;
    }
    if let (Ok(md), Ok(b)) = (fs::metadata(path), fs::read(path)) {
        m.data.insert(md.ino(), b);
    }
}

/// Everything on the file system became durable (called by `fsio` after a `syncfs`; the model
/// takes its whole tree, which tests keep on one file system).
pub fn fs_synced() {
    let _no_renames = OPS.write().unwrap_or_else(|e| e.into_inner());
    let mut g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(m) = g.as_mut() else { return };
    let Ok(root) = crate::pathser::decode(&m.root) else {
        return;
    };
    m.entries.clear();
    m.data.clear();
    snapshot(m, &root);
}

/// A directory's current entries became durable (called by `fsio` after a directory fsync).
pub fn dir_synced(dir: &Path) {
    // A pinned transfer directory is reached through /proc/self/fd: the model keeps real paths.
    let dir = &crate::state::shown(dir);
    let mut g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(m) = g.as_mut() else { return };
    if !under_root(m, dir) {
        return;
    }
    let prefix = key(dir);
    // Forget the directory's old children (their subtrees stay until their own fsyncs).
    let gone: Vec<String> = m
        .entries
        .keys()
        .filter(|k| {
            crate::pathser::decode(k)
                .ok()
                .and_then(|p| p.parent().map(|q| key(q) == prefix))
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    for k in gone {
        m.entries.remove(&k);
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Some(node) = node_of(&e.path()) {
                m.entries.insert(key(&e.path()), node);
            }
        }
    }
}

/// Where the model of `root` is written at a power-loss failpoint.
pub fn model_path(root: &Path) -> PathBuf {
    let mut s = root.as_os_str().to_os_string();
    s.push(".powerloss.json");
    PathBuf::from(s)
}

/// Write the model (at the crash point; the process ends right after).
pub fn dump() {
    let g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = g.as_ref() {
        if let (Ok(root), Ok(json)) = (crate::pathser::decode(&m.root), serde_json::to_vec(m)) {
            let _ = fs::write(model_path(&root), json);
        }
    }
}

/// Where unlinked files are kept (hard links, so the inode lives on) until the crash: a power
/// loss brings back a removal that no directory fsync made durable, with the same inode.
fn stash_dir(root: &Path) -> PathBuf {
    let mut s = root.as_os_str().to_os_string();
    s.push(".powerloss-stash");
    PathBuf::from(s)
}

/// Remove what a run left for the model of `root` (the model and the stash).
pub fn clear(root: &Path) {
    let _ = fs::remove_file(model_path(root));
    let _ = fs::remove_dir_all(stash_dir(root));
}

/// A file is about to be unlinked (called by `fsio`): keep its inode reachable.
pub fn before_unlink(path: &Path) {
    // A pinned transfer directory is reached through /proc/self/fd: the model keeps real paths.
    let path = &crate::state::shown(path);
    let g = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(m) = g.as_ref() else { return };
    if !under_root(m, path) {
        return;
    }
    let Ok(md) = fs::symlink_metadata(path) else {
        return;
    };
    if md.is_dir() {
        return;
    }
    if let Ok(root) = crate::pathser::decode(&m.root) {
        let stash = stash_dir(&root);
        let _ = fs::create_dir_all(&stash);
        let _ = fs::hard_link(path, stash.join(md.ino().to_string()));
    }
}

/// Rewrite `root` to the durable state the model of the dead process recorded. Returns what it
/// changed (for the test's log).
pub fn apply(root: &Path) -> Result<Vec<String>, String> {
    let raw = fs::read(model_path(root)).map_err(|e| format!("no power-loss model: {e}"))?;
    let m: Model = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
    let mut changed = Vec::new();
    // An entry survives only if every directory above it (below the root) survives too.
    let live = |p: &Path| -> bool {
        let mut q = p.parent();
        while let Some(d) = q {
            if d == root {
                return true;
            }
            if m.entries.get(&key(d)) != Some(&Node::Dir) {
                return false;
            }
            q = d.parent();
        }
        false
    };
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.clone());
                if fs::symlink_metadata(&p).is_ok_and(|md| md.is_dir()) {
                    walk(&p, out);
                }
            }
        }
    }
    let stash = stash_dir(root);
    let mut real = Vec::new();
    walk(root, &mut real);
    // Every inode still reachable, by a name in the tree or in the stash of unlinked files.
    let mut by_ino: HashMap<u64, PathBuf> = HashMap::new();
    let mut stashed = Vec::new();
    walk(&stash, &mut stashed);
    for p in real.iter().chain(stashed.iter()) {
        if let Ok(md) = fs::symlink_metadata(p) {
            if !md.is_dir() {
                by_ino.entry(md.ino()).or_insert_with(|| p.clone());
            }
        }
    }
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let remove = |p: &Path| -> Result<(), String> {
        match fs::symlink_metadata(p) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(p).map_err(|e| err(p, e)),
            Ok(_) => fs::remove_file(p).map_err(|e| err(p, e)),
            Err(_) => Ok(()),
        }
    };
    // 1. Every durable entry is there again, files with their own inode where it still exists
    //    (parents first: keys sort that way).
    for (k, node) in &m.entries {
        let p = crate::pathser::decode(k)?;
        if !live(&p) || node_of(&p).as_ref() == Some(node) {
            continue;
        }
        if fs::symlink_metadata(&p).is_ok() && !(matches!(node, Node::Dir) && p.is_dir()) {
            // Keep a file's inode reachable if the durable state wants it elsewhere.
            remove(&p)?;
        }
        match node {
            Node::Dir => {
                if !p.is_dir() {
                    fs::create_dir(&p).map_err(|e| err(&p, e))?;
                }
            }
            // A symlink, like a file, comes back with its own inode when it is still reachable.
            Node::Link { ino, target } => match by_ino.get(ino) {
                Some(from) if fs::symlink_metadata(from).is_ok() => {
                    fs::hard_link(from, &p).map_err(|e| err(&p, e))?
                }
                _ => std::os::unix::fs::symlink(crate::pathser::decode(target)?, &p)
                    .map_err(|e| err(&p, e))?,
            },
            Node::File { ino } => match by_ino.get(ino) {
                Some(from) if fs::symlink_metadata(from).is_ok() => {
                    fs::hard_link(from, &p).map_err(|e| err(&p, e))?
                }
                _ => fs::write(&p, b"").map_err(|e| err(&p, e))?,
            },
        }
        changed.push(format!("restored {}", p.display()));
    }
    // 2. What is on disk but was never durable goes (children before parents).
    let mut now = Vec::new();
    walk(root, &mut now);
    now.sort_by(|a, b| b.cmp(a));
    for p in &now {
        let durable = m.entries.get(&key(p)).filter(|_| live(p));
        if durable.is_none() && fs::symlink_metadata(p).is_ok() {
            remove(p)?;
            changed.push(format!("dropped {}", p.display()));
        }
    }
    // 3. Each durable file holds the bytes of its last fsync (zeros if it never had one).
    for (k, node) in &m.entries {
        let p = crate::pathser::decode(k)?;
        let Node::File { ino } = node else { continue };
        if !live(&p) {
            continue;
        }
        let want = match m.data.get(ino) {
            Some(b) => b.clone(),
            None => vec![0u8; fs::metadata(&p).map(|md| md.len() as usize).unwrap_or(0)],
        };
        if fs::read(&p).ok().as_ref() != Some(&want) {
            // Rewrite in place: the inode stays the one the durable entry names.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&p)
                .map_err(|e| err(&p, e))?;
            std::io::Write::write_all(&mut f, &want).map_err(|e| err(&p, e))?;
            changed.push(format!("reverted {} to its durable bytes", p.display()));
        }
    }
    let _ = fs::remove_dir_all(&stash);
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio;
    use std::io::Write;

    /// The model is one per process: its tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn a_syncfs_snapshot_never_misses_a_file_another_thread_renames() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("w");
        fs::create_dir(&root).unwrap();
        let (a, b) = (root.join("temp"), root.join("final"));
        fs::write(&a, b"durable bytes").unwrap();
        start(&root);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    fsio::rename(&a, &b).unwrap();
                    fsio::rename(&b, &a).unwrap();
                }
            });
            for i in 0..5000 {
                fs_synced();
                let g = MODEL.lock().unwrap();
                let m = g.as_ref().unwrap();
                let seen = [&a, &b]
                    .iter()
                    .filter(|p| m.entries.contains_key(&key(p)))
                    .count();
                let data = m.data.values().any(|v| v == b"durable bytes");
                if seen != 1 || !data {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    panic!("snapshot {i} saw {seen} of the two names, data kept: {data}");
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        *MODEL.lock().unwrap() = None;
        clear(&root);
    }

    #[test]
    fn a_power_loss_keeps_exactly_what_was_fsynced() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("w");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("old"), b"before the run").unwrap();
        let old_ino = fs::metadata(root.join("old")).unwrap().ino();
        std::os::unix::fs::symlink("old", root.join("ln")).unwrap();
        let ln_ino = fs::symlink_metadata(root.join("ln")).unwrap().ino();
        start(&root);

        // Its name made durable, its bytes never synced: zeros of the same length.
        fs::write(root.join("unsynced"), b"abc").unwrap();
        // Written, file and directory synced: kept, with the synced bytes only.
        let mut f = fs::File::create(root.join("kept")).unwrap();
        f.write_all(b"synced").unwrap();
        fsio::sync_data(&f, &root.join("kept")).unwrap();
        fsio::fsync_dir(&root).unwrap();
        // Written after the last directory fsync: gone.
        fs::write(root.join("volatile"), b"x").unwrap();
        f.write_all(b" and not").unwrap();
        // Renamed without a directory fsync: the old name comes back, the new one goes.
        fsio::rename(&root.join("kept"), &root.join("renamed")).unwrap();
        // Unlinked without a directory fsync: back, same inode.
        fsio::remove_file(&root.join("old")).unwrap();
        fsio::remove_file(&root.join("ln")).unwrap();
        dump();
        let changes = apply(&root).unwrap();
        assert!(changes.len() >= 4, "{changes:?}");

        assert!(!root.join("volatile").exists());
        assert_eq!(fs::read(root.join("unsynced")).unwrap(), vec![0u8; 3]);
        assert!(!root.join("renamed").exists());
        assert_eq!(fs::read(root.join("kept")).unwrap(), b"synced");
        assert_eq!(fs::read(root.join("old")).unwrap(), b"before the run");
        assert_eq!(fs::metadata(root.join("old")).unwrap().ino(), old_ino);
        assert_eq!(fs::symlink_metadata(root.join("ln")).unwrap().ino(), ln_ino);
        *MODEL.lock().unwrap() = None;
        clear(&root);
    }
}
