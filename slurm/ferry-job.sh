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

# From the moment this file is sourced, a stopping signal (the time-limit warning, scancel) is
# remembered, not fatal: bash would otherwise end the script at once, and a warning that comes
# during the computation would cost the stage-out. ferry_run passes it on to ferry.
FERRY_PENDING=
trap 'FERRY_PENDING=1; echo "ferry job: stop signal received; ferry will be told to stop" >&2' USR1 TERM INT

# ferry_need NAME MESSAGE: a required knob.
ferry_need() {
  [ -n "${!1:-}" ] || ferry_die "$1 is not set: $2"
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
      # srun does not inherit sbatch's --cpus-per-task (Slurm ≥ 22.05): pass it, so each rank's
      # copy threads get the CPUs the job asked for.
      FERRY_LAUNCHER=(srun "--mpi=${FERRY_SRUN_MPI:-pmix}" --ntasks="$FERRY_RANKS" --kill-on-bad-exit=1
        ${SLURM_CPUS_PER_TASK:+"--cpus-per-task=$SLURM_CPUS_PER_TASK"})
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
  if [ -n "$FERRY_PENDING" ]; then
    echo "ferry job: a stop signal came before ferry started: not starting it" >&2
    FERRY_NOT_STARTED=1
    return 3
  fi
  "${FERRY_LAUNCHER[@]}" "$FERRY" "$@" &
  local pid=$! rc
  # shellcheck disable=SC2064 # the pid is fixed now
  trap "echo 'ferry job: signal received, asking ferry to save its state and stop' >&2; kill -USR1 $pid 2>/dev/null" USR1 TERM INT
  # A signal between the launch and the trap above was remembered: pass it on now.
  [ -z "$FERRY_PENDING" ] || kill -USR1 "$pid" 2>/dev/null || true
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

# Copy SRC to DST as transfer ID — or, if the transfer already exists (the job was requeued, or
# this is a rerun of the same script), resume it. Extra ferry options follow the ID.
ferry_copy_or_resume() {
  local id=$1 src=$2 dst=$3
  shift 3
  if "$FERRY" status "$id" >/dev/null 2>&1; then
    echo "ferry job: transfer $id exists (a requeued or repeated job): resuming it"
    ferry_run resume "$id"
  else
    ferry_run copy --id "$id" "$@" "$src" "$dst"
  fi
}

# Say what an exit code means for the job's log (ferry's own message above names the cause).
ferry_explain() {
  local rc=$1 id=$2 next
  next="\`ferry resume $id\` (or slurm/resume.sbatch with FERRY_ID=$id)"
  if [ -n "${FERRY_NOT_STARTED:-}" ]; then
    echo "ferry job: transfer $id was not started; submit this script again with FERRY_ID=$id (without FERRY_APP): it copies, or resumes what exists" >&2
    return
  fi
  case $rc in
    0) echo "ferry job: transfer $id committed" ;;
    3) echo "ferry job: transfer $id interrupted and resumable: $next finishes it" >&2 ;;
    4) echo "ferry job: transfer $id was cancelled; start a new copy if it is still wanted" >&2 ;;
    5 | 6 | 7) echo "ferry job: transfer $id stopped (exit $rc: see the error above); once the cause is fixed, $next" >&2 ;;
    8) echo "ferry job: transfer $id stopped on an integrity error (exit 8): nothing was committed; check the file named above (docs/errors.md)" >&2 ;;
    2) echo "ferry job: ferry refused the request (exit 2, usage): fix what the message above names" >&2 ;;
    *) echo "ferry job: ferry failed with exit code $rc (see above and docs/errors.md)" >&2 ;;
  esac
}
