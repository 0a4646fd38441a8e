"""The `restore` command, run as a real child process: the README's flows,
exit codes, and one-line errors for bad arguments."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest

from restore.snapshot import load_manifest
from restore.tiers.durable import DurableStore


@pytest.fixture
def image(make_image):
    return make_image(2 << 20, seed=5)


def test_create_ls_inspect_verify_export(tmp_path, run_cli, image):
    store = f"file://{tmp_path / 'store'}"
    out = run_cli("snapshot", "create", str(image), "--name", "fn", "--store", store, check=True)
    assert re.fullmatch(
        r"created fn/1 in file://\S+: 2\.0 MiB of memory, 4 chunks, [\d.]+ [KM]iB stored, [\d.]+ [KM]iB uploaded\n",
        out.stdout,
    ), out.stdout
    assert out.stderr == ""  # not a terminal: no progress bar

    ls = run_cli("snapshot", "ls", "--store", store, check=True)
    assert re.fullmatch(r"fn/1  ACTIVE   \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n", ls.stdout), ls.stdout

    text = run_cli("snapshot", "inspect", "fn", "--store", store, check=True).stdout
    for label in ("memory size:", "zero pages:", "stored bytes:", "compression ratio:", "dedup savings:", "chunks:", "state:"):
        assert label in text
    assert "memory size:       2.0 MiB (2097152 bytes)" in text
    assert "state:             ACTIVE" in text

    figures = json.loads(run_cli("snapshot", "inspect", "fn", "--json", "--store", store, check=True).stdout)
    m = load_manifest(DurableStore(store), "fn")
    assert figures["chunks"] == 4 and figures["memory_size"] == 2 << 20
    assert figures["zero_pages"] == m.pages - m.nonzero_pages()
    assert figures["compression_ratio"] > 1

    v = run_cli("snapshot", "verify", "fn", "--store", store, check=True)
    assert v.stdout == "fn/1: all 4 chunks verified\n"

    run_cli("snapshot", "export", "fn", "copy.img", "--store", store, check=True)
    assert (tmp_path / "copy.img").read_bytes() == image.read_bytes()
    # The L1 directory is --cache, as on serve and try (--cache-dir still works).
    for flag, cache in (("--cache", "l1-a"), ("--cache-dir", "l1-b")):
        run_cli("snapshot", "export", "fn", f"{cache}.img", "--store", store, flag, str(tmp_path / cache), check=True)
        assert (tmp_path / f"{cache}.img").read_bytes() == image.read_bytes()
        assert len(list((tmp_path / cache).glob("*/*"))) == 4  # the four chunks, cached


def test_create_draws_its_progress_on_a_terminal_only(tmp_path, run_cli, image):
    store = f"file://{tmp_path / 'store'}"
    scripted = run_cli("snapshot", "create", str(image), "--name", "a", "--store", store, check=True)
    assert scripted.stderr == ""  # stderr is a pipe: no bar
    # stderr on a terminal: the bar is drawn and ends at the file's size.
    terminal, child_end = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "restore", "snapshot", "create", str(image), "--name", "b",
                             "--store", store], stdout=subprocess.PIPE, stderr=child_end, cwd=tmp_path,
                            env={**os.environ, "COLUMNS": "120"})
    os.close(child_end)
    drawn = b""
    while True:
        try:
            data = os.read(terminal, 65536)
        except OSError:  # EIO: the command has closed the terminal
            break
        if not data:
            break
        drawn += data
    os.close(terminal)
    assert proc.wait(60) == 0, drawn
    assert re.search(r"snapshot .*2\.0/2\.0 MiB", drawn.decode(errors="replace")), drawn


def test_store_from_environment_and_plain_path(tmp_path, run_cli, image):
    env = {"RESTORE_STORE": str(tmp_path / "envstore")}
    run_cli("snapshot", "create", str(image), "--name", "fn", "--chunk-size", "1M", env=env, check=True)
    assert (tmp_path / "envstore" / "snapshots" / "fn" / "1" / "manifest.json").exists()
    assert json.loads(run_cli("snapshot", "inspect", "fn", "--json", env=env, check=True).stdout)["chunks"] == 2


def test_encrypted_flow_and_key_errors(tmp_path, run_cli, image):
    store = f"file://{tmp_path / 'store'}"
    run_cli("key", "generate", "k.hex", check=True)
    assert (tmp_path / "k.hex").stat().st_mode & 0o777 == 0o600
    run_cli("snapshot", "create", str(image), "--name", "sec", "--key-file", "k.hex", "--store", store, check=True)

    no_key = run_cli("snapshot", "verify", "sec", "--store", store)
    assert no_key.returncode == 1
    assert no_key.stderr == "error: snapshot sec/1 is encrypted: give its key (--key-file or --key-env)\n"

    run_cli("key", "generate", "other.hex", check=True)
    wrong = run_cli("snapshot", "verify", "sec", "--key-file", "other.hex", "--store", store)
    assert wrong.returncode == 1
    assert wrong.stderr == "error: the key given is not the key of snapshot sec/1 (key check differs)\n"

    hexkey = (tmp_path / "k.hex").read_text().strip()
    ok = run_cli("snapshot", "verify", "sec", "--key-env", "MY_KEY", "--store", store, env={"MY_KEY": hexkey})
    assert ok.returncode == 0, ok.stderr

    again = run_cli("key", "generate", "k.hex")
    assert again.returncode == 1
    assert again.stderr == "error: key file 'k.hex' already exists; refusing to overwrite a key\n"


def test_verify_names_bad_chunk_and_exits_nonzero(tmp_path, run_cli, image):
    store_dir = tmp_path / "store"
    run_cli("snapshot", "create", str(image), "--name", "fn", "--store", str(store_dir), check=True)
    m = load_manifest(DurableStore(str(store_dir)), "fn")
    idx = next(i for i, c in enumerate(m.chunks) if c.id and i > 0)
    obj = store_dir / "chunks" / m.chunks[idx].id
    data = bytearray(obj.read_bytes())
    data[-1] ^= 1
    obj.write_bytes(data)
    v = run_cli("snapshot", "verify", "fn", "--store", str(store_dir))
    assert v.returncode == 1
    assert v.stderr == (
        f"BAD chunk {idx} at offset {idx * 512 * 1024:#x}: snapshot fn/1 chunk {idx} at offset {idx * 512 * 1024:#x}: "
        "SHA-256 of the stored bytes is not the chunk id (from rs_chunk_decode)\n"
        "fn/1: 1 of 4 chunks bad\n"
    )


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["snapshot", "create", "missing.img", "--name", "x"], 1, "error: memory file 'missing.img': no such file\n"),
        (["snapshot", "create", "IMG", "--name", "x", "--chunk-size", "3000"], 1,
         "error: chunk size 3000 is not a power of two of at least 4096 bytes\n"),
        (["snapshot", "create", "IMG", "--name", "x", "--chunk-size", "2K"], 1,
         "error: chunk size 2048 is not a power of two of at least 4096 bytes\n"),
        (["snapshot", "create", "IMG", "--name", "x", "--store", "ftp://h/p"], 1,
         "error: store URL 'ftp://h/p': unknown scheme 'ftp' (use one of file://, memory://, s3://, gs://, az://)\n"),
        (["snapshot", "create", "IMG", "--name", "a/b"], 1,
         "error: snapshot name 'a/b' is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit\n"),
        (["snapshot", "create", "IMG", "--name", "x", "--key-file", "nokey"], 1, "error: key file 'nokey': no such file\n"),
        (["snapshot", "create", "IMG", "--name", "x", "--key-env", "UNSET_VAR_XYZ"], 1,
         "error: environment variable UNSET_VAR_XYZ is not set\n"),
        (["snapshot", "inspect", "nothing"], 1, "error: no snapshot named 'nothing' in file://STORE\n"),
    ],
)
def test_bad_arguments(tmp_path, run_cli, image, args, code, message):
    store = f"file://{tmp_path / 'store'}"
    args = [str(image) if a == "IMG" else a for a in args]
    if "--store" not in args:
        args += ["--store", store]
    proc = run_cli(*args)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == message.replace("file://STORE", store)
    assert not (tmp_path / "store" / "snapshots").exists()


def test_usage_errors_exit_2(run_cli):
    proc = run_cli("snapshot", "create", "x.img", "--chunk-size", "lots", "--name", "x")
    assert proc.returncode == 2
    assert "Invalid value for '--chunk-size': 'lots' is not a size (use bytes or a K/M/G suffix, e.g. 512K)" in proc.stderr
    proc = run_cli("snapshot", "create", "x.img")
    assert proc.returncode == 2 and "Missing option '--name'" in proc.stderr
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "No such command 'frobnicate'" in proc.stderr


def test_existing_version_exits_1(tmp_path, run_cli, image):
    store = f"file://{tmp_path / 'store'}"
    run_cli("snapshot", "create", str(image), "--name", "fn", "--version", "v1", "--store", store, check=True)
    proc = run_cli("snapshot", "create", str(image), "--name", "fn", "--version", "v1", "--store", store)
    assert proc.returncode == 1
    assert proc.stderr == "error: snapshot fn/v1 already exists; versions are immutable (choose another --version)\n"


def test_version_and_help(run_cli):
    assert run_cli("--version", check=True).stdout == "restore, version 0.1.0\n"
    assert "create" in run_cli("snapshot", "--help", check=True).stdout


def test_commands_start_no_openblas_threads_unless_asked(tmp_path):
    """numpy's OpenBLAS would start a spinning thread per core besides the
    first; the command asks for none, and a user's setting stands."""
    run = "from restore.cli import main; import os; main(['sample-image', 's.img', '--size', '1M']); " \
          "print(len(os.listdir('/proc/self/task')))"

    def threads(**env) -> int:
        full = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | env
        out = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, env=full, cwd=tmp_path,
                             timeout=120, check=True).stdout
        return int(out.split()[-1])

    assert threads() == 1
    assert threads(OPENBLAS_NUM_THREADS="2") == 2


def test_sample_image_and_rm(tmp_path, run_cli):
    run_cli("sample-image", "s.img", "--size", "1M", "--seed", "3", check=True)
    assert (tmp_path / "s.img").stat().st_size == 1 << 20
    bad = run_cli("sample-image", "t.img", "--size", "5000")
    assert bad.returncode == 1 and bad.stderr == "error: sample image size 5000 is not a positive multiple of 4096 bytes\n"
    store = f"file://{tmp_path / 'store'}"
    run_cli("snapshot", "create", "s.img", "--name", "fn", "--store", store, check=True)
    assert run_cli("snapshot", "rm", "fn", "--version", "1", "--store", store, check=True).stdout == "removed fn/1\n"
    gone = run_cli("snapshot", "rm", "fn", "--version", "1", "--store", store)
    assert gone.returncode == 1 and gone.stderr == f"error: no snapshot fn/1 in {store}\n"


def test_inspect_shows_a_pending_version(tmp_path, run_cli):
    store = DurableStore(str(tmp_path / "store"))
    store.put("snapshots/fn/2/pending.json", b'{"pid": 4242, "host": "builder", "started": "2026-11-27T06:00:00Z"}')
    out = run_cli("snapshot", "inspect", "fn", "--version", "2", "--store", store.url, check=True).stdout
    assert out == (
        "snapshot:          fn/2\n"
        "state:             PENDING (chunks uploading, or the creation died)\n"
        "started:           2026-11-27T06:00:00Z by pid 4242 on builder\n"
    )
    figures = json.loads(run_cli("snapshot", "inspect", "fn", "--version", "2", "--json", "--store", store.url, check=True).stdout)
    assert figures == {"name": "fn", "version": "2", "state": "PENDING", "pid": 4242, "host": "builder", "started": "2026-11-27T06:00:00Z"}
    ls = run_cli("snapshot", "ls", "--store", store.url, check=True).stdout
    assert ls.startswith("fn/2  PENDING")


def test_every_snapshot_command_names_a_version_as_name_colon_version(tmp_path, run_cli):
    """inspect, verify, export and rm take NAME:VERSION, as try, plan and
    optimize do; --version stays as the other spelling of the same thing."""
    run_cli("sample-image", "s.img", "--size", "1M", "--seed", "4", check=True)
    store = f"file://{tmp_path / 'store'}"
    for _ in range(2):
        run_cli("snapshot", "create", "s.img", "--name", "fn", "--store", store, check=True)
    colon = run_cli("snapshot", "inspect", "fn:1", "--json", "--store", store, check=True).stdout
    option = run_cli("snapshot", "inspect", "fn", "--version", "1", "--json", "--store", store, check=True).stdout
    assert json.loads(colon)["version"] == "1" and colon == option
    assert json.loads(run_cli("snapshot", "inspect", "fn", "--json", "--store", store, check=True).stdout)["version"] == "2"
    assert run_cli("snapshot", "verify", "fn:1", "--store", store, check=True).stdout.startswith("fn/1: all ")
    run_cli("snapshot", "export", "fn:1", "back.img", "--store", store, check=True)
    assert (tmp_path / "back.img").read_bytes() == (tmp_path / "s.img").read_bytes()
    both = run_cli("snapshot", "inspect", "fn:1", "--version", "2", "--store", store)
    assert both.returncode == 2 and "fn:1 and --version 2 name different versions" in both.stderr
    nameless = run_cli("snapshot", "rm", "fn", "--store", store)
    assert nameless.returncode == 2 and "name the version to remove: fn:VERSION" in nameless.stderr
    assert run_cli("snapshot", "rm", "fn:2", "--store", store, check=True).stdout == "removed fn/2\n"
    assert [line.split()[0] for line in run_cli("snapshot", "ls", "--store", store, check=True).stdout.splitlines()] \
        == ["fn/1"]
