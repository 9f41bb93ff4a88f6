#!/usr/bin/env bash
# ferry without the `hdf5` feature builds, runs without libhdf5, and says clearly what needs it.
# (make test runs this last: it rebuilds target/debug/ferry without the feature.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --no-default-features
ferry=${CARGO_TARGET_DIR:-target}/debug/ferry
if ldd "$ferry" | grep -q hdf5; then
  echo "smoke: $ferry links libhdf5 without the hdf5 feature" >&2; exit 1
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src/d"; echo hello > "$tmp/src/d/a.h5"
FERRY_HOME=$tmp/home "$ferry" copy --quiet "$tmp/src" "$tmp/dst" >/dev/null
cmp "$tmp/src/d/a.h5" "$tmp/dst/d/a.h5"
for args in "gen $tmp/g" "copy --verify-hdf5 $tmp/src $tmp/dst2"; do
  # shellcheck disable=SC2086 # word splitting of the argument list is wanted
  if out=$(FERRY_HOME=$tmp/home "$ferry" $args 2>&1); then
    echo "smoke: 'ferry $args' succeeded without HDF5" >&2; exit 1
  fi
  grep -q "built without it" <<<"$out" || { echo "smoke: unclear error: $out" >&2; exit 1; }
done
[ ! -e "$tmp/dst2" ] || { echo "smoke: a refused copy wrote something" >&2; exit 1; }
echo "smoke: ferry without hdf5 copies, does not link libhdf5, and refuses gen/--verify-hdf5 clearly"
