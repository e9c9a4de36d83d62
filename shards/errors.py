"""The small exception hierarchy. Messages name the file, row, field or shard."""
import errno
import sys


class ShardexError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(ShardexError):
    """An invalid option or config value; the message names the field and the fix."""


class CorpusError(ShardexError):
    """Bad input data: names the file and row, or the column."""


class StorageError(ShardexError):
    """A missing or unreadable object in the index root or corpus location."""


class TransientStorageError(StorageError):
    """A storage request that kept failing for a reason that passes (throttling, a refused, reset or
    timed-out connection, a 5xx) after every retry: Ray tasks retry on it (raytools.TASK_RETRIES)."""


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


# S3 error codes that say "try again": throttling, timeouts and the server's own failures.
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                   "500", "502", "503", "504"}
# What s3fs turns those codes into (its translate_boto_error), when it keeps no cause.
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _client_transients() -> tuple:
    """The S3 client stack's own connection and streaming errors, of the modules this process has
    imported (an error of a module never imported cannot be at hand)."""
    found = []
    for mod, names in (("botocore.exceptions", ("ConnectionError", "HTTPClientError", "ResponseStreamingError",
                                                "IncompleteReadError")),
                       ("aiohttp", ("ClientConnectionError", "ClientPayloadError")),
                       ("urllib3.exceptions", ("ProtocolError", "TimeoutError"))):
        m = sys.modules.get(mod)
        found += [getattr(m, n) for n in names if m is not None and hasattr(m, n)]
    return tuple(found)


def is_transient(e: BaseException) -> bool:
    """A storage failure that may pass when tried again: a connection refused, reset, cut or timed out,
    throttling, a 5xx. Not one: a missing object, denied access, bad credentials, a corrupt file."""
    for x in _chain(e):
        if isinstance(x, TransientStorageError):
            return True
        if isinstance(x, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(x, (ConnectionError, TimeoutError)):  # the builtins: reset, refused, broken pipe
            return True
        code = getattr(x, "response", None)
        code = code.get("Error", {}).get("Code") if isinstance(code, dict) else None
        if code is not None:
            return str(code) in TRANSIENT_CODES
        if isinstance(x, _client_transients()):
            return True
        if isinstance(x, OSError) and x.errno in TRANSIENT_ERRNOS and not is_local(x):
            return True
    return False


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
    if is_transient(e):
        return TRANSIENT_FIX
    return "check the endpoint, credentials and paths"


TRANSIENT_FIX = ("the endpoint kept refusing, dropping or throttling requests through every retry: if it "
                 "answered before, run the same command again (finished work is kept), else check its URL")


def transient(where: str, e: BaseException) -> TransientStorageError:
    """The error for a storage request on `where` that kept failing for a passing reason (e)."""
    return TransientStorageError(f"{where}: {storage_message(e)}; {TRANSIENT_FIX}")
