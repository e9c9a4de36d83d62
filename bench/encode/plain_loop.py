"""The baseline process: read the texts, load the model, `model.encode(texts, batch_size=64)`, save.

    python bench/encode/plain_loop.py CORPUS_DIR OUT.npy [--batch-size 64]
"""
import argparse
import sys
import time

import numpy as np
import pyarrow.dataset as ds
from sentence_transformers import SentenceTransformer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--model", required=True, help="path of the same weights shardex loads")
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    texts = ds.dataset(a.corpus).to_table(columns=["text"]).column(0).to_pylist()
    model = SentenceTransformer(a.model, device="cpu")
    t0 = time.time()
    x = model.encode(texts, batch_size=a.batch_size, convert_to_numpy=True, show_progress_bar=False)
    np.save(a.out, x.astype(np.float32))
    print(f"encoded {len(texts)} in {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
