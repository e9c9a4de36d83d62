"""workdir: the layout of a build's scratch, work/<run>/ under INDEX_ROOT, and the only place it is written.

  trained.index            the trained, empty index (train)
  trained.index.json       how it was trained: train's commit, written last
  tune-queries.npz         tune's held-out queries (xq, ids), drawn with the training sample
  add/part-N/              one embeddings part's add (N: 5 digits)
    gt.npz                 exact top-(k+1) of the tune queries among the part's vectors
    shard-s.index          --sharding hash: its vectors of shard s; ivf: cut from all.index by split
    all.index              --sharding ivf: every vector of the part, before the split
    lists.parquet          --sharding ivf: (id, IVF list) of every vector
    done.json              the add's commit, written last
    split.json             --sharding ivf: the split's commit, written last
  shards/shard-s.index     merged shard s (quantizer, codes, or list offsets when on disk)
  shards/shard-s.ivfdata   its inverted lists, when merged on disk
  shards/shard-s.index.json  the merge's commit, written last
  lists.npy                the IVF list sizes over all shards (the drift baseline)

<run> is a hash of what the run builds, so a killed run's successor finds the same directory and
reuses whatever committed there. A WorkDir is a plain frozen value: it travels to Ray tasks as is.
"""
from __future__ import annotations

from dataclasses import dataclass

ROOT = "work"


def shard_name(s: int) -> str:
    """The file stem of shard s, the same in work/<run>/shards/ and in the published version."""
    return f"shard-{s}"


@dataclass(frozen=True)
class WorkDir:
    root: str  # rel path under INDEX_ROOT: work/<run>

    @classmethod
    def of(cls, run: str) -> WorkDir:
        return cls(f"{ROOT}/{run}")

    @property
    def run(self) -> str:
        return self.root.split("/")[-1]

    @property
    def trained(self) -> str:
        return f"{self.root}/trained.index"

    @property
    def train_record(self) -> str:
        return f"{self.trained}.json"

    @property
    def queries(self) -> str:
        return f"{self.root}/tune-queries.npz"

    @property
    def lists(self) -> str:
        return f"{self.root}/lists.npy"

    def part(self, p: int) -> str:
        return f"{self.root}/add/part-{p:05d}"

    def part_done(self, p: int) -> str:
        return f"{self.part(p)}/done.json"

    def part_gt(self, p: int) -> str:
        return f"{self.part(p)}/gt.npz"

    def part_shard(self, p: int, s: int) -> str:
        return f"{self.part(p)}/{shard_name(s)}.index"

    def part_all(self, p: int) -> str:
        return f"{self.part(p)}/all.index"

    def part_lists(self, p: int) -> str:
        return f"{self.part(p)}/lists.parquet"

    def part_split(self, p: int) -> str:
        return f"{self.part(p)}/split.json"

    @property
    def shards(self) -> str:
        return f"{self.root}/shards"

    def shard(self, s: int) -> str:
        return f"{self.shards}/{shard_name(s)}.index"

    def shard_data(self, s: int) -> str:
        return f"{self.shards}/{shard_name(s)}.ivfdata"

    def shard_record(self, s: int) -> str:
        return f"{self.shard(s)}.json"
