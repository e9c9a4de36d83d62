#!/usr/bin/env bash
# Here, before a lent GPU machine is used: what bench/gpu/checks.sh needs there, under bench/out/gpu
# (git-ignored; the device tool carries it with carry=["bench/out/gpu"], 64 MiB at most).
#   - the faiss-cpu 1.15.1 wheel (18.8 MB): the GPU machines have no faiss
#   - an fp16 copy of the bundled all-MiniLM-L6-v2 (the fp32 weights, 90 MB, are over the limit)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench/out/gpu
rm -rf "$out" && mkdir -p "$out"
.venv/bin/pip download -q --no-deps --only-binary=:all: faiss-cpu==1.15.1 -d "$out"
.venv/bin/python - "$out/minilm-fp16" <<'PY'
import sys

import torch
from sentence_transformers import SentenceTransformer

from shards.encoder import resolve_model

m = SentenceTransformer(resolve_model(None), device="cpu").to(torch.float16)
m.save(sys.argv[1])
PY
du -sh "$out"
