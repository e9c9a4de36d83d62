"""The small exception hierarchy. Messages name the file, row, field or shard."""
import errno


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


_LOCAL_FIX = {
    errno.ENOTDIR: "a part of that path is a file, not a directory: give a directory (or a new path)",
    errno.EISDIR: "that path is a directory where a file was expected",
    errno.ENOENT: "that path does not exist: check it",
    errno.EACCES: "no permission there: give a path this user can write",
    errno.EPERM: "no permission there: give a path this user can write",
    errno.ENOSPC: "the disk is full: free space or give a path on another disk",
    errno.EROFS: "the filesystem is read-only: give a writable path",
    errno.EEXIST: "something is already there: remove it or give another path",
}


def is_local(e: BaseException) -> bool:
    """An error of a local file operation: the OS names the path (s3fs's errors name none)."""
    return isinstance(e, OSError) and bool(e.filename) and not str(e.filename).startswith("s3://")


def storage_fix(e: BaseException) -> str:
    """What to do about a storage failure: for a local path, what is wrong with it (the message
    names it); for S3, where to look."""
    if is_local(e):
        return _LOCAL_FIX.get(e.errno, "check that path")
    return "check the endpoint, credentials and paths"
