# shellcheck shell=bash
# ferry-job.sh — sourced by ferry's Slurm job scripts (stage-in, stage-out, checkpoint flush,
# resume). It checks what the job needs, picks the MPI launcher and runs ferry under it with
# signals forwarded, so a time-limit warning makes ferry save its state and exit `interrupted`.
#
# Knobs (environment; `sbatch --export=ALL,NAME=value ...` or export them before sbatch):
#   FERRY         the ferry binary (default: `ferry` on PATH — `spack load ferry`, `module load`)
#   FERRY_LAUNCH  srun (default; Slurm starts the ranks through PMIx), mpirun (Open MPI's launcher
#                 inside the allocation), or none (one process, no MPI)
#   FERRY_RANKS   ranks to run (default: the job's task count, SLURM_NTASKS)
#   FERRY_SRUN_MPI  srun's --mpi plugin (default pmix: Debian's Open MPI fails with pmi2 and none)
#   FERRY_ARGS    extra options for `ferry copy` (e.g. "--threads 2 --chunk-size 256MiB --verify")

ferry_die() {
  echo "ferry job: error: $*" >&2
  exit 2
}

# Resolve the binary and the launcher; fail early, before anything is copied, with a message that
# says what to change.
ferry_check() {
  [ -n "${SLURM_JOB_ID:-}" ] || ferry_die "not inside a Slurm job (SLURM_JOB_ID is unset): submit this script with sbatch"
  FERRY=${FERRY:-ferry}
  local bin
  bin=$(command -v "$FERRY" 2>/dev/null) || ferry_die "the ferry binary was not found: FERRY='$FERRY' is not an executable (on PATH=$PATH). Load it (spack load ferry / module load ferry) or set FERRY=/path/to/ferry"
  [ -x "$bin" ] || ferry_die "FERRY='$FERRY' ($bin) is not executable"
  FERRY=$bin
  FERRY_RANKS=${FERRY_RANKS:-${SLURM_NTASKS:-1}}
  case "${FERRY_LAUNCH:-srun}" in
    srun)
      command -v srun >/dev/null || ferry_die "FERRY_LAUNCH=srun but srun is not on PATH"
      FERRY_LAUNCHER=(srun "--mpi=${FERRY_SRUN_MPI:-pmix}" --ntasks="$FERRY_RANKS" --kill-on-bad-exit=1)
      ;;
    mpirun)
      command -v mpirun >/dev/null || ferry_die "FERRY_LAUNCH=mpirun but mpirun is not on PATH (load your MPI module)"
      mpirun --version 2>&1 | grep -q "Open MPI" ||
        ferry_die "FERRY_LAUNCH=mpirun but this mpirun is not Open MPI's ($(mpirun --version 2>&1 | head -1)); use FERRY_LAUNCH=srun"
      # --bind-to none: a rank's copy threads must not share one core.
      FERRY_LAUNCHER=(mpirun --bind-to none -n "$FERRY_RANKS")
      ;;
    none) FERRY_LAUNCHER=() ;;
    *) ferry_die "FERRY_LAUNCH='${FERRY_LAUNCH}' is not a launcher these scripts know: use srun, mpirun or none" ;;
  esac
}

# Run `ferry ARGS...` under the launcher and return its exit code. SIGUSR1 (the time-limit
# warning asked for with `#SBATCH --signal=B:USR1@SECONDS`), SIGTERM and SIGINT reaching this
# shell are passed on as SIGUSR1: srun and Open MPI's mpirun hand USR1 to every rank at once
# (mpirun delays TERM by ~2 s), and ferry stops, saves its state and exits 3 (`interrupted`).
# Never trap SIGCONT: Slurm sends it just before the warning, and a trap on it loses the signal.
ferry_run() {
  "${FERRY_LAUNCHER[@]}" "$FERRY" "$@" &
  local pid=$! rc
  # shellcheck disable=SC2064 # the pid is fixed now
  trap "echo 'ferry job: signal received, asking ferry to save its state and stop' >&2; kill -USR1 $pid 2>/dev/null" USR1 TERM INT
  while :; do
    # `wait` returns early (>128) when a trapped signal arrives; ferry then still runs.
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  # A signal may have cut the last wait short just as ferry ended: ask once more for its status.
  if [ "$rc" -gt 128 ]; then wait "$pid" && rc=0 || rc=$?; fi
  trap - USR1 TERM INT
  return "$rc"
}

# Say what an exit code means for the job's log.
ferry_explain() {
  local rc=$1 id=$2
  case $rc in
    0) echo "ferry job: transfer $id committed" ;;
    3) echo "ferry job: transfer $id interrupted and resumable: \`ferry resume $id\` (or slurm/resume.sbatch with FERRY_ID=$id) finishes it" >&2 ;;
    *) echo "ferry job: transfer $id failed with exit code $rc (see the error above and docs/errors.md); after fixing the cause, \`ferry resume $id\`" >&2 ;;
  esac
}
