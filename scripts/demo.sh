#!/usr/bin/env bash
# The ferry demo: generate a 4-rank HDF5 checkpoint (ferry gen), stage it with 4 ranks checking
# every HDF5 file before the commit, SIGKILL the copy halfway, show the state, resume it, verify
# it, and compare the trees byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=${FERRY:-$PWD/target/release/ferry}
DEMO=${DEMO_DIR:-$PWD/target/demo}
RANKS=4
export FERRY_HOME="$DEMO/home"   # keep the demo's transfers out of your own registry

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
[ -x "$FERRY" ] || { echo "demo: $FERRY not built (make release)" >&2; exit 1; }

# Launch on $RANKS MPI ranks when Open MPI is here (the project sets what Open MPI needs as root
# and on a machine with fewer cores than ranks; a user never has to), else as in-process ranks.
if command -v mpirun >/dev/null 2>&1 && [ "${DEMO_NO_MPI:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
  export OMPI_MCA_btl_base_warn_component_unused=0
  launch() { local n=$1; shift; mpirun --oversubscribe --bind-to none -n "$n" "$FERRY" "$@"; }
  how="mpirun -n $RANKS ferry"
else
  launch() { local n=$1; shift; "$FERRY" "$@" --ranks "$n"; }
  how="ferry --ranks $RANKS (in-process ranks: no MPI here)"
fi

rm -rf "$DEMO"; mkdir -p "$DEMO/bb" "$DEMO/pfs"
say "1. a checkpoint as $RANKS ranks leave it on node-local storage ($DEMO/bb): $how gen"
# Each rank writes its own HDF5 checkpoint (large arrays with checksums, many small datasets,
# attributes) and plain files, as an application would.
launch "$RANKS" gen "$DEMO/bb" --size 120MiB --seed 1200
for r in $(seq 0 $((RANKS - 1))); do ln -s ckpt.h5 "$DEMO/bb/rank$r/latest"; done
du -sh "$DEMO/bb"

say "2. stage it: $how copy --layout local --verify-hdf5 ..."
launch "$RANKS" copy --layout local --threads 2 --chunk-size 16MiB --verify-hdf5 --quiet \
  "$DEMO/bb/rank{rank}" "$DEMO/pfs/ckpt/rank{rank}" > "$DEMO/id" &
pid=$!
while [ ! -s "$DEMO/id" ]; do kill -0 $pid 2>/dev/null || break; sleep 0.01; done
id=$(head -1 "$DEMO/id")
echo "transfer id: $id"
total=0; done_=0
while kill -0 $pid 2>/dev/null; do
  js=$("$FERRY" status "$id" --json 2>/dev/null || true)
  total=$(sed -n 's/.*"bytes_total": \([0-9]*\).*/\1/p' <<<"$js")
  done_=$(sed -n 's/.*"bytes_done": \([0-9]*\).*/\1/p' <<<"$js")
  if [ -n "$total" ] && [ "${total:-0}" -gt 0 ] && [ $((done_ * 2)) -ge "$total" ]; then
    # SIGKILL one rank, as a node failure would; the launcher then ends the others.
    victim=$(pgrep -f -- "$FERRY copy" | tail -1 || true)
    kill -9 "${victim:-$pid}" 2>/dev/null || true
    break
  fi
  sleep 0.01
done
wait $pid 2>/dev/null && killed=no || killed=yes
say "3. SIGKILL of one rank at $((done_ * 100 / (total > 0 ? total : 1)))% (job killed: $killed) — what is on disk now"
"$FERRY" status "$id"
echo "temporary files in flight: $(find "$DEMO/pfs" -name '.ferry-*.tmp' | wc -l)"
echo "commit record present: $([ -e "$DEMO/pfs/ckpt/.ferry/$id/commit" ] && echo yes || echo no)"

say "4. resume it (with the same $RANKS ranks: in the local layout each rank holds its own files)"
launch "$RANKS" resume "$id"

say "5. verify the destination against the manifest, and compare the trees"
"$FERRY" verify "$id"
for r in $(seq 0 $((RANKS - 1))); do
  diff -r --no-dereference "$DEMO/bb/rank$r" "$DEMO/pfs/ckpt/rank$r"
done
echo "diff -r: identical on all $RANKS ranks"

say "summary"
"$FERRY" status "$id"
