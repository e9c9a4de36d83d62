"""The build's summary: what `shardex build` prints and returns (the version, its sizes, its search
defaults, the time and rate of each stage)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Summary:
    version: str
    index_root: str
    documents: int
    rejected: int
    quarantine: str | None
    factory: str
    shards: int
    index_bytes: int
    nprobe: int | None
    recall_at_10: float | None
    seconds: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)     # vectors/s per stage
    reused: dict = field(default_factory=dict)    # units of work a previous run had finished
    work: str | None = None                       # this run's scratch under INDEX_ROOT (safe to delete now)
    warnings: list[str] = field(default_factory=list)  # what the build did but the user likely did not mean
    refine: str | None = None                     # the refine store's precision, when there is one
    refine_bytes: int = 0                         # on disk, apart from index_bytes (RAM)
    refine_factor: int | None = None

    def lines(self) -> list[str]:
        out = [f"version      {self.version}  (CURRENT of {self.index_root})",
               f"documents    {self.documents:,} indexed, {self.rejected:,} rejected"
               + (f" -> {self.quarantine}" if self.quarantine else ""),
               f"index        {self.factory}, {self.shards} shard(s), {self.index_bytes / 2**20:.1f} MiB"
               + (f" in RAM (codes and ids), refine store {self.refine_bytes / 2**20:.1f} MiB on disk ({self.refine})"
                  if self.refine else ""),
               f"search       {f'nprobe={self.nprobe}' if self.nprobe else 'no nprobe (flat)'}"
               + (f", refine x{self.refine_factor}" if self.refine else "")
               + f": recall@10 {self.recall_at_10} vs exact search"]
        for st, s in self.seconds.items():
            rate = f"{self.rates[st]:>10,.0f} vectors/s" if st in self.rates else " " * 20
            re = f"  ({self.reused[st]} reused)" if self.reused.get(st) else ""
            out.append(f"  {st:<8} {s:7.1f} s {rate}{re}")
        return out + [f"warning      {w}" for w in self.warnings]


def as_dict(s: Summary) -> dict:
    return asdict(s)
