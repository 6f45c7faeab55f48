"""Authentication of riklet's two APIs (the Node gRPC API and the CHaS HTTP API): one bearer
token, and TLS (mutual when a CA is configured) from the same files.

The token lives in a file (``auth.token_file``, default ``<state_dir>/api-token``), made with
mode 0600 on first start when absent; clients on the node (rikletctl) read the same file.

Non-root clients: when the group ``riklet`` exists (another name with ``RIKLET_GROUP``; an empty
value turns this off), the agent shares the token with it: the file becomes 0640 owner:riklet
(also a file made before the group was, at the next start), and the directory holding it and the
state directory gain the group and its search bit only (0710: members reach the token by its
name but cannot list the directory, nor read anything else that is not theirs). Bits are only
added, a directory the agent does not own is left alone, and without the group everything
stays 0600/0700.
"""

from __future__ import annotations

import contextlib
import grp
import hmac
import ipaddress
import os
import secrets
import ssl
from collections.abc import Callable
from typing import Any

from common.errors import InvalidArgument

HEADER = "authorization"
PREFIX = "Bearer "
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # liveness probes carry no data: no token needed
GROUP_ENV = "RIKLET_GROUP"
DEFAULT_GROUP = "riklet"


def access_group() -> int | None:
    """The gid of the group whose members may read the token, when that group exists."""
    name = os.environ.get(GROUP_ENV, DEFAULT_GROUP)
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def open_to_group(directory: str, gid: int | None = None) -> None:
    """Let the access group search ``directory`` (g+x, group set to it) when the group exists,
    the directory is ours and its others may not search it already. Best effort: a directory
    that cannot be changed stays as it is (rikletctl then needs root)."""
    gid = access_group() if gid is None else gid
    if gid is None:
        return
    with contextlib.suppress(OSError):
        st = os.stat(directory)
        if st.st_uid != os.geteuid() or st.st_mode & 0o001 or (st.st_gid == gid and st.st_mode & 0o010):
            return
        os.chown(directory, -1, gid)
        os.chmod(directory, (st.st_mode & 0o7777) | 0o010)


def _share(fd: int, gid: int | None) -> None:
    """The token file 0640 owner:group, when the access group exists and the file is ours."""
    if gid is None:
        return
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and (st.st_gid != gid or st.st_mode & 0o777 != 0o640):
            os.fchown(fd, -1, gid)
            os.fchmod(fd, 0o640)


def load_or_create_token(path: str) -> str:
    """The token in ``path``; a new random one (0600) when the file does not exist. Shared
    with the access group when it exists (see above)."""
    gid = access_group()
    with contextlib.suppress(FileNotFoundError):
        token = _read(path)
        if gid is not None:
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    _share(fd, gid)
                finally:
                    os.close(fd)
            open_to_group(os.path.dirname(os.path.abspath(path)), gid)
        return token
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    open_to_group(os.path.dirname(os.path.abspath(path)), gid)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another service made it first
        return _read(path)
    with os.fdopen(fd, "w") as fh:
        _share(fh.fileno(), gid)
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return token


def read_token(path: str) -> str | None:
    try:
        return _read(path)
    except (FileNotFoundError, PermissionError, InvalidArgument):
        return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        token = fh.read().strip()
    if len(token) < 16 or any(ch.isspace() for ch in token):
        raise InvalidArgument(f"{path} must hold one token of at least 16 characters", "auth.token_file")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries the token (compared in constant time)."""
    if not header or not header.startswith(PREFIX):
        return False
    return hmac.compare_digest(header[len(PREFIX):].strip().encode(), token.encode())


def is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return host == "localhost"


def check_exposure(host: str, tls: bool, insecure: bool, what: str, field: str) -> None:
    """A non-loopback listener without TLS sends the token in the clear: refuse to start,
    unless the operator said ``--insecure``."""
    if not is_loopback(host) and not tls and not insecure:
        raise InvalidArgument(f"{what} would listen on {host} without TLS: configure tls.cert_file and "
                              "tls.key_file, or start with --insecure", field)


def server_ssl_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load TLS files: {exc}", "tls") from exc
    return ctx


def grpc_server_credentials(cert: str, key: str, ca: str | None) -> Any:
    import grpc
    try:
        with open(cert, "rb") as fh:
            chain = fh.read()
        with open(key, "rb") as fh:
            private = fh.read()
        roots = None
        if ca:
            with open(ca, "rb") as fh:
                roots = fh.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read TLS files: {exc}", "tls") from exc
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def grpc_token_interceptor(token: Callable[[], str]) -> Any:
    """A server interceptor that refuses calls without ``authorization: Bearer <token>``."""
    import grpc

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "authorization: missing or wrong bearer token (see auth.token_file)")

    class _Interceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            if details.method.startswith(OPEN_METHODS):
                return continuation(details)
            header = dict(details.invocation_metadata or ()).get(HEADER)
            if bearer_ok(header if isinstance(header, str) else None, token()):
                return continuation(details)
            handler = continuation(details)
            if handler is None:
                return None
            # Refused as a request *stream* whatever the method is: the server then answers at
            # once instead of first holding a worker thread until the request message arrives,
            # which a client without the token may never send (a gRPC slowloris).
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(lambda it, ctx: deny(None, ctx))
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: deny(None, ctx))

    return _Interceptor()


def grpc_client_interceptors(token: str | Callable[[], str | None] | None) -> list[Any]:
    """Client interceptors adding the bearer token to every call (``token`` may be a function,
    asked on every call: a client started before the agent made its token still finds it)."""
    import grpc

    if not token:
        return []

    def header() -> str | None:
        value = token() if callable(token) else token
        return PREFIX + value if value else None

    class _Adder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        def _details(self, details: Any) -> Any:
            value = header()
            md = [*(details.metadata or ())] + ([(HEADER, value)] if value else [])
            return _Details(details.method, details.timeout, md, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

        def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

        def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
            return continuation(self._details(details), requests)

        def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
            return continuation(self._details(details), requests)

    return [_Adder()]


class _Details:
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any,
                 wait_for_ready: Any, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
