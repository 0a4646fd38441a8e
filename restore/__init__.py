"""restore: a userspace memory-restore engine for microVM snapshots.

Snapshots are a VM's memory file cut into fixed-size chunks, compressed,
optionally encrypted, stored content-addressed in an object store and
described by a manifest. See README.md and docs/ (tiers, formats,
prefetch, serving, firecracker) for the architecture.
"""

from ._version import __version__

__all__ = ["__version__"]
