#!/bin/bash
# Submit a checkpoint flush and its follow-up in one go (run on a login node):
#
#   slurm/submit-flush.sh SRC DST ID [sbatch options for both jobs...]
#
# The follow-up (slurm/resume.sbatch) depends on the flush with afterany: it runs whether the
# flush committed (then it only says so), was interrupted by its time limit, or failed.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 SRC DST ID [sbatch options...]" >&2; exit 2; }
src=$1 dst=$2 id=$3
shift 3
command -v sbatch >/dev/null || { echo "$0: sbatch not found: run this where Slurm's commands are" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
export FERRY_JOB_SH=${FERRY_JOB_SH:-$here/ferry-job.sh}
# Passed through the environment (--export=ALL), so paths with commas survive.
export FERRY_SRC=$src FERRY_DST=$dst FERRY_ID=$id
flush=$(sbatch --parsable --export=ALL "$@" "$here/checkpoint-flush.sbatch")
follow=$(sbatch --parsable --export=ALL "$@" --dependency="afterany:${flush%%;*}" "$here/resume.sbatch")
echo "flush job ${flush%%;*}, follow-up job ${follow%%;*} (transfer $id)"
