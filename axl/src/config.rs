//! `AXL_Config`: the options arrive as a kvtree of the host's KVTree library (SCR links it). ferry
//! does not link KVTree; it reads the tree through the KVTree functions the process already has
//! (`dlsym`). Without them the options are accepted and left at their defaults, said once on
//! stderr when `AXL_DEBUG` is set.

use std::ffi::{c_char, c_void, CStr, CString};

use super::{atoi, complain, debug, lock, OPTIONS};

type ElemFirst = unsafe extern "C" fn(*const c_void) -> *mut c_void;
type ElemNext = unsafe extern "C" fn(*const c_void) -> *mut c_void;
type ElemKey = unsafe extern "C" fn(*const c_void) -> *mut c_char;
type ElemHash = unsafe extern "C" fn(*const c_void) -> *mut c_void;
type New = unsafe extern "C" fn() -> *mut c_void;
type SetKv = unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> *mut c_void;

struct Kv {
    first: ElemFirst,
    next: ElemNext,
    key: ElemKey,
    hash: ElemHash,
    new: New,
    set_kv: SetKv,
}

fn sym(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn kvtree_api() -> Option<Kv> {
    // SAFETY: each symbol, when present, is the KVTree function of that name, whose C signature
    // is the type it is cast to (kvtree.h of KVTree v1.x).
    unsafe {
        Some(Kv {
            first: std::mem::transmute::<*mut c_void, ElemFirst>(sym(c"kvtree_elem_first")?),
            next: std::mem::transmute::<*mut c_void, ElemNext>(sym(c"kvtree_elem_next")?),
            key: std::mem::transmute::<*mut c_void, ElemKey>(sym(c"kvtree_elem_key")?),
            hash: std::mem::transmute::<*mut c_void, ElemHash>(sym(c"kvtree_elem_hash")?),
            new: std::mem::transmute::<*mut c_void, New>(sym(c"kvtree_new")?),
            set_kv: std::mem::transmute::<*mut c_void, SetKv>(sym(c"kvtree_set_kv")?),
        })
    }
}

/// The keys a set may carry at the top level, and under `id/<n>/`.
const GLOBAL: [&str; 6] = [
    "FILE_BUF_SIZE",
    "DEBUG",
    "MKDIR",
    "USE_EXTENSION",
    "COPY_METADATA",
    "RANK",
];
const PER_ID: [&str; 4] = ["FILE_BUF_SIZE", "MKDIR", "USE_EXTENSION", "COPY_METADATA"];
const FERRY_THREADS: &str = "FERRY_THREADS";

/// Children of a tree: (key, subtree).
///
/// # Safety
/// `t` is NULL or a live kvtree.
unsafe fn children(kv: &Kv, t: *const c_void) -> Vec<(String, *mut c_void)> {
    let mut out = Vec::new();
    if t.is_null() {
        return out;
    }
    // SAFETY: walking a live kvtree with its own functions.
    unsafe {
        let mut e = (kv.first)(t);
        while !e.is_null() {
            let k = (kv.key)(e);
            if !k.is_null() {
                out.push((
                    CStr::from_ptr(k).to_string_lossy().into_owned(),
                    (kv.hash)(e),
                ));
            }
            e = (kv.next)(e);
        }
    }
    out
}

/// The value under a key's subtree (its first key).
///
/// # Safety
/// `t` is NULL or a live kvtree.
unsafe fn value(kv: &Kv, t: *const c_void) -> Option<String> {
    // SAFETY: as for `children`.
    unsafe { children(kv, t) }
        .into_iter()
        .next()
        .map(|(k, _)| k)
}

/// Set (`config` non-NULL: returns it, or NULL for an unknown key) or get (NULL: a new tree
/// of the current values, the caller's to delete).
///
/// # Safety
/// `config` is NULL or a live kvtree.
pub unsafe fn apply(config: *const c_void) -> *mut c_void {
    let Some(kv) = kvtree_api() else {
        if config.is_null() {
            complain(
                "AXL_Config",
                None,
                "cannot report the options: no KVTree library in this process",
            );
            return std::ptr::null_mut();
        }
        debug(1, || {
            "AXL_Config: no KVTree library in this process: options left as they are".into()
        });
        return config as *mut c_void;
    };
    if config.is_null() {
        // SAFETY: building a new tree with the host's KVTree.
        return unsafe { get(&kv) };
    }
    let mut ok = true;
    // SAFETY: `config` is a live kvtree.
    for (key, sub) in unsafe { children(&kv, config) } {
        if key == "id" {
            // SAFETY: as above.
            for (n, opts) in unsafe { children(&kv, sub) } {
                let known = n
                    .parse::<i32>()
                    .is_ok_and(|n| lock(&super::TABLE).handles.contains_key(&n));
                if !known {
                    complain("AXL_Config", None, format!("id/{n}: no such transfer"));
                    ok = false;
                }
                // SAFETY: as above.
                for (k, _) in unsafe { children(&kv, opts) } {
                    if !PER_ID.contains(&k.as_str()) {
                        complain("AXL_Config", None, format!("id/{n}/{k}: unknown option"));
                        ok = false;
                    }
                }
            }
            continue;
        }
        // SAFETY: as above.
        let Some(v) = (unsafe { value(&kv, sub) }) else {
            complain("AXL_Config", None, format!("{key}: no value"));
            ok = false;
            continue;
        };
        let mut o = lock(&OPTIONS);
        match key.as_str() {
            "FILE_BUF_SIZE" => o.file_buf_size = v.trim().parse().unwrap_or(o.file_buf_size),
            "DEBUG" => o.debug = atoi(&v) as i32,
            "MKDIR" => o.mkdir = atoi(&v) != 0,
            "USE_EXTENSION" => o.use_extension = atoi(&v) != 0,
            "COPY_METADATA" => o.copy_metadata = atoi(&v) != 0,
            "RANK" => o.rank = atoi(&v) as i32,
            FERRY_THREADS if atoi(&v) > 0 => o.threads = atoi(&v) as usize,
            _ => {
                drop(o);
                complain("AXL_Config", None, format!("{key}: unknown option"));
                ok = false;
            }
        }
    }
    if ok {
        config as *mut c_void
    } else {
        std::ptr::null_mut()
    }
}

/// A new tree with the global options.
///
/// # Safety
/// `kv` are the host's KVTree functions.
unsafe fn get(kv: &Kv) -> *mut c_void {
    let o = lock(&OPTIONS).clone();
    let vals = [
        o.file_buf_size.to_string(),
        o.debug.to_string(),
        u8::from(o.mkdir).to_string(),
        u8::from(o.use_extension).to_string(),
        u8::from(o.copy_metadata).to_string(),
        o.rank.to_string(),
    ];
    // SAFETY: kvtree_new and kvtree_set_kv copy the strings they are given.
    unsafe {
        let t = (kv.new)();
        for (k, v) in GLOBAL
            .iter()
            .zip(vals.iter())
            .chain([(&FERRY_THREADS, &o.threads.to_string())])
        {
            let (k, v) = (
                CString::new(*k).unwrap_or_default(),
                CString::new(v.as_str()).unwrap_or_default(),
            );
            (kv.set_kv)(t, k.as_ptr(), v.as_ptr());
        }
        t
    }
}
