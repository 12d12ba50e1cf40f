"""Refuse every network connection except loopback, and record each refused attempt (loaded by Python at start-up).

Put this directory first on ``PYTHONPATH`` of a subprocess and set ``MEDREGA_NETGUARD_LOG`` to a file: every
``socket.connect``/``connect_ex``/``sendto`` to an address outside 127.0.0.0/8 and ::1, and every name lookup of a
host other than localhost, raises ``OSError`` and appends one line (``kind target`` + the innermost caller) to that
file. tests/test_offline_entry_points.py asserts the file stays empty.
"""
import ipaddress
import os
import socket
import traceback

_LOG = os.environ.get("MEDREGA_NETGUARD_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


def _record(kind: str, target: object) -> None:
    frames = traceback.extract_stack()[:-2]
    where = " <- ".join(f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}" for f in reversed(frames)
                        if "importlib._bootstrap" not in f.filename)
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{kind} {target!r} at {where}\n")


def _is_local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check_address(kind: str, family: int, address: object) -> None:
    if family == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not _is_local(host):
        _record(kind, address)
        raise OSError(f"netguard: network access to {address!r} refused in this test")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_sendto = socket.socket.sendto
_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    _check_address("connect", self.family, address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address("connect", self.family, address)
    return _connect_ex(self, address)


def _guarded_sendto(self, *args):
    _check_address("sendto", self.family, args[-1])
    return _sendto(self, *args)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_local(host) and host is not None:
        _record("getaddrinfo", host)
        raise socket.gaierror(socket.EAI_NONAME, f"netguard: lookup of {host!r} refused in this test")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.socket.sendto = _guarded_sendto
socket.getaddrinfo = _guarded_getaddrinfo
