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
              settling, or that a Delete found NotFound while the ledger expected them.
  restarts    service restarts seen by supervisord (new pid or start time per program,
              polled over its XML-RPC socket), memory/manager/monitor/proxy; allowed.
  notes       scenario checks: bombs refused and the manager's peak RSS, floods answered,
              the agent's recovery after a restart. A failed check fails the row.
Workload processes are found in /proc by an environment marker (CHAOS_TAG=<run>:<pod>,
CHAOS_GEN=<spec generation>) that only this run's pods carry. "After settling": polled every
0.25 s until the agent's four services are RUNNING and every count is 0, or the settle
deadline passes (then the counts of the last poll are reported).
"""
