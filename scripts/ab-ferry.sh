#!/bin/bash
# A/B timing of two ferry binaries (and cp -r && sync) copying the same datasets, interleaved,
# warm cache: what a change costs end to end.
#   scripts/ab-ferry.sh OLD_FERRY NEW_FERRY OUT_DIR DATASET...   (ROUNDS=3 by default)
# Prints "dataset round who seconds" lines. OUT_DIR/ab is removed before each run.
set -euo pipefail
old=$1 new=$2 out=$3
shift 3
export FERRY_HOME="$out/ab-home"
for ds in "$@"; do
    find "$ds" -type f -exec cat {} + >/dev/null # warm the page cache
    for round in $(seq "${ROUNDS:-3}"); do
        for who in old new cp; do
            rm -rf "$out/ab"
            sync
            s=$(date +%s.%N)
            case $who in
                old) "$old" copy --quiet "$ds" "$out/ab" >/dev/null ;;
                new) "$new" copy --quiet "$ds" "$out/ab" >/dev/null ;;
                cp) cp -r "$ds" "$out/ab" && sync ;;
            esac
            e=$(date +%s.%N)
            echo "$(basename "$ds") $round $who $(echo "$e - $s" | bc)"
        done
    done
done
rm -rf "$out/ab" "$out/ab-home"
