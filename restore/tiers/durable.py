"""The durable tier: an object store reached through obstore.

Store URLs:

- ``file://DIR`` (or a plain path): a directory on a local filesystem; the
  embedded default. A relative DIR is taken from the current directory.
- ``memory://``: an in-process store, for tests.
- ``s3://BUCKET[/PREFIX]``: S3 or any S3-protocol server. Options
  (S3Options): endpoint (e.g. ``http://127.0.0.1:5000``, which allows plain
  HTTP), region, timeouts, and a deadline within which failed requests are
  retried with exponential backoff and jitter; credentials come from the
  usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) or S3Options, never from
  the command line.
- ``gs://BUCKET[/PREFIX]``, ``az://CONTAINER[/PREFIX]``: Google Cloud Storage
  and Azure Blob Storage, configured by their usual environment variables.

Keys inside a store:

    chunks/<sha256 hex>                       stored chunk bytes (immutable)
    maps/<sha256 hex>                         page maps (immutable)
    snapshots/<name>/<version>/pending.json   a creation in progress
    snapshots/<name>/<version>/manifest.json  an ACTIVE snapshot
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError
from obstore.store import AzureStore, GCSStore, LocalStore, MemoryStore, S3Store

from ..errors import StoreError, UnknownStoreScheme

SCHEMES = ("file", "memory", "s3", "gs", "az")


@dataclass(frozen=True)
class S3Options:
    """Settings for network stores (s3://; the timeouts and deadline also
    apply to gs:// and az://). None means: take it from the environment.

    deadline: seconds within which a failing request (5xx, throttling,
    dropped connection, timeout) is retried with exponential backoff and
    jitter before the error is raised. connect_timeout, timeout: seconds per
    attempt. allow_http: None = only when the endpoint is http://.
    """

    endpoint: Optional[str] = None
    region: Optional[str] = None
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    session_token: Optional[str] = None
    deadline: float = 10.0
    connect_timeout: float = 2.0
    timeout: float = 30.0
    allow_http: Optional[bool] = None

    def retry_config(self) -> dict:
        """obstore's RetryConfig: retries bounded by the deadline, backoff
        from 50 ms doubling to at most 2 s (obstore adds jitter)."""
        return {
            "max_retries": 1000,  # bounded by the deadline, not by a count
            "retry_timeout": timedelta(seconds=self.deadline),
            "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=2), "base": 2},
        }

    def client_options(self) -> dict:
        """obstore's ClientConfig: the timeouts, and plain HTTP when allowed."""
        opts = {
            "connect_timeout": timedelta(seconds=self.connect_timeout),
            "timeout": timedelta(seconds=self.timeout),
        }
        allow = self.allow_http if self.allow_http is not None else (self.endpoint or "").startswith("http://")
        if allow:
            opts["allow_http"] = True
        return opts


@dataclass(frozen=True)
class ObjectInfo:
    """One object listed by DurableStore.list: its key (relative to the
    store's prefix), size and modification time."""

    key: str
    size: int  # bytes
    last_modified: datetime


def default_store_url() -> str:
    """$RESTORE_STORE, else file://$XDG_DATA_HOME/restore/store."""
    env = os.environ.get("RESTORE_STORE")
    if env:
        return env
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return "file://" + os.path.join(data_home, "restore", "store")


class DurableStore:
    """A thin wrapper over one obstore store, with the package's errors.

    Every method raises StoreError naming the URL and key when the store
    fails; a missing object is reported by returning None or False.

    url: see the module text. s3: options for network stores (timeouts and
    retries apply to s3://, gs:// and az://; None: the defaults). Raises
    UnknownStoreScheme for a scheme it cannot open, StoreError for a local
    directory it cannot use or a store obstore refuses to configure.
    Thread-safe (one obstore store, shared by all threads).
    """

    def __init__(self, url: str, s3: Optional[S3Options] = None):
        self.url = url
        self._store = _open(url, s3 or S3Options())
        # A HEAD before a PUT saves sending bytes over a network; on a local
        # disk or in memory the create-only PUT alone is cheaper.
        self._remote = not isinstance(self._store, (LocalStore, MemoryStore))

    def __repr__(self) -> str:
        return f"DurableStore({self.url!r})"

    def _fail(self, what: str, key: str, exc: Exception) -> StoreError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreError(f"store {self.url}: {what} '{key}' failed: {first}")

    def get(self, key: str) -> Optional[bytes]:
        """The object's bytes, or None when it does not exist."""
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except FileNotFoundError:
            return None
        except (BaseError, OSError) as exc:
            raise self._fail("get", key, exc) from exc

    async def get_async(self, key: str):
        """get from an asyncio loop: the object's bytes as obstore's Bytes
        (a buffer, not copied into Python), or None when it does not exist."""
        try:
            result = await obstore.get_async(self._store, key)
            return await result.bytes_async()
        except FileNotFoundError:
            return None
        except (BaseError, OSError) as exc:
            raise self._fail("get", key, exc) from exc

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        """Write an object atomically. With create_only, an existing object
        is left as it is and False is returned."""
        try:
            obstore.put(self._store, key, data, mode="create" if create_only else "overwrite")
            return True
        except AlreadyExistsError:  # only in "create" mode
            return False
        except (BaseError, OSError) as exc:
            raise self._fail("put", key, exc) from exc

    def put_new(self, key: str, data: bytes) -> bool:
        """Store an immutable object unless it already exists; True when this
        call wrote it. Existing objects are never rewritten."""
        if self._remote and self.exists(key):
            return False
        return self.put(key, data, create_only=True)

    def exists(self, key: str) -> bool:
        """True if the object exists (a HEAD request on network stores)."""
        try:
            obstore.head(self._store, key)
            return True
        except FileNotFoundError:
            return False
        except (BaseError, OSError) as exc:
            raise self._fail("head", key, exc) from exc

    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error."""
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            pass
        except (BaseError, OSError) as exc:
            raise self._fail("delete", key, exc) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under prefix, in no particular order."""
        try:
            for batch in obstore.list(self._store, prefix=prefix):
                for meta in batch:
                    yield ObjectInfo(meta["path"], meta["size"], meta["last_modified"])
        except FileNotFoundError:
            return
        except (BaseError, OSError) as exc:
            raise self._fail("list", prefix, exc) from exc


def _open(url: str, s3: S3Options):
    if "://" not in url:
        return _local(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise UnknownStoreScheme(
            f"store URL '{url}': unknown scheme '{scheme}' (use one of {', '.join(s + '://' for s in SCHEMES)})"
        )
    try:
        if scheme == "file":
            return _local(url[len("file://"):])
        if scheme == "memory":
            return MemoryStore()
        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        if not bucket:
            raise UnknownStoreScheme(f"store URL '{url}' names no bucket")
        prefix = prefix.strip("/") or None
        if scheme == "s3":
            config = {
                k: v
                for k, v in {
                    "endpoint": s3.endpoint,
                    "region": s3.region,
                    "access_key_id": s3.access_key_id,
                    "secret_access_key": s3.secret_access_key,
                    "session_token": s3.session_token,
                }.items()
                if v is not None
            }
            return S3Store(
                bucket, prefix=prefix, config=config, client_options=s3.client_options(), retry_config=s3.retry_config()
            )
        if scheme == "gs":
            return GCSStore(bucket, prefix=prefix, client_options=s3.client_options(), retry_config=s3.retry_config())
        return AzureStore(bucket, prefix=prefix, client_options=s3.client_options(), retry_config=s3.retry_config())
    except BaseError as exc:
        raise StoreError(f"store URL '{url}' cannot be opened: {str(exc).splitlines()[0]}") from exc


def _local(path: str) -> LocalStore:
    root = Path(os.path.expanduser(path or ".")).resolve()
    if root.exists() and not root.is_dir():
        raise StoreError(f"store directory '{root}' is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
    except (BaseError, OSError) as exc:
        raise StoreError(f"store directory '{root}' cannot be used: {exc}") from exc
