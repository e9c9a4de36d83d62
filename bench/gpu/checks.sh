#!/usr/bin/env bash
# On a lent GPU machine, in one run (issue 22's GPU checks): the encoder against the forward pass,
# the torch k-means on CUDA against faiss's CPU k-means, and the gpu-marked tests. Needs what
# bench/gpu/prepare.sh made here, carried as bench/out/gpu. Results go to $OUT.
#   device tool: command "bash bench/gpu/checks.sh", carry ["bench/out/gpu"]
set -uo pipefail
OUT=${OUT:-bench/out/gpu/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m pip install -q --no-deps bench/out/gpu/faiss_cpu-*.whl 2>&1 | tail -1
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SHARDEX_TEST_MODEL=bench/out/gpu/minilm-fp16
timeout 240 python bench/encode/gpu.py --model "$SHARDEX_TEST_MODEL" --out "$OUT" 2>&1 | tail -20 | tee "$OUT/encode.log"
timeout 180 python bench/train/kmeans_gpu.py --out "$OUT" 2>&1 | tail -10 | tee "$OUT/kmeans.log"
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/test_encode_gpu.py tests/test_kmeans_gpu.py 2>&1 \
  | tail -15 | tee "$OUT/pytest.log"
