"""Error classes that decide how a failure is reported and whether it is retried.

`InputError` is the user's to fix (bad config, file, checkpoint, dataset): never retried, printed as
one line. `TransientError` wraps I/O and network failures that a retry may cure.
"""

from __future__ import annotations


class MicroscopeError(Exception):
    """Base class; `str(err)` is a complete one-line message."""


class InputError(MicroscopeError):
    """Bad input: the message names the problem and the fix."""


class GateError(InputError):
    """Gate rules that cannot be read or applied (a bad file, an unknown metric path, an unknown baseline)."""


class TransientError(MicroscopeError):
    """I/O or network failure worth retrying."""


def is_retryable(exc: BaseException) -> bool:
    """Retry transient I/O and network errors, never validation or user errors."""
    if isinstance(exc, InputError | ValueError | TypeError | KeyError):
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
