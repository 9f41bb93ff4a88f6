#!/usr/bin/env bash
# What ferry's build, tests and demo need on a Debian 12 machine, installed and then proved.
#
#   scripts/install-deps.sh           install the Debian packages that are absent, then check
#   scripts/install-deps.sh --check   only check, install nothing (exit 1 naming what is missing)
#
# Idempotent: apt-get runs only when a package is absent. "Absent" is decided by dpkg's status of
# the package by name, never by a file-name glob: `ls /usr/lib/llvm-*/lib/libclang*.so*` once
# matched libclang-cpp.so.14 (a C++ library bindgen cannot use) on a fresh machine, and a command
# on the PATH (mpicc, cmake) does not prove that the package with the headers or libraries is there.
# After installing, every requirement is checked by what it must do: libclang is loaded the way
# bindgen loads it and parses <mpi.h>, mpicc compiles, links and runs an MPI program on 2 ranks,
# HDF5 compiles and links through pkg-config, the Slurm and munge daemons answer --version.
#
# The machine must have beforehand only a Rust toolchain >= 1.89 from rustup and root (or sudo)
# for apt-get; everything else comes from Debian's packages.
set -euo pipefail

mode=install
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "install-deps: unknown argument '$1' (use --check or nothing)" >&2; exit 2 ;;
esac

# Each package, and what needs it. Decided by `dpkg-query` status, by name.
PKGS=(
  ca-certificates      # cargo's downloads from crates.io over TLS
  gcc libc6-dev        # the linker for rustc, the cc crate, mpicc's compiler
  binutils             # readelf (the AXL library-swap test)
  make
  pkg-config           # how the mpi and hdf5 builds find their libraries
  coreutils diffutils findutils procps rsync time util-linux mount
  #                      tools the tests and scripts call: cmp, diff, find, pgrep, rsync,
  #                      /usr/bin/time -v, setpriv, mount (tmpfs and read-only faults)
  openmpi-bin          # mpirun
  libopenmpi-dev       # mpi.h, libmpi.so, ompi.pc, mpicc's wrapper data
  libclang-dev         # libclang.so and clang's own headers, for rsmpi's bindgen
  libhdf5-dev          # the hdf5 feature: libhdf5, hdf5.h, hdf5.pc
  cmake                # the AXL tests build a C project with find_package(axl)
  munge slurmctld slurmd slurm-client   # the one-node Slurm cluster of the srun tests
  shellcheck           # make lint checks the job scripts
)

have_pkg() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
have_cmd() { command -v "$1" >/dev/null 2>&1; }

if [ "$mode" = install ]; then
  missing=()
  for p in "${PKGS[@]}"; do have_pkg "$p" || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      have_cmd sudo || { echo "install-deps: missing packages ${missing[*]}; run as root or install them" >&2; exit 1; }
      SUDO=sudo
    fi
    echo "install-deps: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# ---- checks by function --------------------------------------------------------------------
failed=()
fail() { failed+=("$1"); echo "install-deps: MISSING: $1" >&2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-deps.XXXXXX")
trap 'rm -rf "$work"' EXIT

for p in "${PKGS[@]}"; do have_pkg "$p" || fail "Debian package $p is not installed (apt-get install $p)"; done

# A C compiler that links a program.
printf '#include <stdio.h>\nint main(void){puts("ok");return 0;}\n' > "$work/hello.c"
if ! { gcc -o "$work/hello" "$work/hello.c" && [ "$("$work/hello")" = ok ]; } >/dev/null 2>&1; then
  fail "gcc cannot compile and link a C program (packages gcc, libc6-dev)"
fi

# Open MPI: pkg-config knows it, mpicc builds a program, mpirun runs it on 2 ranks.
pkg-config --exists ompi 2>/dev/null || fail "pkg-config does not know 'ompi' (package libopenmpi-dev)"
cat > "$work/mpi.c" <<'C'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
  int rank, size;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int sum = 0;
  MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) printf("%d %d\n", size, sum);
  MPI_Finalize();
  return 0;
}
C
if ! mpicc -o "$work/mpi" "$work/mpi.c" >"$work/mpicc.log" 2>&1; then
  fail "mpicc cannot compile and link an MPI program (packages libopenmpi-dev, gcc): $(head -c 300 "$work/mpicc.log")"
else
  out=$(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        timeout 60 mpirun --oversubscribe -n 2 "$work/mpi" 2>"$work/mpirun.log" || true)
  [ "$out" = "2 1" ] || fail "mpirun -n 2 of an MPI program did not run (package openmpi-bin): $(head -c 300 "$work/mpirun.log")"
fi

# libclang as bindgen (clang-sys) loads it: LIBCLANG_PATH, then llvm-config's libdir, then the
# llvm-*/lib and multiarch directories; only libclang.so, libclang-N.so* and libclang.so.N count
# (never libclang-cpp). The library found must load and parse a file that includes <mpi.h> with
# Open MPI's flags without an error, which needs clang's own headers (stddef.h) too.
libclang=""
dirs=()
[ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
have_cmd llvm-config && dirs+=("$(llvm-config --libdir)")
for d in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do dirs+=("$d"); done
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  for f in "$d"/libclang.so "$d"/libclang-[0-9]*.so* "$d"/libclang.so.[0-9]*; do
    if [ -e "$f" ]; then libclang=$f; break 2; fi
  done
done
if [ -z "$libclang" ]; then
  fail "no libclang.so / libclang-<N>.so for bindgen in ${dirs[*]} (package libclang-dev)"
else
  cat > "$work/clang.c" <<'C'
#include <dlfcn.h>
#include <stdio.h>
typedef void *(*create_index_t)(int, int);
typedef void *(*parse_t)(void *, const char *, const char *const *, int, void *, unsigned, unsigned);
typedef unsigned (*num_diag_t)(void *);
typedef void *(*get_diag_t)(void *, unsigned);
typedef int (*severity_t)(void *);
int main(int argc, char **argv) {
  void *lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
  create_index_t create_index = (create_index_t)dlsym(lib, "clang_createIndex");
  parse_t parse = (parse_t)dlsym(lib, "clang_parseTranslationUnit");
  num_diag_t num_diag = (num_diag_t)dlsym(lib, "clang_getNumDiagnostics");
  get_diag_t get_diag = (get_diag_t)dlsym(lib, "clang_getDiagnostic");
  severity_t severity = (severity_t)dlsym(lib, "clang_getDiagnosticSeverity");
  if (!create_index || !parse || !num_diag || !get_diag || !severity) { fprintf(stderr, "symbols missing\n"); return 1; }
  void *tu = parse(create_index(0, 0), argv[2], (const char *const *)argv + 3, argc - 3, NULL, 0, 0);
  if (!tu) { fprintf(stderr, "parse failed\n"); return 1; }
  int errors = 0;
  for (unsigned i = 0; i < num_diag(tu); i++) if (severity(get_diag(tu, i)) >= 3) errors++;
  if (errors) { fprintf(stderr, "%d error(s) parsing %s\n", errors, argv[2]); return 1; }
  return 0;
}
C
  printf '#include <stddef.h>\n#include <mpi.h>\n' > "$work/bind.h"
  # shellcheck disable=SC2046 # the flags are words
  if ! { gcc -o "$work/clang" "$work/clang.c" -ldl &&
         "$work/clang" "$libclang" "$work/bind.h" -x c-header $(pkg-config --cflags ompi 2>/dev/null); } \
       >"$work/clang.log" 2>&1; then
    fail "libclang $libclang does not load or cannot parse <mpi.h> as bindgen does (packages libclang-dev, libopenmpi-dev): $(head -c 300 "$work/clang.log")"
  fi
fi

# HDF5: pkg-config knows it and a program compiles and links against it.
if ! pkg-config --exists hdf5 2>/dev/null; then
  fail "pkg-config does not know 'hdf5' (package libhdf5-dev)"
else
  printf '#include <hdf5.h>\nint main(void){unsigned a,b,c;return H5get_libversion(&a,&b,&c) < 0;}\n' > "$work/h5.c"
  # shellcheck disable=SC2046
  if ! { gcc -o "$work/h5" "$work/h5.c" $(pkg-config --cflags --libs hdf5) && "$work/h5"; } >"$work/h5.log" 2>&1; then
    fail "a program does not build or run against HDF5 (package libhdf5-dev): $(head -c 300 "$work/h5.log")"
  fi
fi

# The tools the tests and scripts run, each asked to do something.
cmake --version >/dev/null 2>&1 || fail "cmake does not run (package cmake)"
shellcheck --version >/dev/null 2>&1 || fail "shellcheck does not run (package shellcheck)"
rsync --version >/dev/null 2>&1 || fail "rsync does not run (package rsync)"
/usr/bin/time -v true >/dev/null 2>&1 || fail "/usr/bin/time -v does not run (package time)"
readelf --version >/dev/null 2>&1 || fail "readelf does not run (package binutils)"
setpriv --version >/dev/null 2>&1 || fail "setpriv does not run (package util-linux)"
pgrep -V >/dev/null 2>&1 || fail "pgrep does not run (package procps)"
# The Slurm daemons and munge, as scripts/slurm-cluster.sh starts them.
for d in /usr/sbin/munged:munge /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd; do
  exe=${d%%:*}; pkg=${d##*:}
  "$exe" --version >/dev/null 2>&1 || "$exe" -V >/dev/null 2>&1 || fail "$exe does not run (package $pkg)"
done
# Slurm's clients read a configuration even for --version: give them a minimal one.
printf 'ClusterName=check\nSlurmctldHost=localhost\n' > "$work/slurm.conf"
for c in sbatch srun scontrol scancel; do
  SLURM_CONF=$work/slurm.conf "$c" --version >/dev/null 2>&1 || fail "$c does not run (package slurm-client)"
done

# Rust: Debian's rustc is too old for ferry (it needs >= 1.89); a rustup toolchain is expected.
if ! have_cmd cargo && [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
if ! have_cmd cargo || ! have_cmd rustc; then
  fail "cargo/rustc: install Rust (>= 1.89) with rustup (https://rustup.rs)"
else
  minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
  if [ "${minor:-0}" -lt 89 ]; then
    fail "$(rustc --version) is too old; ferry needs >= 1.89 (rustup update)"
  fi
  for pair in clippy:clippy fmt:rustfmt; do
    sub=${pair%%:*}; comp=${pair##*:}
    if ! cargo "$sub" --version >/dev/null 2>&1; then
      if [ "$mode" = install ] && have_cmd rustup; then rustup component add "$comp" >/dev/null 2>&1 || true; fi
      cargo "$sub" --version >/dev/null 2>&1 || fail "cargo $sub does not run (rustup component add $comp)"
    fi
  done
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "install-deps: ${#failed[@]} requirement(s) missing; see MISSING lines above" >&2
  exit 1
fi
[ "$mode" = check ] && echo "install-deps: every requirement checked by function: ok"
exit 0
