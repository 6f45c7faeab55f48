"""riklet's fault suite: real faults against a real agent, under a churn of pod operations.

Each scenario starts a fresh agent (supervisord and the four services, tests.stack.Agent) in a
temporary directory, runs a churn of Apply / Delete / re-Apply / update calls on process pods
(``sleep 3600``) through the gRPC Node API, injects its fault while the churn runs, settles, and
compares what the agent shows with the suite's own ledger. One row per scenario; the run exits 1
when any row has a non-zero count (service restarts excepted) or a failed check.

    make chaos
    .venv/bin/python -m bench.chaos --scenarios kill-manager,race --ops 100 --pods 8 --seed 7
"""

from __future__ import annotations

SCENARIOS = """\
scenarios (each on a fresh agent, under the churn unless said otherwise):
  kill-memory, kill-manager, kill-monitor, kill-proxy
              kill -9 of that service twice, at 1/3 and 2/3 of the churn; supervisord restarts it
  kill-supervisord
              kill -9 of supervisord alone, then `riklet run` again on the same directories (as
              an operator or systemd would); it must be ready within 30 s and the orphaned old
              services must be gone
  kill-all    kill -9 of supervisord, the four services and the proxy's worker, then `riklet run`
  race        no churn: --ops rounds of apply NAME; delete NAME; apply NAME from 8 threads,
              paced like rikletctl (0.2-0.4 s between calls); a Get before each round
  bombs       a YAML alias bomb in kind, 100,000 nested [, a 20,000-char name, an IPC frame with
              "v": true to memory's socket: each refused (INVALID_ARGUMENT within 5 s, message
              <= 1 KiB / bad_frame), manager RSS peak <= +256 MiB, the agent serves afterwards
  watch-flood 40 Watch streams held open, then List must answer within 5 s
  slowloris   130 connections to the CHaS port sending half a request, then GET /health must
              answer 200 within 5 s

"""

DEFINITIONS = """\
definitions (what each column counts):
  acked       acknowledged operations: Node API calls (Apply, Delete) that returned success.
              The suite keeps a ledger of what each pod must be after the last acknowledged
              call for it: present and running (with the generation of its last acknowledged
              spec), or deleted. A call that failed or timed out leaves the pod "uncertain";
              before checking, the suite repeats that pod's intended call until it is
              acknowledged, so every pod has a definite expectation.
  lost        pods the ledger expects whose record exists after settling but is not Running,
              whose workload process is not alive, or that runs an older spec than the last
              acknowledged one.
  dup         duplicated: live workload processes beyond one for a single pod.
  orphan      orphaned: a live workload process of a pod the ledger says is deleted (each one
              counts), or, for a pod that should exist, live workload processes none of which
              is the one its record points to (counts once).
  rec.lost    records lost: pods the ledger expects that the API answers NotFound for after
              settling, or that a Delete (or the race's Get between rounds) found NotFound
              while the ledger expected them. "lost" and "rec.lost" never count the same pod.
  restarts    service restarts seen by supervisord (new pid or start time per program,
              polled over its XML-RPC socket), memory/manager/monitor/proxy; allowed.
  notes       scenario checks: bombs refused and the manager's peak RSS, floods answered,
              the agent's recovery after a restart. A failed check fails the row.
Workload processes are found in /proc by an environment marker (CHAOS_TAG=<run>:<pod>,
CHAOS_GEN=<spec generation>) that only this run's pods carry. "After settling": polled every
0.25 s until the agent's four services are RUNNING and every count is 0, or the settle
deadline passes (then the counts of the last poll are reported).
"""

__doc__ = f"{__doc__}\n{SCENARIOS}{DEFINITIONS}"
