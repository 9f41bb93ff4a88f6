//! Micro-benchmarks (criterion): CRC32 throughput, building the plan of 1,000,000 synthetic files,
//! and the journal's append rate (records made durable per second, in batches as a run does).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "synthetic.rs"]
mod synthetic;

fn crc32(c: &mut Criterion) {
    let buf: Vec<u8> = (0..4 << 20).map(|i| (i * 31 % 251) as u8).collect();
    let mut g = c.benchmark_group("crc32");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("crc32fast, 4 MiB buffer", |b| {
        b.iter(|| crc32fast::hash(black_box(&buf)))
    });
    g.finish();
}

fn plan_building(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1_000_000));
    g.bench_function(
        "1,000,000 files: units, assignment to 4 ranks, encoding",
        |b| {
            b.iter(|| {
                let plan = synthetic::plan(synthetic::entries(1_000_000), 4);
                let all: Vec<u32> = (0..plan.n_units() as u32).collect();
                let shares = plan.assign(&all, 4).unwrap();
                let bytes = serde_json::to_vec(&plan).unwrap();
                black_box((shares, bytes.len()))
            })
        },
    );
    g.finish();
}

fn journal_appends(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("journal");
    const N: u32 = 4096;
    g.throughput(Throughput::Elements(N as u64));
    let mut attempt = 0;
    g.bench_function("4,096 unit records, fsynced in batches of 64", |b| {
        b.iter(|| {
            attempt += 1;
            let td = ferry::state::TransferDir::new(dir.path(), "j");
            std::fs::create_dir_all(&td.path).unwrap();
            let j = ferry::journal::Journal::create(&td, attempt, 0, 7).unwrap();
            for unit in 0..N {
                j.record(
                    ferry::journal::UnitDone {
                        unit,
                        len: 4096,
                        crc: unit,
                    },
                    None,
                    None,
                )
                .unwrap();
            }
            j.flush().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, crc32, plan_building, journal_appends);
criterion_main!(benches);
