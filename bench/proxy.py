"""Proxy benchmark: what each proxy adds to the machine's CPU over no proxy at all.

Side by side in one run, on loopback, in a private network namespace (so nftables tables of
anything else on the host cannot switch conntrack on under the baseline): direct (the client
straight to the backend: the floor), HAProxy 2.6 (tcp mode, 1 thread), nginx stream (1
process), riklet in userspace mode and riklet in kernel mode (each a real agent with one pod,
bench.riklet_agent). wrk and the backends are pinned to CPU 0, HAProxy, nginx and riklet's
worker to CPU 1, but what is counted is the whole machine's busy time (bench.cpu): softirq,
irq and kworkers included, the idle level subtracted, then the direct run's cost per unit.

Scenarios (wrk -t1 unless UDP), each proxy alternating, ``--reps`` rounds, medians reported:
  keep-alive  1 KiB bodies, 64 keep-alive connections: CPU added per request
  bulk        1 MiB bodies, 16 connections: CPU added per GiB
  connect     a new connection per request (Connection: close), 16 at a time: per connection
  udp         64-byte echo datagrams over 32 flows (bench.udp_load): per echo (both ways)

Two phases: first direct, HAProxy, nginx and riklet userspace; then riklet kernel with direct
again. A NAT table switches conntrack on for every flow of the namespace, so kernel mode is
charged against the first phase's direct run: conntrack's cost is part of what it adds (the
second direct run shows how much). The kernel mode's pod points at a second port of the same
backend nginx and a second UDP echo server (see ``run``). After each phase's runs, every
process of each proxy is killed with ``kill -9`` while a request goes through it every 5 ms
(bench.proxy_restart): riklet's keeper and worker (supervisord restarts them); HAProxy and
nginx are restarted by the benchmark at once, for context.

    make bench-proxy
    .venv/bin/python -m bench.proxy --quick
    .venv/bin/python -m bench.proxy --reps 3 --json /tmp/proxy.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from bench import cpu
from bench import proxy_peers as peers
from bench import proxy_report as report
from bench.proxy_restart import outage
from bench.riklet_agent import RikletAgent, http_ok
from tests.support import wait_for

Record = dict[str, Any]
MiB, GiB = 1 << 20, 1 << 30

# scenario -> (wrk path, connections, extra wrk args)
WRK = {
    "keep-alive": ("/1k", 64, ["--latency"]),
    "bulk": ("/1m", 16, []),
    "connect": ("/1k", 16, ["-H", "Connection: close"]),
}
SCENARIOS = ["keep-alive", "bulk", "connect", "udp"]
NO_UDP = {"haproxy"}     # HAProxy 2.6 has no UDP


class Target(Protocol):
    """Something traffic goes through: a port for TCP, one for UDP, and how to kill it."""

    name: str
    tcp_port: int
    udp_port: int | None

    def kill_all(self) -> list[int]: ...

    def settled(self, old: list[int]) -> bool: ...


@dataclass
class Direct:
    name: str
    tcp_port: int
    udp_port: int | None

    def kill_all(self) -> list[int]:
        raise NotImplementedError("direct has no proxy to kill")

    def settled(self, old: list[int]) -> bool:
        return True


@dataclass
class PeerTarget:
    """HAProxy or nginx: ``kill -9`` of its one process, then restarted at once."""

    name: str
    peer: peers.Peer
    tcp_port: int
    udp_port: int | None
    log_dir: str

    def kill_all(self) -> list[int]:
        pid = self.peer.pid
        self.peer.kill9()
        self.peer.start(self.log_dir)
        return [pid]

    def settled(self, old: list[int]) -> bool:
        return True


@dataclass
class AgentTarget:
    agent: RikletAgent
    name: str = field(init=False)
    tcp_port: int = field(init=False)
    udp_port: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.name, self.tcp_port, self.udp_port = self.agent.name, self.agent.tcp_port, self.agent.udp_port

    def kill_all(self) -> list[int]:
        return self.agent.kill_all()

    def settled(self, old: list[int]) -> bool:
        return self.agent.settled(old)


@dataclass(frozen=True)
class Settings:
    seconds: float
    reps: int
    idle_seconds: float
    scenarios: list[str]
    kill_rounds: int


# -- one run ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m is None:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    found = {"requests": float(m.group(1)), "seconds": _ms(m.group(2) + m.group(3)) / 1e3}
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if p99:
        found["p99_ms"] = _ms(p99.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    found["errors"] = float(sum(map(int, errors.groups())) if errors else 0) + \
        float(bad.group(1) if bad else 0)
    return found


def run_wrk(port: int, scenario: str, seconds: float) -> dict[str, float]:
    path, conns, extra = WRK[scenario]
    argv = ["taskset", "-c", peers.LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s",
            *extra, f"http://127.0.0.1:{port}{path}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr or done.stdout}")
    found = parse_wrk(done.stdout)
    found["units"] = found["requests"] * MiB / GiB if scenario == "bulk" else found["requests"]
    return found


def run_udp(port: int, seconds: float) -> dict[str, float]:
    argv = ["taskset", "-c", peers.LOAD_CPU, sys.executable, "-m", "bench.udp_load", "client",
            str(port), "--seconds", str(seconds)]
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return {"units": float(out["received"]), "sent": float(out["sent"]), "seconds": float(out["seconds"]),
            "errors": 0.0, "unanswered": float(out["sent"] - out["received"])}


def measured(work: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``work()``'s figures plus the machine's busy CPU-seconds and wall time around it."""
    before = cpu.sample()
    found = work()
    win = cpu.window(before, cpu.sample())
    return found | {"busy_s": win.busy_s, "wall_s": win.wall_s}


def idle_level(seconds: float) -> float:
    """Busy CPUs (CPU-seconds per second) with no load offered, over ``seconds``."""
    before = cpu.sample()
    time.sleep(seconds)
    return cpu.idle_rate(cpu.window(before, cpu.sample()))


# -- phases -------------------------------------------------------------------------------------

def runs(settings: Settings, phase: int, targets: list[Target]) -> list[Record]:
    """``reps`` rounds of every scenario through every target, the order reversed every other
    round; each round starts with its own idle measurement."""
    out: list[Record] = []
    for rep in range(settings.reps):
        idle = idle_level(settings.idle_seconds)
        print(f"phase {phase} rep {rep + 1}: idle level {idle:.3f} CPUs", file=sys.stderr, flush=True)
        for scenario in settings.scenarios:
            order = targets if rep % 2 == 0 else targets[::-1]
            for t in order:
                if scenario == "udp" and t.udp_port is None:
                    continue
                if scenario == "udp":
                    assert t.udp_port is not None
                    figures = measured(partial(run_udp, t.udp_port, settings.seconds))
                else:
                    figures = measured(partial(run_wrk, t.tcp_port, scenario, settings.seconds))
                got: Record = {**figures, "phase": phase, "rep": rep, "scenario": scenario,
                               "name": t.name, "idle_cpus": idle}
                out.append(got)
                print(f"  {scenario:10} {t.name:17} units={got['units']:<10.6g} busy={got['busy_s']:.2f}s "
                      f"wall={got['wall_s']:.2f}s errors={got['errors']:.0f}", file=sys.stderr, flush=True)
    return out


def kills(targets: list[Target], rounds: int) -> list[Record]:
    """``rounds`` times per target: ``kill -9`` of every process of the proxy, the outage and
    the failed requests seen by a request every 5 ms on a new connection."""
    return [kill_round(t) for t in targets for _ in range(rounds)]


def kill_round(t: Target) -> Record:
    old: list[int] = []
    try:
        seconds, failed = outage(
            t.tcp_port, lambda: old.extend(t.kill_all()),
            lambda: wait_for(lambda: t.settled(old), 30, f"{t.name} back after kill -9"), probe=http_ok)
    except AssertionError as exc:      # reported as such rather than ending the benchmark
        print(f"  kill -9 {t.name}: {exc}", file=sys.stderr, flush=True)
        return {"name": t.name, "outage_s": float("inf"), "failed": -1, "killed": len(old)}
    print(f"  kill -9 {t.name:17} pids={old} failed={failed} outage={seconds * 1000:.0f} ms",
          file=sys.stderr, flush=True)
    return {"name": t.name, "outage_s": seconds, "failed": failed, "killed": len(old)}


def phase_one(settings: Settings, tmp: str, stack: ExitStack, direct: Direct,
              bport: int, eport: int) -> tuple[list[Record], list[Record]]:
    targets: list[Target] = [direct]
    for name in ("haproxy", "nginx"):
        port, uport = peers.free_port(), peers.free_port(2)
        peer = (peers.haproxy(tmp, name, port, bport) if name == "haproxy"
                else peers.nginx_stream(tmp, name, port, bport, uport, eport))
        peer.start(tmp)
        stack.callback(peer.stop)
        targets.append(PeerTarget(name, peer, port, None if name in NO_UDP else uport, tmp))
    rik = RikletAgent("userspace", bport, eport).start()
    stack.callback(rik.close)
    if rik.unavailable:
        raise SystemExit(f"riklet-userspace did not start: {rik.unavailable}")
    rik.pin(int(peers.PROXY_CPU))
    targets.append(AgentTarget(rik))
    warm_up(targets)
    records = runs(settings, 1, targets)
    return records, kills(targets[1:], settings.kill_rounds)


def phase_two(settings: Settings, direct: Direct, kernel: Callable[[], Target | str]
              ) -> tuple[list[Record], list[Record], str | None]:
    """riklet kernel mode and direct again; the reason when kernel mode is not available."""
    got = kernel()
    if isinstance(got, str):
        return [], [], got
    warm_up([got])
    records = runs(settings, 2, [direct, got])
    return records, kills([got], settings.kill_rounds), None


def warm_up(targets: list[Target]) -> None:
    for t in targets:
        run_wrk(t.tcp_port, "keep-alive", 1)


def riklet_kernel(stack: ExitStack, bport: int, eport: int) -> Callable[[], Target | str]:
    def start() -> Target | str:
        rik = RikletAgent("kernel", bport, eport).start()
        stack.callback(rik.close)
        if rik.unavailable:
            return rik.unavailable
        rik.pin(int(peers.PROXY_CPU))
        return AgentTarget(rik)
    return start


KernelFactory = Callable[[ExitStack, int, int], Callable[[], "Target | str"]]


def run(settings: Settings, kernel: KernelFactory = riklet_kernel) -> Record:
    """Both phases; every record, for the report and ``--json``. ``kernel`` makes the kernel
    mode's target (replaceable, to check the accounting against a hand-made table).

    The kernel path gets a port of its own on the same backends: a NATed connection's SYN
    carries a sequence number keyed to the host port, so when its client port was last used
    straight to the backend port, the backend's TIME_WAIT socket refuses it and the connect
    stalls a second (seen: 90k connections in 3 s direct, then 18k NATed)."""
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, ExitStack() as stack:
        bport, kport = peers.free_port(), peers.free_port()
        eport, keport = peers.free_port(2), peers.free_port(2)
        for peer in (peers.backend(tmp, bport, kport), peers.udp_echo(eport), peers.udp_echo(keport)):
            peer.start(tmp)
            stack.callback(peer.stop)
        direct = Direct("direct", bport, eport)
        one, kills_one = phase_one(settings, tmp, stack, direct, bport, eport)
        two, kills_two, missing = phase_two(settings, direct, kernel(stack, kport, keport))
    return {"runs": one + two, "kills": kills_one + kills_two, "kernel_unavailable": missing,
            "settings": settings.__dict__, "kill_rounds": settings.kill_rounds}


# -- entry --------------------------------------------------------------------------------------

def enter_private_netns() -> None:
    """Return inside a new network namespace with loopback up: this command runs again there
    (its exit status becomes ours) unless it already is the re-run."""
    if os.environ.get("BENCH_PROXY_NETNS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if shutil.which("unshare") is None or os.geteuid() != 0:
        raise SystemExit("needs root and unshare(1) for a private network namespace (or --host-netns)")
    env = dict(os.environ, BENCH_PROXY_NETNS="1")
    done = subprocess.run(["unshare", "--net", "--", *sys.orig_argv], env=env)
    raise SystemExit(done.returncode)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--reps", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="idle measurement per round")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 2 s runs")
    parser.add_argument("--host-netns", action="store_true", help="stay in the host's network namespace")
    parser.add_argument("--json", help="also write every run's figures here")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    if unknown := sorted(set(scenarios) - set(SCENARIOS)):
        parser.error(f"--scenarios: unknown {unknown}; known: {SCENARIOS}")
    if args.quick:
        args.seconds, args.reps, args.idle_seconds = 2.0, 1, 1.0
    if args.reps < 1 or args.seconds < 1 or args.idle_seconds <= 0:
        parser.error("--reps must be >= 1, --seconds >= 1, --idle-seconds > 0")
    return args, Settings(args.seconds, args.reps, args.idle_seconds, scenarios, kill_rounds=args.reps)


def main(kernel: KernelFactory = riklet_kernel) -> None:
    argv = sys.argv[1:]
    args, settings = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs: load and backends on CPU 0, the proxies on CPU 1")
    peers.ensure_tools()        # apt-get needs the host's network: before the namespace
    if not args.host_netns:
        enter_private_netns()
    os.sched_setaffinity(0, {int(peers.LOAD_CPU)})   # this driver stays off the proxies' core
    t0 = time.monotonic()
    results = run(settings, kernel)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    print(report.render(results))
    print(f"\n({settings.reps} rounds of {settings.seconds:g} s per proxy and scenario, "
          f"{time.monotonic() - t0:.0f} s in all; {os.uname().release}, {os.cpu_count()} CPUs; "
          f"{statistics.median(r['idle_cpus'] for r in results['runs']):.3f} CPUs busy when idle)")


if __name__ == "__main__":
    main()
