"""One probe attempt: a TCP connect, an HTTP GET or a command, bounded by its timeout.

Each check is a coroutine on the prober's event loop and returns ``(ok, message)``; the message
says what failed in words a user reads in events (``HTTP probe failed with statuscode: 500``,
as the kubelet says). Sockets go from the node into the pod's network: the pod's IP for a pod
with a network of its own, loopback for a process pod or a pod on the host's network.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from common.errors import RikletError

# (argv, timeout) -> (exit code, output): runs a command inside the container (its driver's)
ExecRunner = Callable[[list[str], float], Awaitable[tuple[int, bytes]]]

MAX_HEAD = 4096             # bytes of an HTTP answer read to find its status line
_USER_AGENT = b"riklet-probe/1"
_tls: ssl.SSLContext | None = None


def _insecure_tls() -> ssl.SSLContext:
    """HTTPS probes do not verify the certificate, as the kubelet's do not."""
    global _tls
    if _tls is None:
        _tls = ssl.create_default_context()
        _tls.check_hostname = False
        _tls.verify_mode = ssl.CERT_NONE
    return _tls


def _why(exc: BaseException) -> str:
    """An error in the words of its errno (asyncio's connect errors carry only the address)."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(host), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def tcp(host: str, port: int) -> tuple[bool, str]:
    try:
        sock = await _connect(host, port)
    except OSError as exc:
        return False, f"dial tcp {host}:{port}: connect: {_why(exc)}"
    sock.close()
    return True, ""


def http_request(path: str, host: str, port: int, headers: list[Mapping[str, str]]) -> bytes:
    names = {h["name"].lower() for h in headers}
    lines = [f"GET {path} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}:{port}")
    if "user-agent" not in names:
        lines.append("User-Agent: " + _USER_AGENT.decode())
    lines += [f"{h['name']}: {h['value']}" for h in headers]
    lines += ["Accept: */*", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1", "replace")


def status_code(head: bytes) -> int | None:
    """The status code of an HTTP answer's first line, or None when it is not one."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


async def http(host: str, port: int, path: str, scheme: str,
               headers: list[Mapping[str, str]]) -> tuple[bool, str]:
    request = http_request(path, host, port, headers)
    url = f"{scheme.lower()}://{host}:{port}{path}"
    try:
        if scheme == "HTTPS":
            reader, writer = await asyncio.open_connection(host, port, ssl=_insecure_tls())
            try:
                writer.write(request)
                head = await reader.read(MAX_HEAD)
            finally:
                writer.close()
        else:
            loop = asyncio.get_running_loop()
            sock = await _connect(host, port)
            try:
                await loop.sock_sendall(sock, request)
                head = b""
                while b"\n" not in head and len(head) < MAX_HEAD:
                    chunk = await loop.sock_recv(sock, MAX_HEAD)
                    if not chunk:
                        break
                    head += chunk
            finally:
                sock.close()
    except (OSError, ssl.SSLError) as exc:
        return False, f"Get \"{url}\": {_why(exc)}"
    code = status_code(head)
    if code is None:
        return False, f"Get \"{url}\": not an HTTP answer"
    if 200 <= code < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {code}"


async def command(run: ExecRunner | None, argv: list[str], timeout: float) -> tuple[bool, str]:
    if run is None:
        return False, "this pod's runtime cannot run exec probes"
    try:
        code, output = await run(argv, timeout)
    except (OSError, ValueError, RikletError) as exc:
        return False, f"exec {argv[0]}: {exc.message if isinstance(exc, RikletError) else exc}"
    if code == 0:
        return True, ""
    text = output.decode("utf-8", "replace").strip()[-512:]
    return False, f"command {argv[0]!r} exited with {code}" + (f": {text}" if text else "")


async def run_check(probe: Mapping[str, Any], host: str, run: ExecRunner | None) -> tuple[bool, str]:
    """One attempt of ``probe`` (normalized, see common.probespec), within its timeout."""
    timeout = float(probe["timeoutSeconds"])
    if "exec" in probe:
        return await command(run, list(probe["exec"]["command"]), timeout)
    if "tcpSocket" in probe:
        spec = probe["tcpSocket"]
        coro = tcp(spec.get("host") or host, int(spec["port"]))
    else:
        spec = probe["httpGet"]
        coro = http(spec.get("host") or host, int(spec["port"]), spec["path"], spec["scheme"],
                    spec.get("httpHeaders") or [])
    try:
        async with asyncio.timeout(timeout):   # no task of its own, unlike wait_for
            return await coro
    except TimeoutError:
        return False, f"timeout: no answer within {timeout:g}s"
