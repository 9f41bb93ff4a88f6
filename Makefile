# ferry — the two commands a new machine needs: `make demo` and `make test`.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(CURDIR)/target
CARGO ?= cargo
# Integration tests copy GiBs; keep their scratch space on the same disk as the checkout.
export FERRY_TEST_TMP ?= $(CARGO_TARGET_DIR)/test-tmp

.PHONY: all deps build release test lint unit demo clean crash-matrix bench install
PREFIX ?= /usr/local
# The AXL-compatible C libraries (libaxl, libaxl_mpi), built apart from the ferry binary so
# that libaxl does not link MPI.
AXL_CRATES := -p ferry-axl -p ferry-axl-mpi
# HDF5 (ferry gen, --verify-hdf5) for the demo, the benchmarks, the tests and `make release`;
# `make release FEATURES=` builds without libhdf5.
FEATURES ?= --features hdf5

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build

release: deps
	$(CARGO) build --release $(FEATURES)
	$(CARGO) build --release $(AXL_CRATES)

# bin/ferry, lib/libaxl{,_mpi}.{so,a}, include/axl{,_mpi}.h, share/axl/cmake (find_package(axl))
# and lib/pkgconfig under PREFIX.
install: release
	bash scripts/install.sh $(PREFIX) $(CARGO_TARGET_DIR)/release

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --features failpoints,hdf5 -- -D warnings
	$(CARGO) clippy --workspace --all-targets --no-default-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --quiet
	shellcheck -S warning -x -P slurm slurm/*.sbatch slurm/*.sh scripts/*.sh

# Every test: unit tests, the integration suite (real binary, in-process ranks, SIGKILL and
# failpoint crashes), mpi-tests/ (the real binary under mpirun -n 1..8 and srun, and the job
# scripts of slurm/ submitted with sbatch, one of them stopped by its time-limit warning) and the PR tier
# of the crash matrix, and the AXL-compatible C libraries (KVTree unit tests; C programs built
# with mpicc and CMake against them, in mpi-tests/axl.rs). One build with the failpoints feature
# serves all of them. A one-node Slurm cluster (scripts/slurm-cluster.sh) runs
# for the srun tests and is stopped afterwards.
test: deps lint
	mkdir -p $(FERRY_TEST_TMP)
	$(CARGO) build $(AXL_CRATES) --features ferry-axl/failpoints,ferry-axl-mpi/failpoints
	$(CARGO) test -p ferry-axl --features failpoints --lib
	set -e; cluster=$$(bash scripts/slurm-cluster.sh start) || { \
	  echo "make test: the one-node Slurm cluster did not start (see $${FERRY_SLURM_DIR:-/tmp/ferry-slurm}/log)" >&2; \
	  bash scripts/slurm-cluster.sh stop; exit 1; }; eval "$$cluster"; \
	  trap 'bash scripts/slurm-cluster.sh stop' EXIT; \
	  FERRY_REQUIRE_SLURM=1 $(CARGO) test --features failpoints,hdf5 --lib --bins \
	    --test it --test mpi -- --test-threads 2
	$(CARGO) test --features failpoints,hdf5 --test crash_matrix -- --nocapture
	bash scripts/smoke-without-hdf5.sh
	rm -rf $(FERRY_TEST_TMP)

# Every failpoint x hit (first, middle, last) x victim rank x action (exit, EIO, ENOSPC, EACCES,
# panic), on 1 and 4 in-process ranks and a subset under mpirun -n 4; one JSON line per cell in
# target/crash-matrix.jsonl, and the line `cells: N, survived: S, safe-fail: F, violations: V`;
# beside it the hostile matrix (crash-matrix/hostile.rs: foreign files, stale finals, sources
# changed, two transfers in one directory, failed syncs on every rank, swapped state, verify
# failures; target/hostile-matrix.jsonl and `hostile cells: N, ...`); then the hostile tests.
crash-matrix: deps
	mkdir -p $(FERRY_TEST_TMP)
	FERRY_CRASH_TIER=full $(CARGO) test --features failpoints,hdf5 --test crash_matrix -- --nocapture
	# The hostile-world tests (docs/failure-analysis.md), also part of `make test`.
	$(CARGO) test --features failpoints,hdf5 --test it -- hostile security::a_hard_link hdf5::a_failed
	rm -rf $(FERRY_TEST_TMP)

# Benchmarks (root, 2 cores, ~40 min at full scale; FERRY_BENCH_SCALE=0.1 for a quick look):
# criterion micro-benchmarks, plan building at 1e6 and 1e7 files, then the end-to-end
# comparison with cp, rsync and the raw limit. Tables go to target/bench/*.md.
bench: deps
	mkdir -p $(CARGO_TARGET_DIR)/bench
	$(CARGO) bench $(FEATURES) --bench micro 2>&1 | tee $(CARGO_TARGET_DIR)/bench/micro.txt
	$(CARGO) bench $(FEATURES) --bench scale | tee $(CARGO_TARGET_DIR)/bench/scale.md
	$(CARGO) bench $(FEATURES) --bench e2e

demo: release
	bash scripts/demo.sh

clean:
	$(CARGO) clean
