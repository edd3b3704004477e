"""Device settings: RPC server endpoints, checked before llama.cpp sees them.

llama.cpp's RPC client aborts the process when it cannot reach a server or the handshake
fails, so every endpoint is parsed and greeted here first: a server that is down, a port
where something else listens, or a server speaking another protocol version raises
``ConnectionError`` (bad syntax: ``ValueError``). A server serves one client connection at a
time: one that this process is connected to already (another open model) cannot answer the
greeting, which is then accepted after a short wait.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import List, Optional, Tuple

from . import _core

_HELLO = 14                 # the RPC protocol's handshake command
_CONN_CAPS_SIZE = 24        # capability bytes in its request and response
_connected: set = set()
_lock = threading.Lock()


def parse_rpc_servers(spec: Optional[str]) -> List[Tuple[str, int]]:
    """``"host:port,host:port"`` -> [(host, port), ...] (llama-cpp-python's ``rpc_servers``)."""
    if spec is None:
        return []
    if not isinstance(spec, str):
        raise TypeError(f"rpc_servers must be a string like '127.0.0.1:50052', not {type(spec).__name__}")
    out = []
    for item in spec.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rpc_servers: {item!r} is not host:port (port 1-65535)")
        out.append((host.strip("[]"), int(port)))
    if len(set(out)) != len(out):
        raise ValueError("rpc_servers lists a server twice")
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection was closed during the handshake")
        data += chunk
    return data


def _greet(host: str, port: int, timeout: float) -> None:
    """The RPC handshake: raises ConnectionError unless an RPC server of our version answers."""
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(bytes([_HELLO]) + struct.pack("<Q", _CONN_CAPS_SIZE) + bytes(_CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != 4 + _CONN_CAPS_SIZE:
                raise ConnectionError(f"{where} did not answer like a llama.cpp RPC server")
            major = _recv_exact(sock, size)[0]
    except socket.timeout as e:
        raise ConnectionError(f"no answer from the RPC server at {where} within {timeout:g} s "
                              "(is it busy serving another client?)") from e
    except OSError as e:
        if isinstance(e, ConnectionError) and str(e).startswith(where):
            raise
        raise ConnectionError(f"could not reach the RPC server at {where}: {e}") from e
    if major != _core.RPC_PROTO_MAJOR_VERSION:
        raise ConnectionError(f"the RPC server at {where} speaks protocol version {major}, this build "
                              f"{_core.RPC_PROTO_MAJOR_VERSION}: use an rpc-server of the same llama.cpp")


def check_rpc_servers(spec: Optional[str], timeout: float = 5.0) -> str:
    """Validate and greet the servers of ``spec``; returns the normalised comma-separated list."""
    servers = parse_rpc_servers(spec)
    if servers and not _core.RPC_AVAILABLE:
        raise ValueError("rpc_servers needs a build with llama.cpp's RPC backend (-DGGML_RPC=ON)")
    with _lock:
        for host, port in servers:
            try:
                _greet(host, port, 1.0 if (host, port) in _connected else timeout)
            except ConnectionError as e:
                # a server this process is connected to serves that connection and cannot
                # answer a second one; anything else (refused, unknown host) is an error
                if (host, port) not in _connected or not isinstance(e.__cause__, socket.timeout):
                    raise
            _connected.add((host, port))
    return ",".join(f"{h}:{p}" for h, p in servers)
