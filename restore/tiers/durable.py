"""The durable tier: an object store reached through obstore.

Store URLs:

- ``file://DIR`` (or a plain path): a directory on a local filesystem; the
  embedded default. A relative DIR is taken from the current directory.
- ``memory://``: an in-process store, for tests.
- ``s3://BUCKET[/PREFIX]``: S3 or any S3-protocol server. Options
  (S3Options): endpoint (e.g. ``http://127.0.0.1:5000``, which allows plain
  HTTP), region, timeouts, and a deadline within which failed requests are
  retried with exponential backoff and jitter. What S3Options leaves unset
  comes from the AWS conventions (``AWS_ENDPOINT_URL_S3``,
  ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``, ``AWS_REGION``, the keys, the
  profile files; see _s3_settings and docs/tiers.md); credentials never come
  from the command line.
- ``gs://BUCKET[/PREFIX]``, ``az://CONTAINER[/PREFIX]``: Google Cloud Storage
  and Azure Blob Storage, configured by their usual environment variables.

Keys inside a store:

    chunks/<sha256 hex>                       stored chunk bytes (immutable)
    maps/<sha256 hex>                         page maps (immutable)
    snapshots/<name>/<version>/pending.json   a creation in progress
    snapshots/<name>/<version>/manifest.json  an ACTIVE snapshot

In a file:// store the chunk objects, the bulk of every read and write, are
read and written with plain file calls in obstore's layout (the key's path
under the directory; a write goes to a staging file `<path>#<digits>`, which
obstore's listing skips, then is linked into place, or renamed over it when
overwriting), so either reads what the other wrote. obstore's local store
hands each call to a thread of its runtime, a thread switch each way:
reading took it twice the CPU and 2.4 times as long, writing 1.3 times as
long (bench/local_store.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
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
_CHUNK_KEY = re.compile(r"chunks/[0-9a-f]{64}")  # what file:// reads and writes itself


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
    endpoint_from: Optional[str] = None  # how endpoint was given, for messages (e.g. "--s3-endpoint")

    def retry_config(self) -> dict:
        """obstore's RetryConfig: retries bounded by the deadline, backoff
        from 50 ms doubling to at most 2 s (obstore adds jitter)."""
        return {
            "max_retries": 1000,  # bounded by the deadline, not by a count
            "retry_timeout": timedelta(seconds=self.deadline),
            "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=2), "base": 2},
        }

    def client_options(self, allow_http: Optional[bool] = None) -> dict:
        """obstore's ClientConfig: the timeouts, and plain HTTP when allowed.

        obstore replaces the client options it read from the environment
        (e.g. AWS_ALLOW_HTTP) with these, so whether plain HTTP is allowed
        is always said here: allow_http (resolved by _open), else
        self.allow_http, else whether self.endpoint is http://."""
        opts = {
            "connect_timeout": timedelta(seconds=self.connect_timeout),
            "timeout": timedelta(seconds=self.timeout),
        }
        if allow_http is None:
            allow_http = self.allow_http if self.allow_http is not None else (self.endpoint or "").startswith("http://")
        if allow_http:
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
    """A thin wrapper over one obstore store, with the package's errors
    (a file:// store's chunk objects are read and written directly: see
    the module text).

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
        self._store, self._endpoint = _open(url, s3 or S3Options())
        # A HEAD before a PUT saves sending bytes over a network; on a local
        # disk or in memory the create-only PUT alone is cheaper.
        self._remote = not isinstance(self._store, (LocalStore, MemoryStore))
        self._root = str(self._store.prefix) if isinstance(self._store, LocalStore) else None

    def __repr__(self) -> str:
        return f"DurableStore({self.url!r})"

    def _fail(self, what: str, key: str, exc: Exception) -> StoreError:
        text = str(exc).strip()
        reason = _unreachable(text)
        if reason is not None:
            # One line that names the setting to fix, when one named the endpoint.
            where = self._endpoint or f"store {self.url}"
            return StoreError(f"{where}: cannot connect: {reason} (store {self.url}: {what} '{key}' failed)")
        first = text.splitlines()[0] if text else type(exc).__name__
        return StoreError(f"store {self.url}: {what} '{key}' failed: {first}")

    def _chunk_file(self, key: str) -> Optional[str]:
        """The file of a file:// store's chunk object, which get and put
        read and write themselves (module text); None for any other key or
        store."""
        return os.path.join(self._root, key) if self._root is not None and _CHUNK_KEY.fullmatch(key) else None

    def get(self, key: str) -> Optional[bytes]:
        """The object's bytes, or None when it does not exist."""
        path = self._chunk_file(key)
        if path is not None:
            try:
                with open(path, "rb", buffering=0) as f:
                    return f.readall()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self._fail("get", key, exc) from exc
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
        """Write an object atomically: data (any bytes-like object) as it is
        now, whatever becomes of it after. With create_only, an existing
        object is left as it is and False is returned."""
        path = self._chunk_file(key)
        if path is not None:
            try:
                return _put_file(path, data, create_only)
            except OSError as exc:
                raise self._fail("put", key, exc) from exc
        if isinstance(self._store, MemoryStore) and not isinstance(data, bytes):
            data = bytes(data)  # the memory store would keep the caller's buffer itself, not a copy
        try:
            obstore.put(self._store, key, data, mode="create" if create_only else "overwrite")
            return True
        except AlreadyExistsError:  # only in "create" mode
            return False
        except (BaseError, OSError) as exc:
            raise self._fail("put", key, exc) from exc

    @property
    def remote(self) -> bool:
        """True for a store across the network (each request a round trip);
        False for file:// and memory://, where a put is a copy."""
        return self._remote

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


def _put_file(path: str, data, create_only: bool) -> bool:
    """Write data to path as obstore's local store does: into a new staging
    file beside it, then linked into place (create_only: False when path
    exists, which is left as it is) or renamed over it."""
    while True:
        staging = f"{path}#{secrets.randbelow(10**12)}"
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue  # another writer's staging file
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(fd, "wb", buffering=0) as f:
            view = memoryview(data).cast("B")
            while view:
                view = view[f.write(view):]
        if not create_only:
            os.replace(staging, path)
            staging = None
            return True
        try:
            os.link(staging, path)
            return True
        except FileExistsError:
            return False
    finally:
        if staging is not None:
            os.unlink(staging)


_TRUE = ("1", "true", "yes", "on", "y")
_FALSE = ("0", "false", "no", "off", "n", "")


def _env_flag(env, name: str) -> Optional[bool]:
    """A boolean environment variable: None when unset; StoreError naming it
    when it is neither true nor false."""
    raw = env.get(name)
    if raw is None:
        return None
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise StoreError(f"{name}={raw} (from the environment): not true or false")


def _from_env(name: str, value: str) -> str:
    return f"{name}={value} (from the environment)"


def _check_endpoint(endpoint: str, where: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise StoreError(f"{where}: not an http:// or https:// URL")


@dataclass(frozen=True)
class _Profile:
    """The settings of one profile of the AWS CLI's files that restore reads:
    static keys, region and endpoint_url. Each value is (value, where)."""

    name: str
    values: dict

    def get(self, key: str):
        return self.values.get(key, (None, None))


def _aws_profile(env) -> _Profile:
    """The profile named by AWS_PROFILE (else AWS_DEFAULT_PROFILE, else
    "default") in the AWS config file ($AWS_CONFIG_FILE, else ~/.aws/config)
    and credentials file ($AWS_SHARED_CREDENTIALS_FILE, else
    ~/.aws/credentials), the credentials file winning. Only plain keys are
    read (see docs/tiers.md). A profile named by the environment that
    neither file has is a StoreError, as in the AWS CLI."""
    import configparser

    named_by = next((v for v in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE") if env.get(v)), None)
    name = env[named_by] if named_by else "default"
    files = (
        (env.get("AWS_CONFIG_FILE") or "~/.aws/config", "default" if name == "default" else f"profile {name}",
         ("region", "endpoint_url", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")),
        (env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", name,
         ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")),
    )
    values: dict = {}
    found = False
    for path, section, keys in files:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            continue
        parser = configparser.RawConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"AWS profile file {path} cannot be read: {str(exc).splitlines()[0]}") from exc
        if not parser.has_section(section):
            continue
        found = True
        for key in keys:
            value = parser.get(section, key, fallback="").strip()
            if value:
                values[key] = (value, f"{key}={value} (profile '{name}' in {path})")
    if named_by and not found:
        raise StoreError(f"{_from_env(named_by, name)}: no such profile in "
                         f"{files[0][0]} or {files[1][0]}")
    return _Profile(name, values)


def _s3_settings(s3: S3Options, env) -> tuple[dict, bool, Optional[str]]:
    """The S3 configuration passed to obstore, whether plain HTTP is allowed,
    and the endpoint's setting (for messages), resolved as the AWS CLI does
    with restore's own options first:

    endpoint: S3Options.endpoint (--s3-endpoint, RESTORE_S3_ENDPOINT), then
    AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then the profile's endpoint_url. region: S3Options.region, AWS_REGION, AWS_DEFAULT_REGION,
    the profile's region. Keys: S3Options, then AWS_ACCESS_KEY_ID with
    AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), then the profile's keys;
    without any, obstore's own chain (web identity, ECS, EC2 metadata).
    Plain HTTP: S3Options.allow_http; else an http:// endpoint given to
    restore is allowed; else AWS_ALLOW_HTTP when set; else an http://
    endpoint is allowed (the AWS CLI takes any endpoint it is given)."""
    profile = _aws_profile(env)

    endpoint, where, ours = None, None, False
    if s3.endpoint:
        endpoint, ours = s3.endpoint, True
        where = f"{s3.endpoint_from or 'S3Options.endpoint'}={s3.endpoint}"
        if s3.endpoint_from and s3.endpoint_from.isupper():
            where = _from_env(s3.endpoint_from, s3.endpoint)
    else:
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if env.get(var):
                endpoint, where = env[var], _from_env(var, env[var])
                break
        else:
            endpoint, where = profile.get("endpoint_url")

    config = {}
    if endpoint:
        _check_endpoint(endpoint, where)
        # obstore prefers AWS_ENDPOINT_URL_S3 from the environment to a
        # configured endpoint; giving both keys makes the choice above hold.
        config["endpoint"] = config["aws_endpoint_url_s3"] = endpoint

    region = s3.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or profile.get("region")[0]
    if region:
        config["region"] = region

    if s3.access_key_id or s3.secret_access_key:
        keys = {"access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key,
                "session_token": s3.session_token}
    elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        keys = {}  # obstore reads them, and AWS_SESSION_TOKEN, itself
    else:
        keys = {"access_key_id": profile.get("aws_access_key_id")[0],
                "secret_access_key": profile.get("aws_secret_access_key")[0],
                "session_token": profile.get("aws_session_token")[0]}
        if not (keys["access_key_id"] and keys["secret_access_key"]):
            keys = {"session_token": s3.session_token}
    config.update({k: v for k, v in keys.items() if v is not None})

    env_allow = _env_flag(env, "AWS_ALLOW_HTTP")
    is_http = bool(endpoint) and endpoint.lower().startswith("http://")
    if s3.allow_http is not None:
        allow, allow_where = s3.allow_http, f"S3Options.allow_http={s3.allow_http}"
    elif ours or env_allow is None:
        allow, allow_where = is_http, None
    else:
        allow, allow_where = env_allow, _from_env("AWS_ALLOW_HTTP", env["AWS_ALLOW_HTTP"])
    if is_http and not allow:
        raise StoreError(f"{where}: plain HTTP is not allowed by {allow_where}; "
                         f"use https:// or set AWS_ALLOW_HTTP=true")
    return config, allow, where


def _azure_settings(env) -> tuple[Optional[bool], Optional[str]]:
    """Whether plain HTTP is allowed for az://, and the endpoint's setting.
    obstore reads the account, key and endpoint from the environment itself
    (AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY,
    AZURE_STORAGE_ENDPOINT, AZURE_STORAGE_USE_EMULATOR with
    AZURITE_BLOB_STORAGE_URL); only plain HTTP must be said again, as
    client options replace those from the environment."""
    endpoint, where = None, None
    for var in ("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"):
        if env.get(var):
            endpoint, where = env[var], _from_env(var, env[var])
            break
    else:
        if _env_flag(env, "AZURE_STORAGE_USE_EMULATOR"):
            var = "AZURITE_BLOB_STORAGE_URL"
            endpoint = env.get(var) or "http://127.0.0.1:10000"
            where = _from_env(var, endpoint) if env.get(var) else f"the Azurite default {endpoint}"
    if endpoint:
        _check_endpoint(endpoint, where)
    return _http_allowed(env, "AZURE_ALLOW_HTTP", endpoint, where), where


def _http_allowed(env, var: str, endpoint: Optional[str], where: Optional[str]) -> bool:
    """Plain HTTP for az:// and gs://: as env[var] says, else to an http://
    endpoint; an http:// endpoint refused by var is an error naming both."""
    allow = _env_flag(env, var)
    is_http = bool(endpoint) and endpoint.lower().startswith("http://")
    if allow is None:
        return is_http
    if is_http and not allow:
        raise StoreError(f"{where}: plain HTTP is not allowed ({var}={env[var]} in the environment)")
    return allow


GCS_ACCOUNT_VARS = ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY",
                    "GOOGLE_APPLICATION_CREDENTIALS")  # obstore's order; _KEY holds the JSON itself


def _gcs_settings(env) -> tuple[Optional[bool], Optional[str]]:
    """Whether plain HTTP is allowed for gs://, and the endpoint's setting.
    obstore reads the credentials from the environment itself; a service
    account file may name another endpoint than Google's (``gcs_base_url``,
    with ``disable_oauth`` for an emulator), which is read here only to name
    it in errors and to allow plain HTTP to it, as for S3 and Azure."""
    endpoint, where = None, None
    for var in GCS_ACCOUNT_VARS:
        if not env.get(var):
            continue
        try:
            text = env[var] if var.endswith("_KEY") else Path(env[var]).expanduser().read_text()
            account = json.loads(text)
        except (OSError, ValueError):
            break  # obstore says what is wrong with it
        if isinstance(account, dict) and isinstance(account.get("gcs_base_url"), str):
            endpoint = account["gcs_base_url"]
            shown = "(the JSON in the environment)" if var.endswith("_KEY") else f"{var}={env[var]}"
            where = f"gcs_base_url={endpoint} in {shown}"
            _check_endpoint(endpoint, where)
        break
    return _http_allowed(env, "GOOGLE_ALLOW_HTTP", endpoint, where), where


def _open(url: str, s3: S3Options, env=None):
    """(the obstore store for url, the setting that named its endpoint or
    None). env: the environment to read (default os.environ)."""
    env = os.environ if env is None else env
    if "://" not in url:
        return _local(url), None
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise UnknownStoreScheme(
            f"store URL '{url}': unknown scheme '{scheme}' (use one of {', '.join(s + '://' for s in SCHEMES)})"
        )
    try:
        if scheme == "file":
            return _local(url[len("file://"):]), None
        if scheme == "memory":
            return MemoryStore(), None
        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        if not bucket:
            raise UnknownStoreScheme(f"store URL '{url}' names no bucket")
        prefix = prefix.strip("/") or None
        if scheme == "s3":
            config, allow, where = _s3_settings(s3, env)
            store = S3Store(bucket, prefix=prefix, config=config, client_options=s3.client_options(allow),
                            retry_config=s3.retry_config())
            return store, where
        if scheme == "gs":
            allow, where = _gcs_settings(env)
            store = GCSStore(bucket, prefix=prefix, client_options=s3.client_options(allow),
                             retry_config=s3.retry_config())
            return store, where
        allow, where = _azure_settings(env)
        store = AzureStore(bucket, prefix=prefix, client_options=s3.client_options(allow),
                           retry_config=s3.retry_config())
        return store, where
    except BaseError as exc:
        raise StoreError(f"store URL '{url}' cannot be opened: {str(exc).splitlines()[0]}") from exc


_REASONS = (
    ("ConnectionRefused", "connection refused"),
    ("dns error", "cannot resolve its host name"),
    ("failed to lookup address", "cannot resolve its host name"),
    ("kind: Timeout", "timed out"),
    ("operation timed out", "timed out"),
    ("ConnectionReset", "connection reset"),
    ("certificate", "TLS certificate not accepted"),
    ("InvalidContentType", "TLS handshake failed (is it an http:// server?)"),
    ("builder error", "request refused by the HTTP client (plain HTTP not allowed?)"),
)


def _unreachable(text: str) -> Optional[str]:
    """Why a request never got an answer, from obstore's error text, or None
    when the server answered (or the reason is unknown)."""
    connect = "kind: Connect" in text or "error sending request" in text or "builder error" in text
    for needle, reason in _REASONS:
        if needle in text and (connect or "Timeout" in needle or "timed out" in needle):
            return reason
    return "cannot connect" if "kind: Connect" in text else None


def _local(path: str) -> LocalStore:
    root = Path(os.path.expanduser(path or ".")).resolve()
    if root.exists() and not root.is_dir():
        raise StoreError(f"store directory '{root}' is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
    except (BaseError, OSError) as exc:
        raise StoreError(f"store directory '{root}' cannot be used: {exc}") from exc
