"""UDP echo backend and UDP load generator for the proxy benchmark.

    python -m bench.udp_load echo PORT
    python -m bench.udp_load client PORT --seconds 5 --flows 32 --window 8

The client keeps ``window`` datagrams in flight on each of ``flows`` sockets (one proxy flow
each) and answers every echo with a new datagram, so the offered load follows what the path
can carry instead of flooding socket buffers. It prints one JSON line: sent, received, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import time

PAYLOAD = b"x" * 64
REFILL = 0.2   # a socket silent this long lost its window to drops: send a fresh one


def echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    print("ready", flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(2048)
        with contextlib.suppress(OSError):   # a full buffer: UDP may drop, the client refills
            sendto(data, addr)


def client(port: int, seconds: float, flows: int, window: int) -> dict[str, float]:
    socks = []
    ep = select.epoll()
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        socks.append(s)
        ep.register(s.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): s for s in socks}
    heard = dict.fromkeys(by_fd, 0)
    sent = received = 0

    def burst(s: socket.socket, n: int) -> int:
        done = 0
        for _ in range(n):
            try:
                s.send(PAYLOAD)
            except OSError:
                break
            done += 1
        return done

    for s in socks:
        sent += burst(s, window)
    start = time.monotonic()
    end, next_refill = start + seconds, start + REFILL
    last = dict(heard)
    while (now := time.monotonic()) < end:
        for fd, _ in ep.poll(0.05):
            s, got = by_fd[fd], 0
            while True:
                try:
                    s.recv(2048)
                except BlockingIOError:
                    break
                except OSError:   # ECONNREFUSED from an ICMP: the window refills later
                    break
                got += 1
            received += got
            heard[fd] += got
            sent += burst(s, got)
        if now >= next_refill:
            next_refill = now + REFILL
            for fd, s in by_fd.items():
                if heard[fd] == last[fd]:
                    sent += burst(s, window)
            last = dict(heard)
    return {"sent": sent, "received": received, "seconds": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("echo", "client"))
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--flows", type=int, default=32)
    parser.add_argument("--window", type=int, default=8)
    args = parser.parse_args()
    if args.mode == "echo":
        echo(args.port)
    else:
        print(json.dumps(client(args.port, args.seconds, args.flows, args.window)), flush=True)


if __name__ == "__main__":
    main()
