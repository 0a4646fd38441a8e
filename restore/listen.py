"""The Unix sockets a server listens on: what each is (Listen: path, owner,
mode, the uids served on it), and binding them.

A server (restore.handler.Server) or a supervisor (restore.supervisor) binds
every socket it is given, or none: open_listeners closes and unlinks the
ones it bound when a later one fails. A socket is created 0600 (umask) and
only then given its owner and mode, so no other user can connect between
bind and chmod.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .errors import InputError

MAX_ID = 0xFFFFFFFE  # the largest uid or gid (0xFFFFFFFF is -1: "unchanged")
MODE_BITS = 0o770  # socket modes may give owner and group access, never others


@dataclass(frozen=True)
class Listen:
    """One listening socket of a Server: its path, the (uid, gid) it is
    given to (None: this process's; gid -1: unchanged), its mode, and the
    uids whose VMMs are served on it (SO_PEERCRED; None: this process's
    own). A server with one Listen per jail serves many jails, each VMM
    only on its own jail's socket."""

    path: str
    owner: Optional[tuple[int, int]] = None
    mode: int = 0o600
    allowed_uids: Optional[frozenset[int]] = None

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        if not self.path or "\0" in self.path:
            raise InputError(f"socket path {self.path!r} is empty or has a NUL character")
        if self.owner is not None:
            uid, gid = self.owner
            if not 0 <= uid <= MAX_ID or not (gid == -1 or 0 <= gid <= MAX_ID):
                raise InputError(f"socket {self.path}: owner {uid}:{gid} is not a uid and gid in 0..{MAX_ID}")
            object.__setattr__(self, "owner", (int(uid), int(gid)))
        if not isinstance(self.mode, int) or isinstance(self.mode, bool) or self.mode & ~MODE_BITS or self.mode < 0:
            raise InputError(f"socket {self.path}: mode {self.mode:#o} gives access to others than its owner and "
                             f"group (allowed bits: {MODE_BITS:04o})" if isinstance(self.mode, int)
                             else f"socket {self.path}: mode {self.mode!r} is not a number")
        if self.allowed_uids is not None:
            uids = frozenset(self.allowed_uids)
            if not uids:
                raise InputError(f"socket {self.path}: its allowed uids are empty: no VMM could ever be served")
            bad = [u for u in uids if not 0 <= u <= MAX_ID]
            if bad:
                raise InputError(f"socket {self.path}: allowed uid {bad[0]} is not in 0..{MAX_ID}")
            object.__setattr__(self, "allowed_uids", uids)

    @property
    def allowed(self) -> frozenset[int]:
        """The uids served on this socket."""
        return self.allowed_uids if self.allowed_uids is not None else frozenset({os.getuid()})

    def describe(self) -> str:
        """"owner U:G, mode 0600, allows U, ...", as the start-up log says."""
        if self.owner is None:
            owner = f"{os.getuid()}:{os.getgid()}"
        else:
            owner = f"{self.owner[0]}" + (f":{self.owner[1]}" if self.owner[1] != -1 else "")
        return f"owner {owner}, mode {self.mode:04o}, allows {', '.join(map(str, sorted(self.allowed)))}"


def check_listens(listens: Iterable[Listen]) -> list[Listen]:
    """listens as a list, refusing none and a path given twice."""
    out = list(listens)
    if not out:
        raise InputError("no socket to listen on")
    seen: dict[str, str] = {}
    for lst in out:
        key = os.path.normpath(os.path.abspath(lst.path))
        if key in seen:
            raise InputError(f"socket path {lst.path} is given twice")
        seen[key] = lst.path
    return out


def listen_socket(path: str, owner: Optional[tuple[int, int]] = None, mode: int = 0o600) -> socket.socket:
    """Bind and listen on a Unix socket at path, with mode (default 0600;
    see Listen) (replacing a stale socket a dead server left; refusing a
    path in use or not a socket). owner: (uid, gid) to give the socket to
    before it listens, so VMMs running as that uid can connect (gid -1:
    unchanged); None: this process's."""
    if mode & ~MODE_BITS or mode < 0:
        raise InputError(f"socket path {path}: mode {mode:#o} gives access to others than its owner and group")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise InputError(f"socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # a stale socket left by a server that died
        else:
            raise InputError(f"socket path {path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket is created 0600, then given its mode
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise InputError(f"socket path {path} cannot be bound: {exc.strerror}") from None
    finally:
        os.umask(old)
    try:
        if owner is not None:
            os.chown(path, *owner)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        whom = f" to uid {owner[0]}" if owner is not None else ""
        raise InputError(f"socket path {path} cannot be given mode {mode:04o}{whom}: {exc.strerror}") from None
    sock.listen(64)
    return sock


def open_listeners(listens: Sequence[Listen]) -> list[socket.socket]:
    """A listening socket for each of listens, in order; all or none (a
    failure closes and unlinks the ones already bound, then raises)."""
    socks: list[socket.socket] = []
    try:
        for lst in listens:
            socks.append(listen_socket(lst.path, lst.owner, lst.mode))
    except BaseException:
        close_listeners(socks, listens)
        raise
    return socks


def close_listeners(socks: Sequence[socket.socket], listens: Sequence[Listen], unlink: bool = True) -> None:
    """Close each socket of open_listeners and (when unlink) remove its path."""
    for sock, lst in zip(socks, listens):
        sock.close()
        if unlink:
            try:
                os.unlink(lst.path)
            except FileNotFoundError:
                pass
