#!/usr/bin/env bash
# One device run: build lowbit against the GPU machine's CUDA torch (LOWBIT_CUDA=AUTO turns CUDA on),
# run the tests there (CUDA tensors included), and write logs under $OUT.
#   locally: OUT=/tmp/gpu bash scripts/gpu_check.sh     (the CUDA tests skip without a GPU)
set -uo pipefail
OUT=${OUT:-/tmp/lowbit-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # test-only wheels the machine lacks (expecttest)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
(nvidia-smi || true) >"$OUT/nvidia-smi.txt" 2>&1
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import json, lowbit, torch; print(json.dumps({**lowbit.build_info(), 'torch_runtime': torch.__version__, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))" | tee "$OUT/build_info.json"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py tests/test_fallback.py tests/test_nn.py tests/test_config_and_quantize.py \
  tests/test_transformers.py 2>&1 | tee "$OUT/pytest.log" | tail -25
