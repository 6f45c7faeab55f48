"""Applies that could meet take turns, those that cannot run side by side: the manager's apply
locks alone (threads, no services), then concurrent Applies through a real Node API and memory
(tests/test_node_api_index.py's rig): one port, many takers, exactly one winner."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from common.model import Workload, parse_workload
from services.manager.applylocks import ApplyLocks
from tests.support import free_port
from tests.test_node_api_index import Node, node, pod  # noqa: F401  (node is a fixture)

WAIT = 10.0      # the most any step below may take; a test that needs it has failed
TAKERS = 32      # applies racing for one port (without the port lock, several win most runs)
BLOCKED = 0.3    # how long a waiter is watched to see that it does not get in


def workload(name: str, port: int = 0, replicas: int = 1) -> Workload:
    return parse_workload(pod(name, port, replicas), 5.0)


class Holder:
    """A thread that holds the locks of ``wl`` until told to leave."""

    def __init__(self, locks: ApplyLocks, wl: Workload, picks_ports: bool = False) -> None:
        self.inside, self.leave, self.done = threading.Event(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(locks, wl, picks_ports), daemon=True)
        self._thread.start()

    def _run(self, locks: ApplyLocks, wl: Workload, picks_ports: bool) -> None:
        with locks.hold(wl, picks_ports):
            self.inside.set()
            self.leave.wait(WAIT)
        self.done.set()

    def release(self) -> None:
        self.leave.set()
        assert self.done.wait(WAIT)


def test_applies_of_different_portless_workloads_hold_their_locks_at_once() -> None:
    locks = ApplyLocks()
    a = Holder(locks, workload("alpha", replicas=3))
    assert a.inside.wait(WAIT)
    b = Holder(locks, workload("beta", replicas=2))
    assert b.inside.wait(WAIT), "beta got in while alpha was inside"
    a.release()
    b.release()
    assert locks.in_use == 0


def take_turns(locks: ApplyLocks, first: Holder, make_second: Callable[[], Holder]) -> None:
    assert first.inside.wait(WAIT)
    second = make_second()
    assert not second.inside.wait(BLOCKED), "the second got in while the first was inside"
    first.release()
    assert second.inside.wait(WAIT), "the second got in once the first left"
    second.release()
    assert locks.in_use == 0


def test_workloads_asking_for_host_ports_take_turns_even_on_different_ports() -> None:
    locks = ApplyLocks()
    take_turns(locks, Holder(locks, workload("web", 30080)), lambda: Holder(locks, workload("api", 30081)))


def test_picking_ports_waits_for_any_apply_asking_for_one() -> None:
    locks = ApplyLocks()
    take_turns(locks, Holder(locks, workload("web", 30080)),
               lambda: Holder(locks, workload("chas"), picks_ports=True))


def test_the_same_workload_or_the_same_pod_name_takes_turns() -> None:
    locks = ApplyLocks()
    take_turns(locks, Holder(locks, workload("web", replicas=2)), lambda: Holder(locks, workload("web")))
    # "web-1" is a replica of web and also a workload's own name: the two meet on that pod
    take_turns(locks, Holder(locks, workload("web", replicas=2)), lambda: Holder(locks, workload("web-1")))


def test_overlapping_applies_from_many_threads_never_wait_for_each_other_forever() -> None:
    locks = ApplyLocks()
    rng = random.Random(7)
    jobs = [workload(rng.choice(["a", "b", "c", "a-0", "b-1"]), rng.choice([0, 0, 30080]),
                     rng.randint(1, 3)) for _ in range(400)]
    counter = {"n": 0}

    def run(wl: Workload) -> None:
        with locks.hold(wl):
            counter["n"] += 1

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(run, wl) for wl in jobs]
        for f in futures:
            f.result(timeout=WAIT)
    assert counter["n"] == len(jobs) and locks.in_use == 0


def test_many_workloads_racing_for_one_port_leave_exactly_one_holder(node: Node) -> None:  # noqa: F811
    port = free_port()

    def attempt(i: int) -> Any:
        try:
            return node.apply(pod(f"taker-{i}", port))
        except grpc.RpcError as exc:
            return exc

    with ThreadPoolExecutor(TAKERS) as pool:
        outcomes = list(pool.map(attempt, range(TAKERS)))
        # meanwhile port-less workloads apply side by side
        quiet = list(pool.map(lambda i: node.apply(pod(f"quiet-{i}")), range(24)))
    won = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
    lost = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(won) == 1, [str(o) for o in outcomes]
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION and "already taken by pod" in e.details()
               for e in lost), [e.details() for e in lost]
    names = node.names()
    assert sum(n.startswith("taker-") for n in names) == 1
    assert len(quiet) == 24 and sum(n.startswith("quiet-") for n in names) == 24
