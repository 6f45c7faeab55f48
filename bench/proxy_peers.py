"""The processes of the proxy benchmark: backend, UDP echo, HAProxy, nginx stream.

Each is started pinned to a CPU with ``taskset`` (which execs, so the pid we hold is the
server's own: ``kill -9`` of it is the kill of that proxy), from configs written to a temp dir.
nginx runs with ``master_process off``: one process that does all the work. riklet runs as a
real agent (bench.riklet_agent).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

LOAD_CPU, PROXY_CPU = "0", "1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_tools() -> None:
    """Install the Debian packages of the peers when one is missing (root only)."""
    tools = ("haproxy", "nginx", "wrk", "taskset", "nft", "conntrack")
    missing = [t for t in tools if shutil.which(t) is None]
    if not _stream_module() and shutil.which("nginx"):
        missing.append("libnginx-mod-stream")
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {missing}: apt-get install haproxy nginx libnginx-mod-stream wrk "
                         "nftables conntrack")
    pkgs = ["haproxy", "nginx", "libnginx-mod-stream", "wrk", "nftables", "conntrack"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True, env=env)


def _stream_module() -> str | None:
    """'' when nginx has stream built in, the module's path when it is dynamic, else None."""
    try:
        flags = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    except FileNotFoundError:
        return None
    if "--with-stream " in flags + " " and "--with-stream=dynamic" not in flags:
        return ""
    path = "/usr/lib/nginx/modules/ngx_stream_module.so"
    return path if os.path.exists(path) else None


@dataclass
class Peer:
    name: str
    argv: list[str]
    cpu: str
    wait_tcp: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, log_dir: str) -> Peer:
        log_path = os.path.join(log_dir, f"{self.name}.log")
        with open(log_path, "wb") as log:   # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(["taskset", "-c", self.cpu, *self.argv],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.wait_tcp is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start; see {log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.wait_tcp), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.2)   # UDP sockets are bound by then too
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        """``kill -9`` of the server process, reaped."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _write(tmp: str, name: str, text: str) -> str:
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def _nginx_head(tmp: str, name: str) -> str:
    module = _stream_module()
    load = f"load_module {module};\n" if module else ""
    return (f"{load}daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {tmp}/{name}.pid;\nerror_log {tmp}/{name}.err warn;\n"
            "events { worker_connections 16384; multi_accept on; }\n")


def backend(tmp: str, port: int, *more: int) -> Peer:
    """nginx serving /1k and /1m with keep-alive that outlasts any run, on ``port`` and any
    ``more`` ports (one process, the same server on each)."""
    www = os.path.join(tmp, "www")
    os.makedirs(www, exist_ok=True)
    for name, size in (("1k", 1024), ("1m", 1024 * 1024)):
        with open(os.path.join(www, name), "wb") as f:
            f.write(b"x" * size)
    conf = _nginx_head(tmp, "backend") + (
        "http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 10000000;\n"
        "  keepalive_timeout 300s; default_type application/octet-stream;\n"
        f"  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/ptmp;\n"
        f"  fastcgi_temp_path {tmp}/f; uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;\n"
        "  server { " + "".join(f"listen 127.0.0.1:{p} backlog=4096; " for p in (port, *more))
        + f"root {www}; }} }}\n")
    path = _write(tmp, "backend.conf", conf)
    return Peer("backend", ["nginx", "-p", tmp, "-c", path], LOAD_CPU, wait_tcp=port)


def haproxy(tmp: str, name: str, port: int, upstream: int, bufsize: int | None = None) -> Peer:
    tune = f"  tune.bufsize {bufsize}\n" if bufsize else ""
    conf = ("global\n  nbthread 1\n  maxconn 8000\n" + tune +
            "defaults\n  mode tcp\n  timeout connect 3s\n  timeout client 300s\n"
            "  timeout server 300s\n"
            f"listen bench\n  bind 127.0.0.1:{port}\n  server b 127.0.0.1:{upstream}\n")
    path = _write(tmp, f"{name}.cfg", conf)
    return Peer(name, ["haproxy", "-db", "-f", path], PROXY_CPU, wait_tcp=port)


def nginx_stream(tmp: str, name: str, port: int, upstream: int, udp_port: int, udp_upstream: int,
                 buffer: str | None = None) -> Peer:
    buf = f"proxy_buffer_size {buffer}; " if buffer else ""
    conf = _nginx_head(tmp, name) + (
        "stream {\n"
        f"  server {{ listen 127.0.0.1:{port} backlog=4096; {buf}proxy_pass 127.0.0.1:{upstream}; }}\n"
        f"  server {{ listen 127.0.0.1:{udp_port} udp; proxy_timeout 60s;"
        f" proxy_pass 127.0.0.1:{udp_upstream}; }}\n}}\n")
    path = _write(tmp, f"{name}.conf", conf)
    return Peer(name, ["nginx", "-p", tmp, "-c", path], PROXY_CPU, wait_tcp=port)


def udp_echo(port: int) -> Peer:
    return Peer(f"udp-echo-{port}", [sys.executable, "-m", "bench.udp_load", "echo", str(port)], LOAD_CPU)
