#!/usr/bin/env bash
# One device run, everything a GPU must check, logs and JSON under $OUT (each step runs even if one before
# it failed; the exit status says whether all passed):
#   1. build lowbit with its CUDA kernels for the GPU present (LOWBIT_CUDA=ON);
#   2. the CUDA cases of the op, fallback and layer tests, and tests/test_cuda.py;
#   3. tests/test_cuda.py under compute-sanitizer memcheck, at most 3 minutes, with PyTorch's caching allocator off
#      (it sub-allocates big segments, inside which memcheck sees no out-of-bounds access) and without -x (every
#      kernel runs even after a failure); graph capture, torch.compile and model loading need the cache and are
#      deselected there. Then a short racecheck pass on small cases (shared memory races). Some machines refuse
#      the sanitizer: the log says so; a timeout fails the step and the log shows how far it got;
#   4. benchmarks/bench_cuda.py (bench_cuda.json);
#   5. end to end (benchmarks/bench_e2e_cuda.py): a Llama-3.1-8B-shaped random model in bf16, NF4 and LLM.int8(),
#      decode tokens/s at batch 1 eager and under CUDA graphs, prefill of 2,048 tokens (bench_e2e.json/.md), at
#      most 4 minutes (compiling three 32-layer models dominates);
#   6. QLoRA under FSDP2 on the GPU (NCCL, one rank: the machine has one GPU): examples/fsdp_qlora.py, 10 steps, on
#      a random 4-layer Llama with Llama-3-8B's layer shapes (the built-in model's GGUF is not on that machine)
#      (fsdp_qlora.json: bytes held, peak GPU memory, step time).
# Budget: about 8 minutes on an H200 machine for steps 1-4, at most 5 more for 5-6: with the machine's start a
# 15-minute lease may not leave room for a rerun; rerun only some steps with STEPS="build e2e" (names as below).
#   locally: OUT=/tmp/gpu bash scripts/gpu_check.sh     (without a GPU the build fails or the CUDA tests skip)
set -uo pipefail
OUT=${OUT:-/tmp/lowbit-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember a failure (only the STEPS named, if set)
  [[ -z "${STEPS:-}" || " $STEPS " == *" $1 "* ]] || return 0
  echo "== $1"
  "${@:2}" >"$OUT/$1.log" 2>&1 || { echo "   FAILED (see $1.log)"; status=1; }
  tail -5 "$OUT/$1.log"
}
if compgen -G ".whl/*.whl" >/dev/null; then  # test-only wheels the machine lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
(nvidia-smi || true) >"$OUT/nvidia-smi.txt" 2>&1
step build env LOWBIT_CUDA=ON MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e .
python3 -c "import json, lowbit, torch; print(json.dumps({**lowbit.build_info(), 'torch_runtime': torch.__version__, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))" >"$OUT/build_info.json" 2>&1
cat "$OUT/build_info.json"
step tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fallback.py \
  "tests/test_ops.py" "tests/test_nn.py" -k "cuda or test_cuda or fallback"
needs_cache="not cuda_graph and not compiles_fullgraph and not model_loaded"
step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 180 compute-sanitizer --tool memcheck --error-exitcode 1 \
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "$needs_cache"
step racecheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 compute-sanitizer --tool racecheck --error-exitcode 1 \
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "misaligned or linear_4bit_cuda_paths"
step bench python3 benchmarks/bench_cuda.py --out "$OUT"
step e2e timeout 240 python3 benchmarks/bench_e2e_cuda.py --out "$OUT" --new-tokens 32 --repeats 2
step fsdp sh -c "python3 scripts/random_llama.py /tmp/llama-8b-shaped --layers 4 --hidden 4096 --intermediate 14336 \
  --heads 32 --kv-heads 8 && torchrun --standalone --nproc-per-node 1 examples/fsdp_qlora.py --model /tmp/llama-8b-shaped \
  --steps 10 --json >'$OUT/fsdp_qlora.json'"
exit $status
