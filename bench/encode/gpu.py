"""Documents/s on one GPU: shardex's encoder against a raw torch loop, same model, dtype and batch.

Runs where torch sees CUDA; needs neither Ray nor faiss (the lent GPU machines have neither).
The corpus is every standard-library docstring, repeated to give the GPU enough work. Measures:
  forward     the model's forward pass alone over shardex's own batches, already on the device:
              the GPU's limit, which the others are held to (target: shardex fed >= 0.8x)
  raw torch   AutoModel + tokenizer, input-order batches, mean pooling, normalise
  shardex     Encoder.encode_part over parts, one thread; two threads sharing the device as an
              encoder actor runs them; and two threads fed by tokenizer processes (feed.py), as
              an actor on a GPU node runs
  st.encode   sentence-transformers' own model.encode, for reference
and the cosine between fp16/bf16 vectors and fp32 ones. Writes encode_gpu.json to --out.

    python bench/encode/gpu.py --model PATH [--repeat 10] [--batch-size 256] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from index_builder.demo.textcorpus import stdlib_docstrings
from shards.encoder import Encoder


def raw_torch(path: str, texts: list[str], bs: int, dtype, max_len: int) -> float:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to("cuda", dtype).eval()

    def run(ts):
        out = []
        with torch.inference_mode():
            for i in range(0, len(ts), bs):
                f = tok(ts[i:i + bs], padding=True, truncation=True, max_length=max_len, return_tensors="pt").to("cuda")
                h = model(**f).last_hidden_state
                m = f["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
                out.append(e.float().cpu())
        return torch.cat(out)

    run(texts[:bs])  # warm-up: kernels, allocator
    t0 = time.time()
    run(texts)
    return len(texts) / (time.time() - t0)


def forward_only(enc: Encoder, texts: list[str]) -> float:
    """Docs/s of the model alone: every batch tokenized and copied to the device before the clock."""
    on_dev = [{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in f.items()}
              for _, f in enc.host(enc.tokenize(texts, enc.document_prefix)).items]
    with torch.inference_mode():
        enc.model({**on_dev[0], **enc.extra})  # warm-up
        torch.cuda.synchronize()
        t0 = time.time()
        for f in on_dev:
            enc.model({**f, **enc.extra})["sentence_embedding"]
        torch.cuda.synchronize()
    return len(texts) / (time.time() - t0)


def shardex(enc: Encoder, texts: list[str], part: int, threads: int, feeders: int = 0) -> float:
    from index_builder.encode.feed import Feeder

    parts = [texts[i:i + part] for i in range(0, len(texts), part)]
    lock = threading.Lock()
    feed = Feeder(enc.fast, enc.batch_tokens, feeders) if feeders else None
    enc.encode_part(texts[:part], lock, feed)  # warm-up (and the tokenizer processes up)
    t0 = time.time()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda p: enc.encode_part(p, lock, feed), parts))
    rate = len(texts) / (time.time() - t0)
    if feed:
        feed.close()
    return rate


def st_encode(enc: Encoder, texts: list[str]) -> float:
    enc.model.encode(texts[:enc.batch_size], batch_size=enc.batch_size)
    t0 = time.time()
    enc.model.encode(texts, batch_size=enc.batch_size, convert_to_numpy=True, show_progress_bar=False)
    return len(texts) / (time.time() - t0)


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(1).min())  # both sides are normalised


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--part", type=int, default=5000, help="documents per part, as --part-rows")
    ap.add_argument("--feeders", type=int, default=min(8, (os.cpu_count() or 2) - 1),
                    help="tokenizer processes for the fed run (default: the cores but one, at most 8)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    docs = [r["text"] for r in stdlib_docstrings(limit=None)]
    texts = docs * a.repeat
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "documents": len(texts),
           "distinct_documents": len(docs), "batch_size": a.batch_size, "part": a.part, "cpus": os.cpu_count(),
           "feeders": a.feeders, "docs_per_s": {}}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        enc = Encoder(a.model, device="cuda", dtype=name, batch_size=a.batch_size)
        r = res["docs_per_s"]
        r[f"forward_only_{name}"] = round(forward_only(enc, texts), 1)
        r[f"shardex_{name}_fed"] = round(shardex(enc, texts, a.part, 2, a.feeders), 1)
        r[f"raw_torch_{name}"] = round(raw_torch(a.model, texts, a.batch_size, dt, enc.model.max_seq_length), 1)
        r[f"shardex_{name}"] = round(shardex(enc, texts, a.part, 1), 1)
        r[f"shardex_{name}_two_threads"] = round(shardex(enc, texts, a.part, 2), 1)
        r[f"st_encode_{name}"] = round(st_encode(enc, texts), 1)
        res[f"padding_saved_{name}"] = round(1 - enc.padding.padded / enc.padding.padded_unsorted, 3)
        del enc
        torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
    ref = Encoder(a.model, device="cuda", dtype="fp32", batch_size=a.batch_size).encode_documents(docs)
    for name in ("fp16", "bf16"):
        x = Encoder(a.model, device="cuda", dtype=name, batch_size=a.batch_size).encode_documents(docs)
        res[f"min_cosine_{name}_vs_fp32"] = round(cosine_min(x, ref), 5)
    for name in ("fp16", "bf16"):
        r = res["docs_per_s"]
        best = max(r[f"shardex_{name}_two_threads"], r[f"shardex_{name}_fed"])
        res[f"ratio_shardex_over_raw_{name}"] = round(best / r[f"raw_torch_{name}"], 3)
        res[f"ratio_shardex_over_forward_{name}"] = round(best / r[f"forward_only_{name}"], 3)  # target 0.8
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "encode_gpu.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
