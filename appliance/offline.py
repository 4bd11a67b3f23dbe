"""The offline guard: refuse every network connection that does not stay on this machine.

The appliance has no reason to reach the network; a library that tries (telemetry, a model hub, an
update check) is stopped with a message naming the code that tried. Loopback and Unix sockets stay
allowed (local tools such as a llama.cpp server used for benchmarks live there).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import traceback
from collections.abc import Iterator
from typing import Any

from .errors import ApplianceError


class NetworkBlocked(ApplianceError):
    """Something tried to open a network connection."""


_originals: dict[str, Any] = {}
_allowed: set[str] = set()  # hosts given on the command line (a Ray cluster's address) and their addresses


def _is_local(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in ("localhost", "") or host in _allowed:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it would already be network traffic


def _culprit() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if not frame.filename.endswith(("socket.py", "offline.py")):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "unknown code"


def _refuse(address: Any) -> None:
    raise NetworkBlocked(f"network access blocked (the appliance is offline): {_culprit()} tried to reach {address!r}")


def install() -> None:
    """Arm the guard for this process (idempotent)."""
    if _originals:
        return
    _originals["connect"] = socket.socket.connect
    _originals["connect_ex"] = socket.socket.connect_ex
    _originals["sendto"] = socket.socket.sendto
    _originals["getaddrinfo"] = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family != getattr(socket, "AF_UNIX", None) and not _is_local(address):
            _refuse(address)
        return _originals["connect"](self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if self.family != getattr(socket, "AF_UNIX", None) and not _is_local(address):
            _refuse(address)
        return _originals["connect_ex"](self, address)

    def sendto(self: socket.socket, data: bytes, *args: Any) -> Any:
        address = args[-1]
        if self.family != getattr(socket, "AF_UNIX", None) and not _is_local(address):
            _refuse(address)
        return _originals["sendto"](self, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_local((host,)):
            _refuse(host)
        return _originals["getaddrinfo"](host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]


def allow(hosts: list[str]) -> None:
    """Allow connections to these hosts (names or addresses; a name's addresses too) and nothing else
    beyond loopback: the cluster address the user gave on the command line."""
    for host in hosts:
        _allowed.add(host)
        resolve = _originals.get("getaddrinfo", socket.getaddrinfo)
        try:
            _allowed.update(info[4][0] for info in resolve(host, None))
        except OSError:
            pass  # not resolvable here: connecting to it fails with the resolver's own message


def uninstall() -> None:
    if not _originals:
        return
    socket.socket.connect = _originals.pop("connect")  # type: ignore[method-assign]
    socket.socket.connect_ex = _originals.pop("connect_ex")  # type: ignore[method-assign]
    socket.socket.sendto = _originals.pop("sendto")  # type: ignore[method-assign]
    socket.getaddrinfo = _originals.pop("getaddrinfo")  # type: ignore[assignment]


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """The guard for the length of a `with` block: the Python API's calls when asked (`offline=True`);
    left as it was found afterwards (still armed if it was)."""
    was_armed = bool(_originals)
    install()
    try:
        yield
    finally:
        if not was_armed:
            uninstall()
