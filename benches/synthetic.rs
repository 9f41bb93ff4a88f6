//! Synthetic plans for the benchmarks: `n` files of varied sizes in directories of 1,000, with
//! paths as long as a real checkpoint tree's (≈ 60 bytes).

use std::path::PathBuf;

use ferry::plan::{Entry, Kind, Layout, Plan};

/// `n` file entries (and their directories) under `/src/...` → `/dst/...`.
pub fn entries(n: usize) -> Vec<Entry> {
    let mut out = Vec::with_capacity(n + n / 1000 + 1);
    let entry = |kind, rel: String, size| Entry {
        kind,
        src: PathBuf::from(format!("/lustre/project/run-000042/checkpoint/{rel}")),
        dst: PathBuf::from(format!("/burst-buffer/job-1234567/checkpoint/{rel}")),
        size,
        mode: 0o644,
        mtime: (1_790_000_000, 0),
        target: None,
        holder: None,
        ino: 0,
        dev: 0,
        ctime: (0, 0),
        depth: rel.matches('/').count() as u16 + 1,
        in_dest: false,
    };
    for i in 0..n {
        if i % 1000 == 0 {
            out.push(entry(Kind::Dir, format!("d{:05}", i / 1000), 0));
        }
        // Mostly small files, every 100th one of 100 MiB.
        let size = if i % 100 == 0 {
            100 << 20
        } else {
            4096 + (i as u64 % 61) * 1024
        };
        out.push(entry(
            Kind::File,
            format!("d{:05}/f{i:08}.dat", i / 1000),
            size,
        ));
    }
    out
}

/// The plan ferry would make of `entries` (64 MiB chunks, shared layout, `ranks` ranks).
pub fn plan(entries: Vec<Entry>, ranks: usize) -> Plan {
    let units = ferry::plan::make_units(&entries, 64 << 20);
    Plan {
        format: ferry::plan::FORMAT,
        id: "bench".into(),
        layout: Layout::Shared,
        chunk_size: 64 << 20,
        ranks,
        created: String::new(),
        user: String::new(),
        host: String::new(),
        sources: vec!["/lustre/project/run-000042/checkpoint".into()],
        dest: "/burst-buffer/job-1234567/checkpoint".into(),
        delete_source: false,
        verify: false,
        preserve: false,
        nonce: String::new(),
        threads: 4,
        entries,
        units,
        entry_ids: Vec::new(),
        unit_ids: Vec::new(),
        whole: None,
    }
}
