"""plan: the metric of a corpus of precomputed vectors when --metric is not given.

Unit vectors are nearly always embeddings meant for cosine similarity (an encoder that
normalises), and for them inner product is the metric: an l2 index ranks the same neighbours
but its IVF k-means and PQ are trained on the wrong objective (bench/README.md: recall@10
0.592 under l2, 0.610 under ip on MiniLM embeddings). So ip when every vector of a bounded
sample has unit norm, l2 otherwise. The sample is the first row group of a few files: a
plan reads footers, never the corpus.
"""
from __future__ import annotations

import numpy as np

UNIT_TOL = 1e-3    # |norm - 1| under this is a unit vector (float32 rounding, fp16 encoders)
SAMPLE_FILES = 8   # files whose first row group is read


def vector_metric(files: list[str], column: str, dim: int, s3_endpoint: str | None) -> tuple[str, str]:
    """(metric, why) for a vector corpus: the line the build logs says which it took and how to override."""
    nrm = _norms(files[:SAMPLE_FILES], column, dim, s3_endpoint)
    if not len(nrm):
        return "l2", "no valid vector in the sampled row groups to measure; give --metric ip for unit vectors"
    off = np.abs(nrm - 1) >= UNIT_TOL
    if not off.any():
        return "ip", (f"every sampled vector has unit norm ({len(nrm):,} vectors from "
                      f"{min(len(files), SAMPLE_FILES)} file(s)); give --metric l2 to override")
    return "l2", (f"{int(off.sum()):,} of {len(nrm):,} sampled vectors are not unit norm (e.g. "
                  f"{float(nrm[off][0]):.4g}); give --metric ip to override")


def _norms(files: list[str], column: str, dim: int, s3_endpoint: str | None) -> np.ndarray:
    """Norms of the valid vectors (not null, dim values, finite) in the first row group of each file."""
    import pyarrow.compute as pc

    from index_builder.plan.corpus import open_parquet, read_columns

    out = []
    for uri in files:
        f = open_parquet(uri, s3_endpoint)
        if not f.metadata.num_row_groups:
            continue
        col = read_columns(uri, f, [column], group=0).column(0).combine_chunks()
        ok = pc.fill_null(pc.equal(pc.list_value_length(col), dim), False)
        vals = pc.list_flatten(col.filter(ok)).to_numpy(zero_copy_only=False)
        x = np.asarray(vals, dtype=np.float64).reshape(-1, dim)
        x = x[np.isfinite(x).all(axis=1)]
        out.append(np.linalg.norm(x, axis=1))
    return np.concatenate(out) if out else np.empty(0)
