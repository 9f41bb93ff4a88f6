#!/bin/bash
# Run an already-built SCR v3.1 on ferry's libaxl_mpi.so (the run-time swap of
# docs/axl-compatibility.md): SCR's own example test_api checkpoints, flushes and restarts on
# 2 MPI ranks, with ferry's lib directory first on LD_LIBRARY_PATH.
#
#   SCR_INSTALL=/path/to/scr-prefix AXL_LIBDIR=$PREFIX/lib scripts/scr-check.sh
#
# SCR_INSTALL is an install prefix of SCR v3.1.0 and its dependencies (KVTree v1.5.0 with
# bin/kvtree_print, AXL v0.9.0, spath, er, redset, shuffile, rankstr v0.4.x, dtcmp, lwgrp: the
# tags of SCR's `bootstrap.sh --tag`), built with CMake -DMPI=ON, SCR with
# -DSCR_RESOURCE_MANAGER=NONE -DENABLE_EXAMPLES=ON. Without AXL_LIBDIR it runs on the original
# AXL (a baseline). It fails at setup if libaxl_mpi.so does not resolve into AXL_LIBDIR.
#
# Scenarios, each in a fresh scratch directory:
#   sync     checkpoints ckpt.1..ckpt.2, each flushed with SCR_FLUSH_TYPE=SYNC
#   pthread  checkpoints ckpt.1..ckpt.3, async flush SCR_FLUSH_ASYNC=1 SCR_FLUSH_TYPE=PTHREAD
#            (SCR_CACHE_SIZE=2, so two AXL transfers can be in flight at once)
#   restart  run A writes+flushes ckpt.1 (SYNC), cache is wiped, run B (new job id)
#            must fetch ckpt.1 from the prefix through AXL, restart from it, then write ckpt.2
# Each is checked in SCR's log (flush and fetch succeeded, restart from ckpt.1), in the
# prefix's index.scr (FLUSHED/FETCHED, COMPLETE=1) and byte by byte (scr_check_ckpt.py: every
# rank's file with its size and content, and nothing else in the checkpoint directory).
#
# Optional: NP (ranks, 2), CKPT_SIZE (bytes per rank, 4194304), RUN_TIMEOUT (s per mpirun, 180),
# RUN_BASE (scratch, ./scr-check-runs/<date>), KEEP=0 (remove passing scenarios' scratch).
# Output: one "PASS|FAIL <scenario>" line each; exit 0 only if all pass.

set -u
here=$(cd "$(dirname "$0")" && pwd)
INSTALL=${SCR_INSTALL:?set SCR_INSTALL to an SCR v3.1 install prefix}
CHECK="python3 $here/scr_check_ckpt.py"
KVPRINT=$INSTALL/bin/kvtree_print
NP=${NP:-2}
CKPT_SIZE=${CKPT_SIZE:-4194304}
RUN_TIMEOUT=${RUN_TIMEOUT:-180}
RUN_BASE=${RUN_BASE:-$PWD/scr-check-runs/$(date +%Y%m%d-%H%M%S)-$$}
DBG=${SCR_DEBUG:-1}
KEEP=${KEEP:-1}
BIN=$RUN_BASE/bin
TEST_API=$BIN/test_api

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_rmaps_base_oversubscribe=1
if [ -n "${AXL_LIBDIR:-}" ]; then
  export LD_LIBRARY_PATH="$AXL_LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# SCR's example program, built from the installed sources against the installed libscr.
mkdir -p "$BIN"
cp "$INSTALL"/share/scr/examples/{test_api.c,test_common.c,test_common.h,makefile} "$BIN/"
(cd "$BIN" && make test_api >/dev/null) || { echo "FAIL setup: cannot build test_api"; exit 1; }

# Which libaxl_mpi.so will the dynamic loader pick?
axl_so=$(ldd "$TEST_API" | awk '$1=="libaxl_mpi.so"{print $3}')
axl_real=$(readlink -f "$axl_so" 2>/dev/null)
echo "INFO libaxl_mpi.so resolves to: ${axl_so:-NOT FOUND} (${axl_real:-?})"
if [ -z "$axl_so" ] || [ "$axl_so" = "not" ]; then
  echo "FAIL setup: libaxl_mpi.so not found by loader"; exit 1
fi
if [ -n "${AXL_LIBDIR:-}" ]; then
  case "$axl_real" in
    "$(readlink -f "$AXL_LIBDIR")"/*) ;;
    *) echo "FAIL setup: AXL_LIBDIR=$AXL_LIBDIR set but libaxl_mpi.so resolves to $axl_real"; exit 1;;
  esac
fi
echo "INFO scratch: $RUN_BASE"

# run_scr <scratchdir> <jobid> <logfile> <test_api args...>; SCR_* extras come from the caller's env
run_scr() {
  local S=$1 jobid=$2 log=$3; shift 3
  mkdir -p "$S/prefix" "$S/cache" "$S/cntl"
  ( cd "$S" &&
    env SCR_PREFIX=$S/prefix SCR_CACHE_BASE=$S/cache SCR_CNTL_BASE=$S/cntl \
        SCR_CACHE_BYPASS=0 SCR_COPY_TYPE=SINGLE SCR_FLUSH=1 \
        SCR_JOB_ID=$jobid SCR_USER_NAME=scrtest SCR_DEBUG=$DBG \
        SCR_CONF_FILE=$S/no-such-scr.conf \
      timeout -k 15 "$RUN_TIMEOUT" \
      mpirun -n "$NP" --oversubscribe -x LD_LIBRARY_PATH \
        "$TEST_API" -s "$CKPT_SIZE" -p "$S/prefix" "$@" ) > "$log" 2>&1
  return $?
}

# common log checks: nothing aborted / errored
# (a first run always prints "At least one rank ... did not find its checkpoint": no restart exists yet)
bad_log() { # <log> -> prints reason, returns 0 if the log is bad
  local l=$1
  if grep -qE "ABORT|ERROR|failed calling|Failed to|Flush of dataset.*failed|Flush failed|Invalid value|not correct|Could not" "$l"; then
    grep -m3 -E "ABORT|ERROR|failed calling|Failed to|Flush of dataset.*failed|Flush failed|Invalid value|not correct|Could not" "$l" | tr '\n' ' '
    return 0
  fi
  return 1
}

# index.scr in the prefix must list dataset <id> as COMPLETE and FLUSHED
index_has() { # <prefix> <id> <KEY...>
  local p=$1 id=$2; shift 2
  local dump; dump=$($KVPRINT "$p/.scr/index.scr" 2>/dev/null) || return 1
  # extract the block of dataset <id> under top-level DSET
  local blk; blk=$(echo "$dump" | awk -v id="$id" '
      /^  [A-Z]/ {top=$1}
      top=="DSET" && $0 ~ "^    [0-9]+$" {cur=$1}
      top=="DSET" && cur==id {print}')
  local k
  for k in "$@"; do echo "$blk" | grep -q "^      $k\$" || return 1; done
  echo "$blk" | awk '/^      COMPLETE$/{getline; if ($1!="1") exit 1}' || return 1
  return 0
}

FAILS=0
report() { # <PASS|FAIL> <name> <msg> <dir>
  echo "$1 $2: $3 [$4]"
  [ "$1" = FAIL ] && FAILS=$((FAILS+1))
  [ "$1" = PASS ] && [ "$KEEP" = 0 ] && rm -rf "$4"
}

# ---------------- scenario 1: sync flush ----------------
scen_sync() {
  local S=$RUN_BASE/sync; rm -rf "$S"; mkdir -p "$S"
  local log=$S/run.log msg=""
  SCR_FLUSH_TYPE=SYNC SCR_FLUSH_ASYNC=0 run_scr "$S" 101 "$log" -t 1
  local rc=$?
  [ $rc -ne 0 ] && msg+="exit=$rc; "
  local r; r=$(bad_log "$log") && msg+="log: $r; "
  for n in 1 2; do
    grep -q "scr_flush_sync: Flush succeeded for dataset $n \`ckpt.$n'" "$log" || msg+="no 'Flush succeeded' for ckpt.$n; "
    local c; c=$($CHECK "$S/prefix" $n "$NP" "$CKPT_SIZE" 2>&1 | tr "\n" " "; exit ${PIPESTATUS[0]}) || msg+="ckpt.$n: $c; "
    index_has "$S/prefix" $n FLUSHED COMPLETE || msg+="index.scr lacks FLUSHED/COMPLETE for dset $n; "
  done
  grep -q "Initiating async flush" "$log" && msg+="unexpected async flush; "
  if [ -z "$msg" ]; then report PASS sync "ckpt.1,ckpt.2 flushed (SYNC), sizes+content ok" "$S"
  else report FAIL sync "$msg" "$S"; fi
}

# ---------------- scenario 2: async PTHREAD flush ----------------
scen_pthread() {
  local S=$RUN_BASE/pthread; rm -rf "$S"; mkdir -p "$S"
  local log=$S/run.log msg=""
  SCR_FLUSH_TYPE=PTHREAD SCR_FLUSH_ASYNC=1 SCR_CACHE_SIZE=2 run_scr "$S" 201 "$log" -t 2
  local rc=$?
  [ $rc -ne 0 ] && msg+="exit=$rc (124=timeout); "
  local r; r=$(bad_log "$log") && msg+="log: $r; "
  for n in 1 2 3; do
    grep -q "Initiating async flush of dataset $n \`ckpt.$n'" "$log" || msg+="no async start for ckpt.$n; "
    grep -q "Flush succeeded for dataset $n \`ckpt.$n'" "$log" || msg+="no 'Flush succeeded' for ckpt.$n; "
    local c; c=$($CHECK "$S/prefix" $n "$NP" "$CKPT_SIZE" 2>&1 | tr "\n" " "; exit ${PIPESTATUS[0]}) || msg+="ckpt.$n: $c; "
    index_has "$S/prefix" $n FLUSHED COMPLETE || msg+="index.scr lacks FLUSHED/COMPLETE for dset $n; "
  done
  grep -q "scr_flush_sync:" "$log" && msg+="unexpected sync flush; "
  if [ -z "$msg" ]; then report PASS pthread "ckpt.1-3 flushed async (PTHREAD), sizes+content ok" "$S"
  else report FAIL pthread "$msg" "$S"; fi
}

# ---------------- scenario 3: restart fetch from prefix ----------------
scen_restart() {
  local S=$RUN_BASE/restart; rm -rf "$S"; mkdir -p "$S"
  local msg=""
  SCR_FLUSH_TYPE=SYNC SCR_FLUSH_ASYNC=0 run_scr "$S" 301 "$S/run1.log" -t 0
  local rc=$?
  [ $rc -ne 0 ] && msg+="run1 exit=$rc; "
  local r; r=$(bad_log "$S/run1.log") && msg+="run1 log: $r; "
  local c; c=$($CHECK "$S/prefix" 1 "$NP" "$CKPT_SIZE" 2>&1 | tr "\n" " "; exit ${PIPESTATUS[0]}) || msg+="run1 ckpt.1: $c; "
  if [ -z "$msg" ]; then
    # new "job": wipe node-local cache + control dirs so SCR must fetch from the prefix
    rm -rf "$S/cache" "$S/cntl"
    SCR_FLUSH_TYPE=SYNC SCR_FLUSH_ASYNC=0 run_scr "$S" 302 "$S/run2.log" -t 0
    rc=$?
    local log=$S/run2.log
    [ $rc -ne 0 ] && msg+="run2 exit=$rc; "
    r=$(bad_log "$log") && msg+="run2 log: $r; "
    grep -q "did not find its checkpoint" "$log" && msg+="run2 found no checkpoint; "
    grep -q "Attempting fetch: ckpt.1" "$log" || msg+="no fetch attempt; "
    grep -q "scr_fetch_latest: return code 0" "$log" || msg+="fetch did not succeed; "
    grep -q "^Restarting from checkpoint named ckpt.1" "$log" || msg+="app did not restart from ckpt.1; "
    # test_api continues numbering from the restored timestep: ckpt.2 proves it read timestep 1
    grep -q "Starting dataset 2 \`ckpt.2'" "$log" || msg+="ckpt.2 not started (timestep not restored); "
    grep -q "scr_flush_sync: Flush succeeded for dataset 2 \`ckpt.2'" "$log" || msg+="ckpt.2 not flushed; "
    c=$($CHECK "$S/prefix" 2 "$NP" "$CKPT_SIZE" 2>&1 | tr "\n" " "; exit ${PIPESTATUS[0]}) || msg+="ckpt.2: $c; "
    c=$($CHECK "$S/prefix" 1 "$NP" "$CKPT_SIZE" 2>&1 | tr "\n" " "; exit ${PIPESTATUS[0]}) || msg+="ckpt.1 damaged after fetch: $c; "
    index_has "$S/prefix" 1 FETCHED COMPLETE || msg+="index.scr lacks FETCHED for dset 1; "
  fi
  if [ -z "$msg" ]; then report PASS restart "ckpt.1 fetched from prefix, restart read it, ckpt.2 flushed" "$S"
  else report FAIL restart "$msg" "$S"; fi
}

scen_sync
scen_pthread
scen_restart

if [ $FAILS -eq 0 ]; then echo "ALL PASS"; exit 0; fi
echo "$FAILS scenario(s) FAILED"; exit 1
