"""The small exception hierarchy. Messages name the file, row, field or shard."""


class ShardexError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(ShardexError):
    """An invalid option or config value; the message names the field and the fix."""


class CorpusError(ShardexError):
    """Bad input data: names the file and row, or the column."""


class StorageError(ShardexError):
    """A missing or unreadable object in the index root or corpus location."""


class IntegrityError(ShardexError):
    """A published file or merge result that does not check out (sha256, ntotal, ids)."""


class BusyError(ShardexError):
    """Another writer holds the index root's lease (shards/storage/lease.py); names it and the fix."""


class SearchError(ShardexError):
    """A query that cannot be answered: wrong dimension, k out of range, shard failure."""


class QueryError(SearchError):
    """A request that is wrong as asked (the caller's to fix); `field` names the part, e.g. "k"."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field = field


def is_storage_failure(e: BaseException) -> bool:
    """An OS or S3 client error: unreachable endpoint, missing credentials, denied access."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs")


def storage_message(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
