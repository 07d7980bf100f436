#!/usr/bin/env bash
# Everything that needs the GPU, for device calls of at most 10 minutes each, every part time-boxed:
#   shapes  the shapes model (training/shapes_run.sh, RESUME=1 to train on from the previous call's checkpoint);
#   tests   the GPU tests (test_gpu.py, the kernels, the fused model path);
#   decode  bench_decode.py: the VAE decode, contiguous or channels-last, torch or fused group norm, profiled;
#   bench   bench_generate.py against the original (REFERENCE_DIR, a checkout of mit-han-lab/hart), same run; the
#           original's CUDA extension builds on the CPU while the tests and the decode run.
# PARTS picks them, in that order (default: all but decode). Needs torch, triton, transformers, accelerate and diffusers
# importable by `python3` (no `python` shim: one made this way on the device hung a whole call). Results go to $OUT
# (at most 8 files come back from a device call).
#
#   PARTS="shapes" BUDGET=560 OUT=$OUT bash benchmarks/gpu_session.sh
#   PARTS="tests bench" REFERENCE_DIR=.reference/hart OUT=$OUT bash benchmarks/gpu_session.sh  (MAX_BATCH_SIZE, default 8)
set -u
OUT=${OUT:-gpu-session-out}
PARTS=${PARTS:-shapes tests bench}
REFERENCE_DIR=${REFERENCE_DIR:-.reference/hart}
BUDGET=${BUDGET:-560}
BENCH_ARGS=${BENCH_ARGS:---configs depth24-adaln_single --batch-sizes 1,16 --generators cpu --repeats 1:5,16:2 --warmup 1}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
wants() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, accelerate, diffusers; print(torch.__version__, triton.__version__, transformers.__version__, accelerate.__version__, diffusers.__version__)"

if wants bench; then
    (cd "$REFERENCE_DIR/hart/kernels" && mkdir -p hart_backend \
        && env -u TORCH_CUDA_ARCH_LIST python3 setup.py build_ext --inplace > /tmp/reference_build.log 2>&1
     echo "reference build rc=$? at $(elapsed) s") &
fi

if wants shapes; then
    PYTHON=python3 OUT="$OUT" WORK=/tmp/hart-shapes BUDGET=$(( BUDGET - $(elapsed) - 10 )) \
        timeout $(( BUDGET - $(elapsed) )) bash benchmarks/training/shapes_run.sh 2>&1 | tr '\r' '\n' \
        | grep -v -E "it/s(, [^]]*)?\]$" > "$OUT/shapes.log"
    echo "shapes rc=${PIPESTATUS[0]} at $(elapsed) s"
    grep -E "^\[|Error|Traceback|stopping there|throughput|fully|accuracy" "$OUT/shapes.log" | tail -20
fi

if wants tests; then
    timeout 120 python3 -m pytest tests/test_gpu.py tests/test_ops.py tests/test_fused_model_path.py tests/test_group_norm.py -q \
        -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests rc=$? at $(elapsed) s"
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -8
fi

if wants decode; then
    timeout 150 python3 benchmarks/bench_decode.py --batch-sizes 1,4 --output "$OUT/decode.json" 2>&1 \
        | grep -v -i warn | tail -12
    echo "decode rc=${PIPESTATUS[0]} at $(elapsed) s"
fi

if wants bench; then
    wait
    mkdir -p /tmp/bench
    # shellcheck disable=SC2086
    timeout $(( BUDGET - $(elapsed) )) python3 benchmarks/bench_generate.py $BENCH_ARGS --max-batch-size "${MAX_BATCH_SIZE:-8}" \
        --vae-slicing --reference-dir "$REFERENCE_DIR" --output /tmp/bench/bench.json 2>&1 | grep -v -i warn | tail -40
    cp /tmp/bench/bench.json "$OUT/" 2>/dev/null
fi
echo "end at $(elapsed) s"
