#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU and the package installed (CI has no GPU,
# so tests/gpu is skipped there):
#   1. tests/gpu: the CUDA paths against the CPU reference (float64 exactly; bf16 kernels,
#      compiled blocks and the DeepSpeed loop loosely);
#   2. `conceptvlm bench decode-profile` in bf16 on the GPU: time, ops, host syncs and GPU
#      busy time per decode step, baseline MoE vs ConceptMoE;
#   3. `conceptvlm bench inference` in bf16 on the GPU: ConceptMoE vs the same MoE
#      (skipped with BENCH_BUDGET_S=0).
# Usage: bash tools/gpu_check.sh [OUT_DIR] [BENCH_BUDGET_S]
set -uo pipefail
out=${1:-runs/gpu_check}
budget=${2:-150}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 - <<'PY' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch; the GPU checks need one (tests/gpu is skipped elsewhere)")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}")
PY
python3 -m pytest -q -p no:cacheprovider -rs --durations=8 tests/gpu 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
# A model big enough that the GPU has work to do: width 1024, 24 layers, 16 experts
# top-2 (hidden 1024), GQA 16/4 heads.
model=(--device cuda --dtype bfloat16 --d-model 1024 --heads 16 --kv-heads 4 --layers 24 --experts 16 --top-k 2
       --expert-hidden 1024 --vocab 32000)
python3 -m conceptvlm bench decode-profile "${model[@]}" --length 4096 --batch 1 8 --steps 20 \
    --out "$out/decode_profile_gpu.json" 2>&1 | tee "$out/decode_profile.log"
bench_rc=${PIPESTATUS[0]}
if [ "$budget" != 0 ]; then
    python3 -m conceptvlm bench inference "${model[@]}" --lengths 2048 8192 16384 --batch 1 8 --decode-steps 96 \
        --repeats 5 --budget-s "$budget" --out "$out/inference_gpu.json" --plot "$out/inference_gpu.png" \
        2>&1 | tee "$out/bench.log"
    bench_rc=$(( bench_rc || PIPESTATUS[0] ))
fi
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
