"""Proxy benchmark: riklet's proxy against HAProxy 2.6 (tcp mode, 1 thread) and nginx stream.

Everything on loopback. The load generator (wrk, one thread) and the backends run on CPU 0;
the proxy under test runs alone on CPU 1. What is compared is CPU spent by the proxy per unit
of work (read from /proc before and after each run), not requests per second: on two cores the
load side saturates first and every proxy would show the same rate.

Scenarios, each run ``--reps`` times with the proxies alternating, medians reported:
  keep-alive  1 KiB bodies, 64 keep-alive connections: CPU us per request, p99 latency
  bulk        1 MiB bodies, 16 connections: CPU ms per GiB (HAProxy and nginx also with 256 KiB buffers)
  connect     a new connection per request (Connection: close), 16 at a time: connections per CPU-second
  udp         64-byte echo datagrams over 32 flows: datagrams per CPU-second (nginx, HAProxy has no UDP)

    make bench-proxy
    .venv/bin/python -m bench.proxy --seconds 3 --reps 1 --json /tmp/proxy.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

from bench import proxy_peers as peers

GiB = 1 << 30
Metrics = dict[str, float]

# scenario -> (wrk path, connections, extra wrk args)
WRK = {
    "keep-alive": ("/1k", 64, ["--latency"]),
    "bulk": ("/1m", 16, []),
    "connect": ("/1k", 16, ["-H", "Connection: close"]),
}
# scenario -> proxies run in it (``direct`` is wrk straight to the backend: the latency floor)
LINEUP = {
    "keep-alive": ["direct", "haproxy", "nginx", "riklet"],
    "bulk": ["haproxy", "haproxy-256k", "nginx", "nginx-256k", "riklet"],
    "connect": ["haproxy", "nginx", "riklet"],
    "udp": ["nginx", "riklet"],
}
# the rows of the table: (scenario, metric, label, reference proxies for the ratio)
ROWS = [
    ("keep-alive", "cpu_us_per_req", "keep-alive 1 KiB x64: CPU us/request", ["haproxy"]),
    ("keep-alive", "p99_added_ms", "keep-alive 1 KiB x64: p99 added ms", ["haproxy"]),
    ("keep-alive", "rps", "keep-alive 1 KiB x64: requests/s (context)", ["haproxy"]),
    ("bulk", "cpu_ms_per_gib", "bulk 1 MiB x16: CPU ms/GiB", ["haproxy", "haproxy-256k"]),
    ("bulk", "gib_per_cpu_s", "bulk 1 MiB x16: GiB/s per core", ["haproxy", "haproxy-256k"]),
    ("connect", "conns_per_cpu_s", "new connection/request: conns/s per core", ["haproxy"]),
    ("connect", "cpu_us_per_conn", "new connection/request: CPU us/conn", ["haproxy"]),
    ("udp", "pps_per_cpu_s", "UDP echo 64 B x32 flows: datagrams/s per core", ["nginx"]),
    ("udp", "cpu_us_per_dgram", "UDP echo: CPU us/datagram (both ways)", ["nginx"]),
]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Metrics:
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m is None:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    found: Metrics = {"requests": float(m.group(1)), "seconds": _ms(m.group(2) + m.group(3)) / 1e3}
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if p99:
        found["p99_ms"] = _ms(p99.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    found["errors"] = float(sum(map(int, errors.groups())) if errors else 0) + \
        float(bad.group(1) if bad else 0)
    return found


def run_wrk(port: int, scenario: str, seconds: float) -> Metrics:
    path, conns, extra = WRK[scenario]
    argv = ["taskset", "-c", peers.LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s",
            *extra, f"http://127.0.0.1:{port}{path}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def run_udp(port: int, seconds: float) -> Metrics:
    argv = ["taskset", "-c", peers.LOAD_CPU, sys.executable, "-m", "bench.udp_load", "client",
            str(port), "--seconds", str(seconds)]
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return {"received": float(out["received"]), "seconds": float(out["seconds"])}


def measure(pid: int | None, work: Callable[[], Metrics]) -> Metrics:
    before = peers.cpu_times(pid) if pid else (0.0, 0.0)
    found = work()
    after = peers.cpu_times(pid) if pid else (0.0, 0.0)
    found["user_s"], found["sys_s"] = after[0] - before[0], after[1] - before[1]
    found["cpu_s"] = found["user_s"] + found["sys_s"]
    return found


# scenario -> (unit of work, how many of them a run did): for the user / system split
UNITS: dict[str, tuple[str, Callable[[Metrics], float]]] = {
    "keep-alive": ("request", lambda m: m["requests"]),
    "bulk": ("MiB", lambda m: m["requests"]),
    "connect": ("connection", lambda m: m["requests"]),
    "udp": ("echo", lambda m: m["received"]),
}


def derive(scenario: str, m: Metrics, floor_p99: float | None) -> Metrics:
    units = max(UNITS[scenario][1](m), 1.0)
    split = {"_user_us": m.get("user_s", 0.0) * 1e6 / units, "_sys_us": m.get("sys_s", 0.0) * 1e6 / units}
    return split | _derive(scenario, m, floor_p99)


def _derive(scenario: str, m: Metrics, floor_p99: float | None) -> Metrics:
    cpu = max(m["cpu_s"], 1e-9)
    if scenario == "udp":
        # Each echo crosses the proxy twice; per-datagram CPU counts both crossings.
        return {"pps_per_cpu_s": m["received"] / cpu, "cpu_us_per_dgram": cpu * 1e6 / (2 * m["received"]),
                "pps": m["received"] / m["seconds"]}
    out = {"rps": m["requests"] / m["seconds"], "errors": m["errors"]}
    if scenario == "keep-alive":
        out["cpu_us_per_req"] = cpu * 1e6 / m["requests"]
        out["p99_ms"] = m.get("p99_ms", 0.0)
        if floor_p99 is not None:
            out["p99_added_ms"] = out["p99_ms"] - floor_p99
    elif scenario == "bulk":
        gib = m["requests"] * (1 << 20) / GiB
        out["cpu_ms_per_gib"] = cpu * 1e3 / gib
        out["gib_per_cpu_s"] = gib / cpu
    else:
        out["conns_per_cpu_s"] = m["requests"] / cpu
        out["cpu_us_per_conn"] = cpu * 1e6 / m["requests"]
    return out


def start_all(tmp: str, names: set[str]) -> tuple[dict[str, peers.Peer], dict[str, int], int]:
    """Start the backends and every proxy named; returns peers, TCP port per proxy, UDP port per proxy."""
    bport, eport = peers.free_port(), peers.free_port(2)
    started = {"backend": peers.backend(tmp, bport).start(tmp), "udp-echo": peers.udp_echo(eport).start(tmp)}
    ports: dict[str, int] = {"direct": bport}
    try:
        _start_proxies(tmp, names, started, ports, bport, eport)
    except BaseException:   # one that cannot start must not leave the others running
        for peer in started.values():
            peer.stop()
        raise
    return started, ports, eport


def _start_proxies(tmp: str, names: set[str], started: dict[str, peers.Peer], ports: dict[str, int],
                   bport: int, eport: int) -> None:
    for name in sorted(names - {"direct"}):
        port, uport = peers.free_port(), peers.free_port(2)
        ports[name], ports[name + "/udp"] = port, uport
        if name.startswith("haproxy"):
            peer = peers.haproxy(tmp, name, port, bport, 262144 if name.endswith("256k") else None)
        elif name.startswith("nginx"):
            peer = peers.nginx_stream(tmp, name, port, bport, uport, eport,
                                      "256k" if name.endswith("256k") else None)
        else:
            peer = peers.riklet(name, port, bport, uport, eport)
        started[name] = peer.start(tmp)


def run(seconds: float, reps: int, scenarios: list[str]) -> dict[str, dict[str, list[Metrics]]]:
    names = {n for s in scenarios for n in LINEUP[s]}
    results: dict[str, dict[str, list[Metrics]]] = {s: {n: [] for n in LINEUP[s]} for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        started, ports, _ = start_all(tmp, names)
        try:
            for name in names - {"direct"}:      # warm up: first connections, page cache, JIT-free
                run_wrk(ports[name], "keep-alive", 1)
            for rep in range(reps):
                for scenario in scenarios:
                    floor = None
                    for name in LINEUP[scenario] if rep % 2 == 0 else LINEUP[scenario][::-1]:
                        pid = started[name].pid if name in started else None
                        if scenario == "udp":
                            raw = measure(pid, partial(run_udp, ports[name + "/udp"], seconds))
                        else:
                            raw = measure(pid, partial(run_wrk, ports[name], scenario, seconds))
                        if name == "direct":
                            floor = raw.get("p99_ms")
                        got = derive(scenario, raw, None) | {"_p99": raw.get("p99_ms", 0.0)}
                        results[scenario][name].append(got)
                        print(f"rep {rep + 1} {scenario:10} {name:13} {_brief(results[scenario][name][-1])}",
                              file=sys.stderr, flush=True)
                    if floor is not None:
                        for runs in results[scenario].values():
                            runs[-1]["p99_added_ms"] = runs[-1]["_p99"] - floor
        finally:
            for peer in started.values():
                peer.stop()
    return results


def _brief(m: Metrics) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in m.items() if not k.startswith("_"))


def table(results: dict[str, dict[str, list[Metrics]]]) -> str:
    medians = {s: {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                   for n, runs in by.items() if runs} for s, by in results.items()}
    cols = ["haproxy", "haproxy-256k", "nginx", "nginx-256k", "riklet"]
    lines = [f"{'metric (median)':46}" + "".join(f"{c:>13}" for c in cols) + "   riklet ratio"]
    for scenario, metric, label, refs in ROWS:
        got = medians.get(scenario)
        if not got:
            continue
        cells = "".join(f"{_fmt(got.get(c, {}).get(metric)):>13}" for c in cols)
        rik = got.get("riklet", {}).get(metric)
        ratios = ", ".join(f"{rik / got[r][metric]:.2f}x {r}" for r in refs
                           if rik is not None and got.get(r, {}).get(metric))
        lines.append(f"{label:46}{cells}   {ratios}")
    floor = medians.get("keep-alive", {}).get("direct", {}).get("_p99")
    if floor is not None:
        lines.append(f"(p99 of wrk straight to the backend: {floor:.3f} ms)")
    lines.append("")
    lines.append(f"{'CPU us per unit, user/system (median)':46}" + "".join(f"{c:>15}" for c in cols))
    for scenario, (unit, _) in UNITS.items():
        got = medians.get(scenario)
        if not got:
            continue
        cells = "".join(f"{_split(got.get(c)):>15}" for c in cols)
        lines.append(f"{scenario + ' (per ' + unit + ')':46}{cells}")
    return "\n".join(lines)


def _split(m: Metrics | None) -> str:
    if not m or "_user_us" not in m:
        return "-"
    return f"{_fmt(m['_user_us'])}/{_fmt(m['_sys_us'])}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(LINEUP))
    parser.add_argument("--json", help="also write every run's numbers here")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs: the proxy under test is pinned alone on CPU 1")
    peers.ensure_tools()
    os.sched_setaffinity(0, {int(peers.LOAD_CPU)})   # this driver stays off the proxy's core
    t0 = time.monotonic()
    results = run(args.seconds, args.reps, args.scenarios.split(","))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    print(f"({args.reps} runs of {args.seconds:g} s per proxy and scenario, "
          f"{time.monotonic() - t0:.0f} s in all; {os.uname().release}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
