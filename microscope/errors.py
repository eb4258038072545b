"""Error classes that decide how a failure is reported and whether it is retried.

`InputError` is the user's to fix (bad config, file, checkpoint, dataset): never retried, printed as
one line. `TransientError` wraps I/O and network failures that a retry may cure.
"""

from __future__ import annotations

import errno
import re

# What a retry cannot cure: the disk is full, the store is read-only, a path is unreadable or looping.
_FINAL_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file grew past the file system's limit",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENAMETOOLONG: "a file name is too long",
    errno.ELOOP: "a symbolic link loops",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EISDIR: "a folder stands where a file was expected",
}
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|errno (\d+)")  # pyarrow's OSErrors carry the errno only in text


class MicroscopeError(Exception):
    """Base class; `str(err)` is a complete one-line message."""


class InputError(MicroscopeError):
    """Bad input: the message names the problem and the fix."""


class GateError(InputError):
    """Gate rules that cannot be read or applied (a bad file, an unknown metric path, an unknown baseline)."""


class TransientError(MicroscopeError):
    """I/O or network failure worth retrying."""


class StorageError(MicroscopeError):
    """The store (or a file) cannot be written or read for a reason a retry does not cure."""


def final_errno(exc: BaseException) -> int | None:
    """The errno of an OSError that no retry cures (disk full, read-only, permission, loop), else None."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno in _FINAL_ERRNOS:
        return exc.errno
    m = _ERRNO_IN_TEXT.search(str(exc))
    code = int(m.group(1) or m.group(2)) if m else None
    return code if code in _FINAL_ERRNOS else None


def out_of_space(exc: BaseException) -> bool:
    return final_errno(exc) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(exc: OSError, action: str = "", where: str | None = None) -> str:
    """One line for an OSError a user must fix: what happened, where, and what to do."""
    code = final_errno(exc)
    what = _FINAL_ERRNOS.get(code or -1, exc.strerror or type(exc).__name__)
    where = f" ({exc.filename or where})" if exc.filename or where else ""
    fix = {
        errno.ENOSPC: "free space there or point --store at another disk",
        errno.EDQUOT: "free space there or point --store at another disk",
        errno.EROFS: "point --store (or MICROSCOPE_STORE) at a writable folder or bucket",
        errno.EACCES: "give this user access to it (chmod/chown) or use another path",
        errno.EPERM: "give this user access to it (chmod/chown) or use another path",
        errno.ELOOP: "point the path at the real file, not at a link that leads back to itself",
        errno.ENAMETOOLONG: "use a shorter name",
    }.get(code or -1, "check the path")
    return f"{action + ': ' if action else ''}{what}{where}; {fix}"


def is_retryable(exc: BaseException) -> bool:
    """Retry transient I/O and network errors, never validation or user errors, a full disk or a
    read-only store (retrying those rewrites the same data into the same wall)."""
    if isinstance(exc, InputError | StorageError | ValueError | TypeError | KeyError):
        return False
    if final_errno(exc) is not None:
        return False
    if isinstance(exc, TransientError | ConnectionError | TimeoutError):
        return True
    try:  # boto3 / urllib3 failures are transient unless they are 4xx client errors
        from botocore.exceptions import ClientError, EndpointConnectionError
        from botocore.exceptions import ConnectionError as BotoConnError

        if isinstance(exc, BotoConnError | EndpointConnectionError):
            return True
        if isinstance(exc, ClientError):
            code = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            return int(code) >= 500 or int(code) == 429
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError)


def is_oom(exc: BaseException) -> bool:
    """Out of memory, on a GPU (torch.OutOfMemoryError) or on the CPU (allocator or Python MemoryError)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))
    )
