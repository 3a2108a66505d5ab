"""Calls to object storage: bounded retries of the errors worth retrying, and one clear line for the rest.

botocore and s3fs already retry throttling (SlowDown, 503) and refused connections a few times with backoff;
:func:`call_remote` adds at most ``ATTEMPTS`` tries of the whole call on top, within ``RETRY_WINDOW_S``, for errors
that a later try can fix (throttling that outlasted those retries, timeouts, dropped connections), and turns
every error of the storage libraries into a :class:`StoreError` naming the store and what failed: "cannot reach
the endpoint", "no credentials", "access denied", "throttled". A missing object (FileNotFoundError) is an answer,
not a failure: it passes through unchanged.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TypeVar

from mimicdet.data.errors import StoreError

T = TypeVar("T")


class RemoteStoreError(StoreError):
    """Reading a remote store failed for a reason outside its data: the service could not be reached or refused
    the request, or the local shard cache could not be written. Nothing is known to be damaged (so no
    --skip-corrupt hint); rerunning the command resumes once the cause is fixed."""


ATTEMPTS = 3  # tries of one call, each itself retried by botocore/s3fs
BACKOFF_S = 1.0  # wait before the second try; doubled before each further one
RETRY_WINDOW_S = 30.0  # no new try once this long has passed since the first

# Libraries whose exceptions mean "the storage service or the way to it failed" (checked by module, so none of
# them is imported here).
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "google", "azure")
# Worth another try: the connection dropped or timed out mid-call.
_TRANSIENT = frozenset({
    "ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError", "ResponseStreamingError",
    "IncompleteReadError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "FSTimeoutError",
})
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"})
_UNREACHABLE = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"})


def is_storage_error(e: BaseException) -> bool:
    """An error of the storage stack (or the OS under it), as opposed to a bug in the caller."""
    if isinstance(e, (OSError, TimeoutError)):
        return True
    return any(c.__module__.split(".")[0] in _STORAGE_MODULES for c in type(e).__mro__)


def is_transient(e: BaseException) -> bool:
    """Whether a later try may succeed: throttling, timeouts, dropped connections; not a missing object, missing
    credentials, a refusal or an unreachable endpoint (botocore has already retried that one)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if type(e).__name__ in _NO_CREDENTIALS | (_UNREACHABLE - {"ConnectTimeoutError"}):
        return False
    if isinstance(e, (TimeoutError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return True
    if isinstance(e, OSError) and e.errno == errno.EBUSY:  # s3fs's translation of SlowDown and 503
        return True
    return type(e).__name__ in _TRANSIENT


def remote_error(url: str, what: str, e: BaseException, tries: int = 1) -> RemoteStoreError:
    """One line: the store, what was being done, and why it failed in words before the library's message."""
    name = type(e).__name__
    text = " ".join(str(e).split()) or name
    if name in _NO_CREDENTIALS:
        reason = f"no credentials ({text}); set them in the environment or the storage options"
    elif isinstance(e, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        reason = f"access denied ({text}); check the credentials and the bucket's permissions"
    elif name in _UNREACHABLE or isinstance(e, ConnectionRefusedError):
        reason = f"cannot reach the endpoint ({text})"
    elif isinstance(e, OSError) and e.errno == errno.EBUSY:
        reason = f"throttled by the storage service ({text})"
    else:
        reason = f"{name}: {text}"
    after = f" after {tries} tries" if tries > 1 else ""
    return RemoteStoreError(f"{url}: {what} failed{after}: {reason}")


def call_remote(url: str, what: str, fn: Callable[[], T], *, attempts: int = ATTEMPTS,
                window_s: float = RETRY_WINDOW_S, backoff_s: float = BACKOFF_S) -> T:
    """``fn()``, tried again with exponential backoff on transient errors (at most ``attempts`` tries, none started
    after ``window_s`` seconds); a storage error becomes a StoreError naming ``url`` and ``what``. A
    FileNotFoundError, a StoreError and errors that are not the storage stack's pass through unchanged."""
    start = time.monotonic()
    delay = backoff_s
    for tries in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, StoreError):
            raise
        except Exception as e:
            if not is_storage_error(e):
                raise
            late = time.monotonic() - start + delay > window_s
            if tries == attempts or late or not is_transient(e):
                raise remote_error(url, what, e, tries) from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
