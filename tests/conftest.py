"""Shared fixtures: stores, sample images and keys, all real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from restore.sample import write_sample_image
from restore.tiers.durable import DurableStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path) -> DurableStore:
    """A file:// store in a fresh directory."""
    return DurableStore(f"file://{tmp_path / 'store'}")


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
