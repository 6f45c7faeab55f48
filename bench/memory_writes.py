"""Memory's write path: pods/s and commits/s when several clients write at once.

Starts a real memory process (SQLite in WAL mode, ``synchronous=FULL``: every acknowledged
write is on disk), then has ``--clients`` threads, each with its own MemoryClient, create pods
the way the node does: one apply and ``--statuses`` status writes per pod.

    .venv/bin/python -m bench.memory_writes --pods 2000 --clients 8
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common.memclient import MemoryClient
from tests.test_memory_service import Memory

SPEC = {"workload": "", "kind": "Pod", "restartPolicy": "Always", "containers": [
    {"name": "c", "command": ["sleep", "3600"], "env": {}, "runtime": "process"}], "ports": []}


def writer(memory: Memory, names: list[str], statuses: int, lock: threading.Lock) -> None:
    client = MemoryClient(memory.config())
    try:
        while True:
            with lock:
                if not names:
                    return
                name = names.pop()
            record = client.apply(name, {**SPEC, "workload": name})["pod"]
            for i in range(statuses):
                client.set_status(name, record["uid"], {"phase": "Running", "n": i}, generation=1)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--statuses", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="bmw"))
    memory = Memory(base)
    try:
        memory.start()
        names = [f"p-{i}" for i in range(args.pods)]
        lock = threading.Lock()
        start = time.perf_counter()
        threads = [threading.Thread(target=writer, args=(memory, names, args.statuses, lock))
                   for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - start
        writes = args.pods * (1 + args.statuses)
        print(f"{args.clients} clients: {args.pods / took:.0f} pods/s, {writes / took:.0f} writes/s "
              f"({args.pods} pods x {1 + args.statuses} writes in {took:.1f} s)")
    finally:
        memory.cleanup()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
