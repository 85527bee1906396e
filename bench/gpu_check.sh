#!/usr/bin/env bash
# Everything worth checking on a lent GPU machine (docs: ENV.md, "The lent GPU machine"), in
# under 9 minutes: install, the GPU tests, the kernel and data benches, `cocord-fast bench`
# at 32 px (eager, and CoCoRD with CUDA graphs) and at 224 px (eager, through the trainer's
# loader, and compiled), and the engines at 224 px (torch against DeepSpeed ZeRO-1, each eager
# and compiled). Logs, JSON and PNG go into OUT.
#
#   bash bench/gpu_check.sh [OUT]                   # OUT defaults to bench/results
#   GPU_CHECK_WHEELS=/tmp/w bash bench/gpu_check.sh # first install the DALI / DeepSpeed wheels
#                                                   # (and DeepSpeed's sdist) found in /tmp/w
#   COCORD_REFERENCE=DIR bash bench/gpu_check.sh    # also time the reference implementation
#                                                   # (a checkout of ShipengFu/CoCoRD) against ours
#
# Each part runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET_S (540 s), so the
# whole script ends in time even when a part hangs. A failed or timed-out part is logged and
# the next one runs; the last lines (also OUT/gpu_check_summary.txt) say which parts failed,
# and the exit code is 1 if any did. PYTHON (default python3) is the interpreter every part uses.
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-bench/results}")
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
# Triton's interpreter would be handed CUDA tensors (tests/conftest.py sets it only off-GPU).
unset TRITON_INTERPRET
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/cocord_fast_inductor}
started_at=$SECONDS
passed=()
failed=()

# part NAME LIMIT_S COMMAND...: COMMAND with its output in OUT/NAME.log, for at most LIMIT_S
# seconds or what is left of the budget, whichever is less.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - started_at)))
    if ((left <= 0)); then
        failed+=("$name (skipped: the ${BUDGET_S}s budget is spent)")
        echo "== $name: skipped, no time left"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit}s): $*"
    local part_started=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || status=$?
    tail -n 12 "$OUT/$name.log"
    if ((status == 0)); then
        passed+=("$name")
    elif ((status == 124 || status == 137)); then
        failed+=("$name (timed out after ${limit}s)")
    else
        failed+=("$name (exit $status)")
    fi
    echo "-- $name: exit $status after $((SECONDS - part_started))s"
}

command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.log" 2>&1

part install 60 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
if [[ -n ${GPU_CHECK_WHEELS:-} ]]; then
    shopt -s nullglob
    wheels=("$GPU_CHECK_WHEELS"/*.whl "$GPU_CHECK_WHEELS"/*.tar.gz)
    shopt -u nullglob
    # Into the machine's own environment, not --target: the `nvidia` namespace stays one folder.
    part wheels 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation \
        "${wheels[@]}"
fi
part pytest_gpu 100 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
    --junitxml "$OUT/pytest_gpu.xml" tests
# The fused ops' target rows, and CRD's scoring at ImageNet's bank size (1.28M rows).
part kernels 100 "$PYTHON" bench/kernels.py --quick --out "$OUT"
# The CIFAR step is launch-bound: eager, then its trunks replayed as CUDA graphs.
part bench_32 50 "$PYTHON" -m cocord_fast bench --teacher resnet32x4 --student resnet8x4 \
    --image-size 32 --batch-size 64 --precision bf16 --compile off --warmup 5 --steps 20 \
    --rounds 3 --out "$OUT"
part bench_32_graphs 70 "$PYTHON" -m cocord_fast bench --teacher resnet32x4 \
    --student resnet8x4 --image-size 32 --batch-size 64 --precision bf16 \
    --compile reduce-overhead --methods cocord --warmup 5 --steps 20 --rounds 3 --out "$OUT"
# At 224 px DKD and DIST would time KD's networks again (the same floor): the time goes to
# the methods whose steps differ; bench_32 times all six.
part bench_224 80 "$PYTHON" -m cocord_fast bench --teacher resnet34 --student resnet18 \
    --image-size 224 --batch-size 256 --precision bf16 --compile off --warmup 3 --steps 10 \
    --rounds 2 --methods vanilla kd crd cocord --out "$OUT"
if [[ -n ${COCORD_REFERENCE:-} ]]; then  # a checkout of github.com/ShipengFu/CoCoRD
    part versus_reference 40 "$PYTHON" bench/versus_reference.py --reference \
        "$COCORD_REFERENCE" --device cuda --rounds 2 --warmup 5 --steps 20 --out "$OUT"
fi
part data 40 "$PYTHON" bench/data.py --threads 8 --epochs 2 --out "$OUT"
# The trainer's loader end to end (DALI GPU where installed) against bench_224's resident
# batches: 2,048 JPEGs are 8 steps an epoch, so the timed steps cross epoch boundaries.
JPEGS=${TMPDIR:-/tmp}/cocord_fast_jpegs
rm -rf "$JPEGS"
part jpeg_tree 40 "$PYTHON" bench/data.py --write-tree "$JPEGS" --images 2048 --classes 16
part bench_224_pipeline 70 "$PYTHON" -m cocord_fast bench --teacher resnet34 \
    --student resnet18 --image-size 224 --batch-size 256 --precision bf16 --compile off \
    --methods cocord --data pipeline --override data.dataset=imagefolder \
    --override "data.root=$JPEGS" --override data.num_workers=8 --warmup 3 --steps 10 \
    --rounds 2 --out "$OUT"
# The same with the DALI feed's read-ahead off: each batch's file reads then wait on the
# training thread (its own folder: the report's name does not carry overrides).
part bench_224_pipeline_no_read_ahead 70 "$PYTHON" -m cocord_fast bench --teacher resnet34 \
    --student resnet18 --image-size 224 --batch-size 256 --precision bf16 --compile off \
    --methods cocord --data pipeline --override data.dataset=imagefolder \
    --override "data.root=$JPEGS" --override data.num_workers=8 \
    --override data.read_ahead=false --warmup 3 --steps 10 --rounds 2 \
    --out "$OUT/no_read_ahead"
# CoCoRD's step under the torch engine and DeepSpeed ZeRO-1 (the ImageNet recipes' engine, whose
# student weights keep the flat buffers' layout), eager and compiled; DeepSpeed's rows are
# skipped, with the reason, where GPU_CHECK_WHEELS brought no DeepSpeed.
part engines_224 150 "$PYTHON" bench/engines.py --engines torch deepspeed:1 torch+compile \
    deepspeed:1+compile --image-size 224 --batch-size 256 --precision bf16 --warmup 3 \
    --steps 10 --rounds 2 --out "$OUT"
# Last: compiling each method's encoders takes the longest, and gets what time is left.
part bench_224_compile 150 "$PYTHON" -m cocord_fast bench --teacher resnet34 \
    --student resnet18 --image-size 224 --batch-size 256 --precision bf16 --compile default \
    --warmup 3 --steps 10 --rounds 2 --methods vanilla kd crd cocord --out "$OUT"

{
    echo "gpu_check: $((SECONDS - started_at))s; passed: ${passed[*]:-none}"
    if ((${#failed[@]})); then
        echo "FAILED:"
        printf '  %s\n' "${failed[@]}"
    else
        echo "no part failed"
    fi
} | tee "$OUT/gpu_check_summary.txt"
((${#failed[@]} == 0))
