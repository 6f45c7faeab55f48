"""kill -9 during the churn: one service, supervisord alone, or every agent process at once.

A service killed is restarted by supervisord; after supervisord dies (alone or with the rest)
the suite starts the agent again the way an operator or systemd would: ``riklet run`` on the
same run and state directories."""

from __future__ import annotations

import os
import signal

from bench.chaos.harness import SERVICES, wait_dead
from bench.chaos.scenario import Context, Fault, Scenario
from tests.stack import pid_alive
from tests.support import wait_for

KILLS = 2          # kills of a service per scenario, spread over the churn
BACK_DEADLINE = 30.0


def _at(ctx: Context, k: int, of: int) -> None:
    """Wait until the churn is K/(OF+1) of the way through."""
    if ctx.churn is not None:
        ctx.churn.wait_attempted(k * ctx.settings.ops // (of + 1))


def kill_service(service: str) -> Fault:
    def fault(ctx: Context) -> None:
        agent = ctx.agent
        for k in range(1, KILLS + 1):
            _at(ctx, k, KILLS)
            old = agent.service_pid(service)
            agent.seen_pids.add(old)
            os.kill(old, signal.SIGKILL)
            try:
                wait_for(lambda o=old: agent.statuses().get(service) == "RUNNING"  # type: ignore[misc]
                         and agent.service_pid(service) != o, BACK_DEADLINE,
                         what=f"{service} RUNNING again", interval=0.1)
            except AssertionError:
                ctx.check(False, f"{service} not RUNNING {BACK_DEADLINE:.0f}s after kill {k}: "
                                 f"{agent.statuses()}")
                return
        ctx.notes.append(f"killed {service} {KILLS}x")
    return fault


def kill_supervisord(ctx: Context) -> None:
    """supervisord alone: its services live on as orphans; the next start must take over."""
    agent = ctx.agent
    _at(ctx, 1, 2)
    sup, *services = agent.remember_services()
    os.kill(sup, signal.SIGKILL)
    assert agent.proc is not None
    agent.proc.wait(timeout=10)
    orphans = [p for p in services if pid_alive(p)]
    ctx.notes.append(f"killed supervisord; {len(orphans)} agent processes left running")
    _restart(ctx, orphans)


def kill_everything(ctx: Context) -> None:
    """supervisord, the four services and the proxy's worker, all by pid at once."""
    agent = ctx.agent
    _at(ctx, 1, 2)
    victims = agent.remember_services()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    ctx.check(wait_dead(victims), f"killed {len(victims)} agent processes")
    assert agent.proc is not None
    agent.proc.wait(timeout=10)
    _restart(ctx, [])


def _restart(ctx: Context, orphans: list[int]) -> None:
    error = ctx.agent.restart(BACK_DEADLINE)
    ctx.check(error is None, error or "restarted with riklet run on the same dirs")
    if orphans:
        gone = wait_dead(orphans, 10.0)
        ctx.check(gone, "the orphaned services were stopped" if gone else
                  f"{sum(map(pid_alive, orphans))} of the old agent processes still running")


SCENARIOS = [
    *(Scenario(f"kill-{s}", kill_service(s)) for s in SERVICES),
    Scenario("kill-supervisord", kill_supervisord),
    Scenario("kill-all", kill_everything),
]
