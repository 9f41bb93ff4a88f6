#!/usr/bin/env bash
# Install what ferry's build, tests and demo need on a fresh Debian 12 machine.
# Idempotent: installs only what is missing; apt-get runs only if something is.
set -euo pipefail

need_pkgs=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Tools the Makefile, the tests and the demo call.
for pair in "gcc:gcc" "make:make" "cp:coreutils" "diff:diffutils" "rsync:rsync" "pkg-config:pkg-config"; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  have_cmd "$cmd" || need_pkgs+=("$pkg")
done

# MPI (the default `mpi` feature): Open MPI, and libclang + pkg-config for rsmpi's bindgen build.
have_cmd mpirun || need_pkgs+=(openmpi-bin)
have_cmd mpicc || need_pkgs+=(libopenmpi-dev)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || have_pkg libclang-dev || need_pkgs+=(libclang-dev)
# A one-node Slurm cluster for the srun tests (scripts/slurm-cluster.sh).
for pair in "slurmctld:slurmctld" "slurmd:slurmd" "sbatch:slurm-client" "munged:munge"; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  have_cmd "$cmd" || [ -x "/usr/sbin/$cmd" ] || need_pkgs+=("$pkg")
done
# make lint checks the job scripts of slurm/ and scripts/.
have_cmd shellcheck || need_pkgs+=(shellcheck)
# HDF5 (the `hdf5` feature: ferry gen, --verify-hdf5): Debian's libhdf5, found by pkg-config.
have_pkg libhdf5-dev || need_pkgs+=(libhdf5-dev)
# The AXL-compatibility tests build a C project with CMake's find_package(axl).
have_cmd cmake || need_pkgs+=(cmake)
# /usr/bin/time -v reports peak memory per rank (docs, issue notes).
[ -x /usr/bin/time ] || need_pkgs+=(time)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && ! have_cmd sudo; then
    echo "install-deps: missing packages ${need_pkgs[*]}; run as root or install them" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "install-deps: installing ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# Rust: Debian's rustc is too old for ferry (it needs Rust >= 1.89); a rustup toolchain is expected.
if ! have_cmd cargo; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! have_cmd cargo; then
  echo "install-deps: no cargo found. Install Rust (>= 1.89) with rustup: https://rustup.rs" >&2
  exit 1
fi
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "${rustc_minor:-0}" -lt 89 ]; then
  echo "install-deps: rustc $(rustc --version) is too old; ferry needs >= 1.89 (rustup update)" >&2
  exit 1
fi
for pair in "clippy:clippy" "fmt:rustfmt"; do
  sub=${pair%%:*}; comp=${pair##*:}
  if ! cargo "$sub" --version >/dev/null 2>&1 && have_cmd rustup; then
    rustup component add "$comp"
  fi
done
exit 0
