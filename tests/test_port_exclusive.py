"""A host port is the pod's alone, or the pod is refused / fails naming the port and its holder.

On Linux two UDP sockets that both set SO_REUSEADDR share a port, the later one taking the
unicast datagrams: a probe or a listener with that option accepts a port another program
holds, or lets one take it later.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator

import pytest

from common import blocked_ports, holders
from common.ports import bindable
from services.proxy.routes import Endpoint
from tests.stack import Agent
from tests.support import free_port, wait_for
from tests.test_proxy_udp import Echo, Proxy, make_proxy

PY = sys.executable
UDP_ECHO = ("import os, socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('127.0.0.1', int(os.environ['PORT'])))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(2048)\n"
            "    s.sendto(b'pod:' + data, peer)\n")


def reuse_holder(port: int = 0, host: str = "0.0.0.0") -> socket.socket:
    """A program's UDP socket with SO_REUSEADDR, as many daemons open theirs."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    return s


def ask(port: int, payload: bytes = b"ping", timeout: float = 0.5) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(timeout)
        c.sendto(payload, ("127.0.0.1", port))
        try:
            return c.recv(2048)
        except TimeoutError:
            return None


@pytest.fixture
def udp_proxy() -> Iterator[Proxy]:
    p = make_proxy(udp_idle_timeout=60.0, retry_interval=0.1)
    yield p
    p.close()


# --- the probe and the holder ------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_probe_refuses_a_udp_port_held_with_reuseaddr(host: str) -> None:
    holder = reuse_holder(host=host)
    try:
        port = holder.getsockname()[1]
        assert not bindable("UDP", port)
        found = holders.holder("UDP", port)
        assert found is not None and found.pid == os.getpid()
        assert "python" in found.command or "pytest" in found.command
    finally:
        holder.close()
    assert bindable("UDP", port)


def test_holder_of_a_free_port_is_unknown() -> None:
    port = free_port(socket.SOCK_DGRAM)
    assert holders.holder("UDP", port) is None
    assert holders.describe("UDP", port) == "an unknown program"


# --- the proxy holds its ports alone -----------------------------------------------------------

def test_no_program_can_share_a_udp_port_the_proxy_holds(udp_proxy: Proxy) -> None:
    echo = Echo(b"pod:")
    port = free_port(socket.SOCK_DGRAM)
    try:
        udp_proxy.route(port, echo.port)
        assert ask(port) == b"pod:ping"
        for host in ("0.0.0.0", "127.0.0.1"):
            with pytest.raises(OSError):
                reuse_holder(port, host).close()
        assert ask(port, b"again") == b"pod:again"   # the flow's own socket still works
        assert ask(port, b"new client") == b"pod:new client"
    finally:
        echo.close()


def test_a_port_the_proxy_cannot_bind_is_blocked_naming_the_holder(udp_proxy: Proxy) -> None:
    holder = reuse_holder()
    port = holder.getsockname()[1]
    reported: list[dict[tuple[str, int], str]] = []
    udp_proxy.server.on_blocked = reported.append
    try:
        udp_proxy.run(udp_proxy.server.apply({("UDP", port): (Endpoint("127.0.0.1", 9),)}))
        message = udp_proxy.server.blocked()[("UDP", port)]
        assert f"{port}/UDP" in message and f"pid {os.getpid()}" in message
        assert reported and ("UDP", port) in reported[-1]
        # The route goes away (the pod is no longer Running): the port stays blocked.
        udp_proxy.run(udp_proxy.server.apply({}))
        assert ("UDP", port) in udp_proxy.server.blocked()
    finally:
        holder.close()
    # Freed: the next probe unblocks it and says so.
    wait_for(lambda: not udp_proxy.server.blocked(), 5, what="the port unblocked")
    assert reported[-1] == {}


def test_blocked_ports_file_round_trips(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), blocked_ports.FILE_NAME)
    blocked_ports.write(path, {("UDP", 5353): "host port 5353/UDP is in use on the node by pid 1 (x)"})
    reader = blocked_ports.Reader(path)
    assert reader.message([{"protocol": "UDP", "host_port": 5353}]) == \
        "host port 5353/UDP is in use on the node by pid 1 (x)"
    assert reader.message([{"protocol": "TCP", "host_port": 5353}]) is None
    blocked_ports.write(path, {})
    assert not os.path.exists(path) and reader.blocked() == {}
    with open(path, "w") as f:
        f.write('{"blocked": [{"protocol": "UDP", "port": true, "message": "x"}]}')
    assert reader.blocked() == {}


# --- end to end --------------------------------------------------------------------------------

def test_apply_refuses_a_udp_port_another_program_holds_with_reuseaddr(agent: Agent) -> None:
    holder = reuse_holder()
    port = holder.getsockname()[1]
    try:
        res = agent.ctl("run", "stolen", "--port", f"{port}:{free_port(socket.SOCK_DGRAM)}/udp",
                        "--", "sleep", "300", check=False)
    finally:
        holder.close()
    assert res.returncode != 0
    assert f"port {port}/UDP" in res.stderr and f"pid {os.getpid()}" in res.stderr, res.stderr
    assert [p["name"] for p in agent.pods()] == []


def test_pod_fails_while_a_program_holds_its_udp_port_and_recovers(agent: Agent) -> None:
    port = free_port(socket.SOCK_DGRAM)
    agent.ctl("run", "dns", "--port", f"{port}:0/udp", "--", PY, "-c", UDP_ECHO)
    agent.wait_phase("dns", "Running")
    wait_for(lambda: ask(port) == b"pod:ping", 10, what="the pod answering through the proxy")
    # The proxy restarts while a program grabs the port (the race apply cannot see).
    agent.supervisorctl("stop", "riklet:proxy")
    holder = wait_for(lambda: _try_hold(port), 15, what="the proxy letting go of the port")
    try:
        agent.supervisorctl("start", "riklet:proxy")
        pod = agent.wait_phase("dns", "Error", timeout=20)
        assert pod["reason"] == "PortInUse"
        assert f"{port}/UDP" in pod["message"] and f"pid {os.getpid()}" in pod["message"], pod
        # Every datagram reaches the program that holds the port, none the pod: nothing shared.
        holder.settimeout(2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"mine", ("127.0.0.1", port))
            assert holder.recv(100) == b"mine"
    finally:
        holder.close()
    agent.wait_phase("dns", "Running", timeout=20)
    wait_for(lambda: ask(port) == b"pod:ping", 10, what="the pod's traffic back")


def _try_hold(port: int) -> socket.socket | None:
    try:
        return reuse_holder(port)
    except OSError:
        return None
