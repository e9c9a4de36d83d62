"""The manifest of one published version, and the CURRENT pointer.

INDEX_ROOT/CURRENT names the live version; versions/<v>/manifest.json says
everything needed to load and check that version.

A manifest names files two ways (Manifest.path resolves both, for every reader): a bare name
("shard-0.index") is in the version's own versions/<v>/; a name starting with "/" is a path
under INDEX_ROOT ("/embeddings/<fp>/docs/part-00000.parquet", "/versions/<u>/shard-0.index"):
an immutable file the build wrote elsewhere, referred to rather than copied. Format 1
manifests (written before) hold bare names only, and load as they are.
"""
from __future__ import annotations

import json
import posixpath
import uuid
from datetime import datetime, timezone

from pydantic import BaseModel, Field, field_validator

from shards.errors import StorageError
from shards.storage.store import Store

FORMAT = "shardex-index/2"
READS = ("shardex-index/1", FORMAT)   # 1: every name is in versions/<v>/
CURRENT = "CURRENT"
ROOTED = "/"                          # a name starting with it is a path under INDEX_ROOT


class EncoderInfo(BaseModel):
    name: str                       # model name or path; "precomputed" for a vector column
    revision: str | None = None     # sha256 of the weights
    modules: str | None = None      # sha256 of the modules' types and configs (pooling, normalisation)
    dim: int
    normalize: bool
    metric: str                     # "ip" | "l2"
    query_prefix: str = ""
    document_prefix: str = ""
    max_seq_length: int | None = None
    dtype: str = "fp32"             # what the documents were encoded in: fp32, fp16 or bf16


class FileInfo(BaseModel):
    file: str
    sha256: str
    bytes: int
    ntotal: int | None = None
    ivfdata: str | None = None          # on-disk inverted lists beside `file` (merged shards over the RAM budget)
    ivfdata_sha256: str | None = None
    ivfdata_bytes: int | None = None

    def ivfdata_info(self) -> FileInfo | None:
        """The .ivfdata file as a FileInfo of its own, so verify checks it like any other file."""
        if not self.ivfdata:
            return None
        return FileInfo(file=self.ivfdata, sha256=self.ivfdata_sha256 or "", bytes=self.ivfdata_bytes or 0)


class FieldsInfo(FileInfo):
    """One file of a shard's stored fields (shards/storage/fields.py): rows sorted by id, ids lo..hi. A
    build writes generation 0, each delta reindex the next one: a newer row of an id stands."""
    lo: int = 0
    hi: int = -1
    gen: int = 0


class DeltaInfo(FileInfo):
    """A delta segment of a shard (shards/storage/segments.py): the codes of vectors a reindex added,
    under the shard's trained index, searched beside its base. Its entries are keyed -(2 + first + row)."""
    first: int = 0                      # the first entry number: a shard's deltas number their entries in turn


class ShardInfo(FileInfo):
    """One serving shard: its base segment (`file`, a faiss index, with `ivfdata` when on disk), the
    delta segments reindexes added since it was built, and the keys of entries no longer live in any
    of them (`dead`: sorted int64 .npy; a base entry's key is its id, a delta's is negative)."""
    deltas: list[DeltaInfo] = []
    dead: FileInfo | None = None
    dead_count: int = 0
    fields: list[FieldsInfo] = []       # the stored fields of its documents (DocsInfo.per_shard)
    refine: list[FieldsInfo] = []       # its vectors at full precision, by id (shards/storage/refine.py)

    @property
    def live(self) -> int:
        """Vectors this shard serves: every segment's entries less the dead ones."""
        return (self.ntotal or 0) + sum(d.ntotal or 0 for d in self.deltas) - self.dead_count

    @property
    def segmented(self) -> bool:
        return bool(self.deltas or self.dead)

    def segment_files(self) -> list[FileInfo]:
        return [*self.deltas, *([self.dead] if self.dead else [])]

    @property
    def ram_bytes(self) -> int:
        """Bytes of its files a replica reads into RAM: every segment's .index (an .ivfdata is mmapped)."""
        return self.bytes + sum(f.bytes for f in self.segment_files())

    @property
    def refine_bytes(self) -> int:
        """Bytes of its refine store: on disk, read by row through mmap, apart from the RAM budget."""
        return sum(f.bytes for f in self.refine)


class SourceInfo(BaseModel):
    uri: str
    fingerprint: str
    documents: int                  # valid documents, all in the index exactly once
    rejected: int = 0               # rows sent to quarantine (--bad-rows skip)
    quarantine: str | None = None   # file in this version holding them, with a reason


class ListsInfo(BaseModel):
    """The IVF lists' sizes in this version (index_builder/train/balance.py caps them when training)."""
    imbalance: float | None = None  # nlist * sum(n_l^2) / N^2: 1 when even; the scan cost over the even one's
    largest: int = 0                # vectors in the largest list
    mean: float = 0.0               # vectors per list
    cap: float | None = None        # the build's --list-cap (0: k-means' lists; None: not recorded)
    split: int = 0                  # lists split at training to keep under it


class IndexInfo(BaseModel):
    factory: str
    metric: str
    auto_reason: str | None = None  # why --factory auto chose this factory
    nlist: int | None = None
    train_vectors: int = 0
    train_seconds: float = 0.0
    train_device: str = "cpu"       # "cpu", "cuda-torch" (k-means in torch on CUDA), "faiss-gpu", or "reused"
    lists: ListsInfo | None = None  # IVF only
    refine: str | None = None       # the refine store's precision ("fp32", "fp16"); None: no refine store


class ShardingInfo(BaseModel):
    mode: str = "hash"
    shards: int
    # mode "ivf": shard s owns the IVF lists [ranges[s][0], ranges[s][1]), contiguous, covering 0..nlist
    ranges: list[list[int]] | None = None
    # mode "ivf": "grouped" when the lists were renumbered so that each range is a compact region of the
    # space (index_builder/train/groups.py), "kmeans" when they keep k-means' order (None before)
    order: str | None = None


class DocsInfo(BaseModel):
    files: list[str]
    fields: list[str]
    id_kind: str = "int"            # "int", or "str" when string ids were mapped to int64
    bytes: list[int] = []           # per file, as encode wrote it (format 2; [] before)
    sha256: list[str] = []
    # True: every shard carries its own documents' fields (ShardInfo.fields), and a request reads
    # those of the shards holding its hits; False (before): lookups read `files`
    per_shard: bool = False


class SearchDefaults(BaseModel):
    nprobe: int | None = None
    recall_at_10: float | None = None
    eval_queries: int = 0
    target_recall: float | None = None  # nprobe is the smallest reaching this recall@10 (when any does)
    # --sharding ivf, ranked routing: at the default nprobe a query goes only to the shards whose nearest
    # probed list is within route_gap (coarse distance) of its nearest list (None: every shard it probes)
    route_gap: float | None = None
    touched: float | None = None        # ranked: shards per tune query at the defaults
    exact_touched: float | None = None  # the same, sending each to every shard it probes (at the exact nprobe)
    # with a refine store: each shard reranks its k x refine_factor best by exact distance (0: no rerank)
    refine_factor: int | None = None
    tuned_on: str = "held-out"          # what tune measured on: "held-out" documents, or "queries" (--tune-queries)


class EmbeddingsInfo(BaseModel):
    """Where this version's vectors are: a later reindex reuses them instead of re-encoding."""
    parts: list[str]                # relative to INDEX_ROOT: embeddings/<fp>/part-N.parquet (id, vector, hash)
    hash: str = "blake2b-64 of the encoded column's value"  # what the hash column is


class DriftBaseline(BaseModel):
    """The trained quantizer's fit when it was trained; a reindex compares new vectors against it."""
    error_kind: str | None = None   # "codec": ||x - decode(encode(x))||^2; "coarse": to the IVF centroid
    error: float | None = None      # mean squared error over `sample` indexed vectors
    sample: int = 0
    imbalance: float | None = None  # of the IVF list sizes: nlist * sum(n_l^2) / N^2 (1 = even)
    lists: str | None = None        # file in this version: int64 size of every IVF list (numpy .npy)
    trained_in: str | None = None   # the version whose build trained the quantizer


class Lineage(BaseModel):
    """How this version came about: a full build, or a reindex of `parent`."""
    kind: str = "build"             # "build" | "reindex"
    parent: str | None = None       # the version that was CURRENT when the reindex started
    new: int = 0
    changed: int = 0                # encoded column changed: re-encoded
    deleted: int = 0
    unchanged: int = 0              # vectors reused from the parent
    reencoded_all: str | None = None  # why every document was encoded again (e.g. the encoder changed)
    retrained: bool = True
    retrain_reason: str | None = None
    drift: dict[str, float] = {}    # measured ratios against the baseline (error, imbalance)
    segments: str = "rebuilt"       # "rebuilt": every shard new; "delta": the parent's segments plus deltas
    compacted: dict[str, str] = {}  # shard -> why its segments were rewritten into a new base
    located: dict[str, int] = {}    # delta: where the gone entries were found (deltas, records, assigned)


class Manifest(BaseModel):
    format: str = FORMAT
    version: str
    # milliseconds: versions published within one second still sort by time (retention relies on it)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    source: SourceInfo
    encoder: EncoderInfo
    index: IndexInfo
    sharding: ShardingInfo
    trained: FileInfo
    shards: list[ShardInfo]
    docs: DocsInfo
    search: SearchDefaults = SearchDefaults()
    timings: dict[str, float] = {}
    embeddings: EmbeddingsInfo | None = None
    drift: DriftBaseline | None = None
    lineage: Lineage | None = None
    options: dict | None = None     # the build options (BuildConfig minus source and roots): reindex's defaults
    vectors: list[str] = []         # embeddings parts (under INDEX_ROOT) with the exact vectors: eval's ground truth
    extra: list[FileInfo] = []      # the version's other files (quarantine, list sizes), checked like the rest

    @field_validator("shards", mode="before")
    @classmethod
    def _shards(cls, v):
        """A plain FileInfo is a shard of one base segment."""
        return [x.model_dump() if isinstance(x, FileInfo) and not isinstance(x, ShardInfo) else x for x in v]

    @property
    def ntotal(self) -> int:
        return sum(s.live for s in self.shards)

    def files(self) -> list[FileInfo]:
        return [self.trained, *self.shards, *(f for s in self.shards if (f := s.ivfdata_info())),
                *(f for s in self.shards for f in s.segment_files()),
                *(f for s in self.shards for f in [*s.fields, *s.refine])]

    def path(self, name: str) -> str:
        """The path under INDEX_ROOT of a file this manifest names (see the module's docstring)."""
        return name[len(ROOTED):] if name.startswith(ROOTED) else f"{vdir(self.version)}/{name}"

    def dir_of(self, f: FileInfo) -> str:
        """The directory holding f's file (and its .ivfdata, which faiss finds beside it)."""
        return posixpath.dirname(self.path(f.file))

    def listed(self) -> list[tuple[str, int | None]]:
        """(path under INDEX_ROOT, bytes or None when not recorded) of every file the version refers to."""
        d = self.docs
        docs = list(zip(d.files, d.bytes)) if len(d.bytes) == len(d.files) else [(f, None) for f in d.files]
        named = [(f.file, f.bytes) for f in [*self.files(), *self.extra]] + docs
        if self.source.quarantine and not any(f.file == self.source.quarantine for f in self.extra):
            named.append((self.source.quarantine, None))
        if self.drift and self.drift.lists and not any(f.file == self.drift.lists for f in self.extra):
            named.append((self.drift.lists, None))
        return [(self.path(n), b) for n, b in named]


def rebase(m: Manifest, version: str) -> Manifest:
    """m as version `version` would name the same files: every name it holds (shards and their
    segments, trained index, docs, extra files) rooted or bare as ref() gives it. The start of a
    version that refers to another's files (a compaction, a delta reindex)."""
    def at(name: str | None) -> str | None:
        return ref(version, m.path(name)) if name else None

    def file(f):
        up = {"file": at(f.file)}
        if f.ivfdata:
            up["ivfdata"] = at(f.ivfdata)
        for part in ("fields", "refine"):
            if getattr(f, part, None):
                up[part] = [file(x) for x in getattr(f, part)]
        return f.model_copy(update=up)

    shards = [file(sh).model_copy(update={"deltas": [file(d) for d in sh.deltas],
                                          "dead": file(sh.dead) if sh.dead else None}) for sh in m.shards]
    return m.model_copy(update={
        "version": version, "trained": file(m.trained), "shards": shards,
        "docs": m.docs.model_copy(update={"files": [at(f) for f in m.docs.files]}),
        "extra": [file(f) for f in m.extra],
        "source": m.source.model_copy(update={"quarantine": at(m.source.quarantine)}),
        "drift": m.drift.model_copy(update={"lists": at(m.drift.lists)}) if m.drift else None})


def ref(version: str, rel: str) -> str:
    """How version's manifest names the file at rel (under INDEX_ROOT): bare in its own directory, else rooted."""
    own = f"{vdir(version)}/"
    return rel[len(own):] if rel.startswith(own) and "/" not in rel[len(own):] else ROOTED + rel


def vdir(version: str) -> str:
    return f"versions/{version}"


def new_version_name(run_id: str) -> str:
    """Sortable by time; the run, then a random tag, so two publishes never share a name:
    v20261122-053000-ab12cd-9f3e."""
    return datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S-") + f"{run_id[:6]}-{uuid.uuid4().hex[:4]}"


def write_manifest(store: Store, m: Manifest) -> None:
    store.write_text(f"{vdir(m.version)}/manifest.json", m.model_dump_json(indent=2))


def load_manifest(store: Store, version: str) -> Manifest:
    rel = f"{vdir(version)}/manifest.json"
    try:
        m = Manifest.model_validate_json(store.read_bytes(rel))
    except FileNotFoundError:
        raise StorageError(f"{store.uri(rel)}: no such version {version!r}") from None
    if m.format not in READS:
        raise StorageError(f"{store.uri(rel)}: format {m.format!r}, this shardex reads {' and '.join(READS)}; "
                           "upgrade shardex to read it")
    return m


def verify(store: Store, m: Manifest) -> None:
    """Every file the manifest lists against its size and sha256 (integrity.check_file: hashed once per
    process while unchanged); raises IntegrityError naming the first that differs."""
    from shards.storage.integrity import check_file

    for f in m.files():
        check_file(store, m.path(f.file), f.sha256, f.bytes)


def check_listed(store: Store, m: Manifest) -> None:
    """Every file the manifest refers to exists with its recorded size: one listing per directory, no
    file read (publish's check before CURRENT moves; the sha256s come from the writers, and readers
    check them at load). Raises IntegrityError naming the first file that is missing or differs."""
    from shards.storage.integrity import damaged, missing

    by_dir: dict[str, list[tuple[str, int | None]]] = {}
    for p, b in m.listed():
        by_dir.setdefault(posixpath.dirname(p), []).append((p, b))
    for d, files in by_dir.items():
        have = store.sizes(d)
        for p, b in files:
            name = posixpath.basename(p)
            if name not in have:
                raise missing(store.uri(p))
            if b is not None and have[name] != b:
                raise damaged(store.uri(p), f"{have[name]} bytes, the manifest says {b}")


def current_version(store: Store) -> str:
    try:
        v = store.read_text(CURRENT).strip()
    except FileNotFoundError:
        raise StorageError(f"{store.uri(CURRENT)}: no published version under {store.root}") from None
    return v


def set_current(store: Store, version: str) -> None:
    """Point CURRENT at a version whose manifest exists. The one write that publishes."""
    load_manifest(store, version)
    store.write_text(CURRENT, version + "\n")


def check_root(store: Store) -> None:
    """An index root is a folder (a prefix on S3) that exists: say which it is not, rather than list nothing."""
    if store.fs.isfile(store.path()):
        raise StorageError(f"{store.uri()}: is a file, not an index root; give the folder `shardex build` wrote")
    if not store.fs.isdir(store.path()):
        raise StorageError(f"{store.uri()}: no such index root; check the path, or build one with `shardex build`")


def dangling_current(store: Store, versions: list[dict]) -> str | None:
    """The version CURRENT names when no listed version is it (its manifest is missing), else None."""
    live = store.read_text(CURRENT).strip() if store.exists(CURRENT) else None
    return live if live is not None and not any(v["current"] for v in versions) else None


def list_versions(store: Store) -> list[dict]:
    live = store.read_text(CURRENT).strip() if store.exists(CURRENT) else None
    out = []
    for v in store.ls("versions"):
        if not store.exists(f"{vdir(v)}/manifest.json"):
            continue  # an unfinished publish: never CURRENT, safe to delete
        m = load_manifest(store, v)
        out.append({"version": v, "current": v == live, "created": m.created,
                    "documents": m.source.documents, "shards": len(m.shards),
                    "factory": m.index.factory, "encoder": m.encoder.name,
                    "encoder_revision": (m.encoder.revision or "")[:12], "dim": m.encoder.dim,
                    "lineage": m.lineage.model_dump() if m.lineage else None})
    return sorted(out, key=lambda d: age_key(d["version"], d["created"]))


def age_key(version: str, created: str) -> tuple:
    """Oldest first, by when it was published (`created`, to the millisecond), then by name. Not by the
    name's time: a run names its version when it starts, and a killed run resumed later publishes after
    versions named after it."""
    return datetime.fromisoformat(created), version


def summary(m: Manifest) -> dict:
    """What GET /version and `shardex versions` show."""
    return json.loads(m.model_dump_json(include={"version", "created", "source", "encoder",
                                                  "index", "sharding", "search"}))
