#!/usr/bin/env bash
# The first-GPU check (issue 16), in at most 8 minutes on one H100/H200: the CUDA tests, then
# `mvitv2 benchmark --device cuda` (batch 64 bf16 inference and training step against timm and
# torchvision, peak memory, detection backbone at 1024, the same under torch.compile).
#
#   bash benchmarks/gpu.sh        # from the repository root, no internet
#   MVITV2_GPU_OUT=$OUT/gpu bash benchmarks/gpu.sh   # through the device tool: results come back
#
# Results go to $MVITV2_GPU_OUT (default runs/gpu): one <step>.log per step, one <step>.json per
# benchmark step. Every step has its own time limit, so a hang costs only that step's limit;
# the script goes on after a failed step and exits 1 at the end if any failed.
# docs/gpu.md says what each step checks; tests/test_benchmark_gpu.py runs every benchmark line
# below in --quick mode on the CPU, so that they stay valid.
set -u -o pipefail

OUT="${MVITV2_GPU_OUT:-runs/gpu}"
mkdir -p "$OUT"
failed=()

# The Python every step runs: the project's uv environment where uv is installed, else the
# machine's own python3 with src/ on its path. The lent GPU machines have no uv and no package
# registry, but a CUDA build of torch, torchvision and timm (docs/gpu.md).
if command -v uv >/dev/null; then
    PY=(uv run python)
    export UV_OFFLINE="${UV_OFFLINE:-1}" UV_FROZEN="${UV_FROZEN:-1}"
else
    PY=(python3)
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, output to the terminal and
# OUT/NAME.log. timeout signals its whole process group (uv and the python under it).
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

# bench NAME SECONDS ARGS...: one `mvitv2 benchmark` run on the GPU, results in OUT/NAME.json.
bench() {
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "${PY[@]}" -m mvitv2.cli benchmark --device cuda "$@" --json "$OUT/$name.json"
}

# Step limits in s (expected time in brackets, not yet measured on a GPU): 440 in all, 480 with
# every step killed 5 s after its limit: info 15 [5], tests 100 [60], image 35 [20], train 45 [25],
# detect 35 [15], video 35 [25], compile_image 75 [50], compile_train 100 [75].
step info 15 bash -c 'nvidia-smi; "$@" -c "import torch, torchvision, timm; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"timm\", timm.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), torch.cuda.get_device_name())"' info "${PY[@]}"
step tests 100 "${PY[@]}" -m pytest tests/test_device_paths.py -q -rs -p no:cacheprovider
bench image 35 --cases image_fp32 image_bf16 --batch 64
bench train 45 --cases train train_bf16 --batch 64
bench detect 35 --cases detect --batch 1
bench video 35 --cases video_bf16 --batch 64
bench compile_image 75 --cases image_bf16 --batch 64 --compile
bench compile_train 100 --cases train_bf16 --batch 64 --compile

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed; results in $OUT"
