"""workdir: the layout of a build's scratch, work/<run>/ under INDEX_ROOT, and the only place it is written.

  trained.index            the trained, empty index (train)
  trained.index.json       how it was trained: train's commit, written last
  tune-queries.npz         tune's held-out queries (xq, ids), drawn with the training sample
  add/unit-U-H/             one add unit's output (U: 5 digits; H: a hash of the rows it covers)
    payload.bin            the unit's codes: list numbers, ids and codes by (shard, list) (build/payload.py)
    sizes.npy              --sharding ivf: its vectors per IVF list, summed by tasks into the list ranges
    gt.npz                 exact top-(k+1) of the tune queries among the unit's vectors
    done.json              the add's commit, written last
  version.json             the run's version name, chosen once before anything is written under it
  shards/shard-s.index.json  the merge's commit, written last
  versions/<v>/shard-s.index    merged shard s (quantizer, codes, or list offsets when on disk), written by
  versions/<v>/shard-s.ivfdata  the merge straight where the version serves it (its inverted lists, on disk)
  lists.npy                the IVF list sizes over all shards (the drift baseline)

<run> is a hash of what the run builds, so a killed run's successor finds the same directory and
reuses whatever committed there. A WorkDir is a plain frozen value: it travels to Ray tasks as is.
Its version (build/publish.py claim_version) is fixed before the merge, which writes the shards into
versions/<v>/ (INDEX_ROOT/versions, not under work/); a WorkDir without one (a test's, an older run's)
keeps them in work/<run>/shards/.
"""
from __future__ import annotations

from dataclasses import dataclass

ROOT = "work"
VERSIONS = "versions"  # shards.storage.manifest.vdir's parent


def shard_name(s: int) -> str:
    """The file stem of shard s, the same in work/<run>/shards/ and in the published version."""
    return f"shard-{s}"


@dataclass(frozen=True)
class WorkDir:
    root: str  # rel path under INDEX_ROOT: work/<run>
    version: str | None = None  # the run's version: where its merged shards go

    @classmethod
    def of(cls, run: str, version: str | None = None) -> WorkDir:
        return cls(f"{ROOT}/{run}", version)

    @property
    def version_record(self) -> str:
        return f"{self.root}/version.json"

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

    def unit(self, name: str) -> str:
        return f"{self.root}/add/{name}"

    def unit_done(self, name: str) -> str:
        return f"{self.unit(name)}/done.json"

    def unit_payload(self, name: str) -> str:
        return f"{self.unit(name)}/payload.bin"

    def unit_sizes(self, name: str) -> str:
        return f"{self.unit(name)}/sizes.npy"

    def unit_gt(self, name: str) -> str:
        return f"{self.unit(name)}/gt.npz"

    @property
    def shards(self) -> str:
        """The directory of the merged shards' files: the version's own, once the run has one."""
        return f"{VERSIONS}/{self.version}" if self.version else self.legacy_shards

    @property
    def legacy_shards(self) -> str:
        """work/<run>/shards/: the merge's commit records, and the shards of a run without a version."""
        return f"{self.root}/shards"

    def shard(self, s: int) -> str:
        return f"{self.shards}/{shard_name(s)}.index"

    def shard_data(self, s: int) -> str:
        return f"{self.shards}/{shard_name(s)}.ivfdata"

    def shard_sizes(self, s: int) -> str:
        """Shard s's vectors per IVF list (nlist of them), written by its merge: the drift baseline's."""
        return f"{self.legacy_shards}/{shard_name(s)}.sizes.npy"

    def shard_record(self, s: int) -> str:
        return f"{self.legacy_shards}/{shard_name(s)}.index.json"
