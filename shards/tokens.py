"""Texts into padded batches, cut by a token budget: the host side of the encoder.

Torch-free on purpose: tokenizer worker processes (index_builder/encode/feed.py) import this
module and nothing heavier, so they start in a fraction of a second and hold no model.

A batch is (idx, features): idx the rows of the input it holds, features int64 arrays of
[len(idx), L] with L that batch's longest text. Rows go longest first, so a batch pads little,
and each batch holds as many rows as fit `budget` padded tokens: short texts make wide batches,
long ones narrow, and a batch's memory stays the same whatever the texts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


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


@dataclass
class Batches:
    """One call's texts as token-budget batches: (rows, features) each, and every text's length."""

    items: list
    lens: np.ndarray

    @property
    def n(self) -> int:
        return len(self.lens)


def cuts(lens: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) batches of rows in the given order, each as long as its rows fit `budget`
    padded tokens (rows x the longest of them), and never empty: a text longer than the budget is
    a batch of its own."""
    out, a, top = [], 0, 0
    for i, n in enumerate(lens.tolist()):
        top2 = max(top, n)
        if i > a and (i - a + 1) * top2 > budget:
            out.append((a, i))
            a, top2 = i, n
        top = top2
    if len(lens):
        out.append((a, len(lens)))
    return out


def padded(lens: np.ndarray, spans: list[tuple[int, int]]) -> int:
    return sum(int(lens[a:b].max()) * (b - a) for a, b in spans)


def padding_of(lens: np.ndarray, order: np.ndarray, budget: int) -> Padding:
    """Tokens computed when batches are cut by `budget` in `order`, and in input order."""
    s = lens[order]
    return Padding(tokens=int(lens.sum()), padded=padded(s, cuts(s, budget)),
                   padded_unsorted=padded(lens, cuts(lens, budget)))


def longest_first(lens: np.ndarray) -> np.ndarray:
    return np.argsort(-lens, kind="stable")


class Ragged:
    """One part's token ids, unpadded: flat arrays and each text's length."""

    def __init__(self, ids: list[list[int]], type_ids: list[list[int]] | None):
        self.lens = np.fromiter(map(len, ids), np.int64, len(ids))
        self.start = np.concatenate([[0], np.cumsum(self.lens)[:-1]]).astype(np.int64) if len(ids) else self.lens
        total = int(self.lens.sum())
        self.ids = np.fromiter(itertools.chain.from_iterable(ids), np.int64, total)
        self.type_ids = None if type_ids is None else np.fromiter(itertools.chain.from_iterable(type_ids),
                                                                  np.int64, total)

    def pad(self, idx: np.ndarray, pad: int, left: bool) -> dict[str, np.ndarray]:
        """Rows idx as [len(idx), L] arrays; one gather fills them all (row-major order is token
        order), where a Python loop over rows cost as much as the tokenizing itself."""
        lens = self.lens[idx]
        L = int(lens.max()) if len(idx) else 0
        col = np.arange(L)
        shift = (L - lens)[:, None] if left else 0
        mask = (col >= shift) & (col < shift + lens[:, None])
        src = np.where(mask, self.start[idx][:, None] + col - shift, 0)

        def take(flat, fill):
            return np.where(mask, flat[src] if len(flat) else 0, fill)

        out = {"input_ids": take(self.ids, pad), "attention_mask": mask.astype(np.int64)}
        if self.type_ids is not None:
            out["token_type_ids"] = take(self.type_ids, 0)
        return out


class FastTokenizer:
    """The model's own Rust tokenizer, padded here. transformers' padding and tensor building cost
    several times the tokenizing itself, enough to starve a GPU (bench/README.md has the figures).
    The encoder uses it only where it gives exactly the features sentence-transformers would
    (checked on a probe at load); otherwise the model's own preprocessing runs."""

    NAMES = ("input_ids", "token_type_ids", "attention_mask")

    def __init__(self, spec: str, max_len: int, pad: int, left: bool, names: list[str]):
        from tokenizers import Tokenizer

        self.spec, self.max_len, self.pad_id, self.left, self.names = spec, max_len, pad, left, names
        self.bt = Tokenizer.from_str(spec)  # a copy: settings stay ours
        self.bt.no_padding()
        self.bt.enable_truncation(max_len)

    @classmethod
    def of(cls, tok, max_len: int) -> FastTokenizer:
        """From a transformers fast tokenizer."""
        names = [k for k in tok.model_input_names if k in cls.NAMES]
        return cls(tok.backend_tokenizer.to_str(), max_len, tok.pad_token_id or 0, tok.padding_side == "left", names)

    def __reduce__(self):  # a worker process rebuilds it from the same spec
        return FastTokenizer, (self.spec, self.max_len, self.pad_id, self.left, self.names)

    def ragged(self, texts: list[str]) -> Ragged:
        enc = self.bt.encode_batch(texts)
        return Ragged([e.ids for e in enc], [e.type_ids for e in enc] if "token_type_ids" in self.names else None)

    def batches(self, texts: list[str], budget: int) -> Batches:
        """Token-budget batches, longest texts first."""
        r = self.ragged(texts)
        order = longest_first(r.lens)
        return Batches([(order[a:b], self._keep(r.pad(order[a:b], self.pad_id, self.left)))
                        for a, b in cuts(r.lens[order], budget)], r.lens)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """All texts in input order, padded to the longest (what the model's preprocessing gives)."""
        r = self.ragged(texts)
        return self._keep(r.pad(np.arange(len(texts)), self.pad_id, self.left))

    def _keep(self, f: dict) -> dict:
        return {k: f[k] for k in self.names}
