#!/usr/bin/env bash
# Everything that needs the GPU, in one call of at most 10 minutes (the device tool's limit), each part time-boxed:
#   1. the shapes model (training/shapes_run.sh), while the original's CUDA extension builds on the CPU;
#   2. the GPU tests (test_gpu.py, the kernels, the fused model path);
#   3. bench_generate.py against the original (REFERENCE_DIR, a checkout of mit-han-lab/hart), same run.
# Needs torch, triton, transformers, accelerate and diffusers importable by `python3` (no `python` shim: one made
# this way on the device hung a whole call). Results go to $OUT (at most 8 files come back from a device call).
set -u
OUT=${OUT:-gpu-session-out}
REFERENCE_DIR=${REFERENCE_DIR:-.reference/hart}
BUDGET=${BUDGET:-560}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, accelerate, diffusers; print(torch.__version__, triton.__version__, transformers.__version__, accelerate.__version__, diffusers.__version__)"

(cd "$REFERENCE_DIR/hart/kernels" && mkdir -p hart_backend \
    && env -u TORCH_CUDA_ARCH_LIST python3 setup.py build_ext --inplace > /tmp/reference_build.log 2>&1
 echo "reference build rc=$? at $(elapsed) s") &

PYTHON=python3 OUT="$OUT" WORK=/tmp/hart-shapes timeout $(( BUDGET * 2 / 3 )) bash benchmarks/training/shapes_run.sh \
    > /tmp/shapes.log 2>&1
echo "shapes rc=$? at $(elapsed) s"
grep -E "^\[|Error|Traceback|stopping there" /tmp/shapes.log | tail -20
cat /tmp/hart-shapes/tokenizer/logs/validation.jsonl 2>/dev/null | tail -1
wait

timeout 60 python3 -m pytest tests/test_gpu.py tests/test_ops.py tests/test_fused_model_path.py -q -x \
    -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? at $(elapsed) s"
tail -3 "$OUT/gpu_tests.log"

mkdir -p /tmp/bench
timeout $(( BUDGET - $(elapsed) )) python3 benchmarks/bench_generate.py --configs depth24-adaln_single \
    --batch-sizes 1,16 --generators cpu --repeats 1:5,16:2 --warmup 1 --max-batch-size 8 --vae-slicing \
    --reference-dir "$REFERENCE_DIR" --output /tmp/bench/bench.json 2>&1 | grep -v -i warn | tail -14
cp /tmp/bench/bench.json "$OUT/" 2>/dev/null
echo "end at $(elapsed) s"
