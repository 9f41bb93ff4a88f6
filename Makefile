# ferry — the two commands a new machine needs: `make demo` and `make test`.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(CURDIR)/target
CARGO ?= cargo
# Integration tests copy GiBs; keep their scratch space on the same disk as the checkout.
export FERRY_TEST_TMP ?= $(CARGO_TARGET_DIR)/test-tmp

.PHONY: all deps build release test lint unit demo clean

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build

release: deps
	$(CARGO) build --release

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --features failpoints -- -D warnings
	$(CARGO) clippy --all-targets --no-default-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --quiet

# Every test: unit tests, the integration suite (real binary, in-process ranks, SIGKILL and
# failpoint crashes) and mpi-tests/ (the real binary under mpirun -n 1..8). One build with the
# failpoints feature serves all of them. A one-node Slurm cluster (scripts/slurm-cluster.sh) runs
# for the srun tests and is stopped afterwards.
test: deps lint
	mkdir -p $(FERRY_TEST_TMP)
	set -e; eval "$$(bash scripts/slurm-cluster.sh start)"; \
	  trap 'bash scripts/slurm-cluster.sh stop' EXIT; \
	  FERRY_REQUIRE_SLURM=1 $(CARGO) test --features failpoints -- --test-threads 2
	rm -rf $(FERRY_TEST_TMP)

demo: release
	bash scripts/demo.sh

clean:
	$(CARGO) clean
