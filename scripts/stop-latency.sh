#!/usr/bin/env bash
# How long a ferry job under `mpirun -n RANKS` takes to end (mpirun's exit) after
#   (a) SIGUSR1 to mpirun (what a Slurm job script forwards before the time limit), and
#   (b) SIGKILL of one rank (a rank or node dying),
# each repeated N times on a copy that is about half done; after every stop the transfer must read
# `interrupted` and a resume must commit a copy that `ferry verify` accepts.
#
#   scripts/stop-latency.sh                      # N=10 RANKS=4, release binary
#   FERRY=target/debug/ferry N=3 scripts/stop-latency.sh
#
# Prints one line per run and the median, min and max of each case.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=${FERRY:-target/release/ferry}
N=${N:-10}
RANKS=${RANKS:-4}
SIZE_MB=${SIZE_MB:-512}   # per file; 8 files
[ -x "$FERRY" ] || { echo "no ferry binary at $FERRY (cargo build --release)" >&2; exit 2; }
FERRY=$(realpath "$FERRY")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-stop.XXXXXX")
trap 'rm -rf "$work"' EXIT
export FERRY_HOME=$work/home
mkdir -p "$work/src"
for i in $(seq 1 8); do head -c "${SIZE_MB}M" /dev/urandom > "$work/src/f$i"; done
cd "$work"

now() { date +%s.%N; }

# Start a copy, wait until it has journaled something, then run "$1" (the fault) and time the end.
one() {
    local fault=$1 id=$2
    rm -rf dst
    mpirun --oversubscribe --bind-to none -n "$RANKS" "$FERRY" copy -q --id "$id" src dst \
        >/dev/null 2>"$work/err.$id" &
    local job=$!
    while ! "$FERRY" status "$id" --state-dir dst/.ferry --json 2>/dev/null \
        | grep -q '"bytes_done": [1-9]'; do
        sleep 0.05
    done
    local t0
    t0=$(now)
    case $fault in
        usr1) kill -USR1 "$job" ;;
        kill) kill -KILL "$(pgrep -P "$job" | sort -n | sed -n 3p)" ;;
    esac
    wait "$job" || true
    local t1
    t1=$(now)
    local state
    state=$("$FERRY" status "$id" --state-dir dst/.ferry --json | sed -n 's/^  "state": "\(.*\)",/\1/p')
    mpirun --oversubscribe --bind-to none -n 2 "$FERRY" resume -q "$id" --state-dir dst/.ferry \
        >/dev/null
    "$FERRY" verify "$id" --state-dir dst/.ferry >/dev/null
    printf '%s run %s: ended in %.3f s, state %s, resumed and verified\n' \
        "$fault" "$id" "$(echo "$t1 - $t0" | bc)" "$state" >&2
    [ "$state" = interrupted ] || { echo "state $state, not interrupted" >&2; exit 1; }
    echo "$t1 - $t0" | bc
}

summary() {
    sort -n | awk -v what="$1" '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
        printf "%s: median %.3f s, min %.3f s, max %.3f s over %d runs\n", what, m, v[1], v[NR], NR }'
}

for i in $(seq 1 "$N"); do one usr1 "u$i"; done | summary "SIGUSR1 to mpirun -n $RANKS"
for i in $(seq 1 "$N"); do one kill "k$i"; done | summary "SIGKILL of one of $RANKS ranks"
