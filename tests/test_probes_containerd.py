"""Health probes and in-place resize of a containerd pod: an httpGet readiness probe reaches
the pod's own IP (its network namespace, through the CNI bridge) and gates the proxy's host
port; an exec liveness probe runs through containerd's exec inside the image and restarts the
container when it fails; new limits reach the container's cgroup without a restart."""

from __future__ import annotations

import json

import pytest

from tests.support import free_port, wait_for
from tests.test_containerd import CtrAgent, ctr_agent, http_get  # noqa: F401  (the fixture)
from tests.test_probes import refused

pytestmark = pytest.mark.integration


def test_probes_of_a_containerd_pod(ctr_agent: CtrAgent) -> None:  # noqa: F811
    a, host = ctr_agent, free_port()
    doc = {"name": "web", "spec": {"containers": [{
        "name": "web", "image": a.image,
        # serves /www; /www/healthz exists only once someone makes it; /tmp/sick fails liveness
        "command": ["sh", "-c", "mkdir -p /www; echo hi > /www/index.html; exec httpd -f -p 8080 -h /www"],
        "ports": [{"port": host, "target_port": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1,
                           "failureThreshold": 1},
        "livenessProbe": {"exec": {"command": ["sh", "-c", "test ! -f /tmp/sick"]}, "periodSeconds": 1,
                          "failureThreshold": 2}}]}}
    a.agent.ctl("apply", "-f", "-", input=json.dumps(doc))
    pod = a.agent.wait_phase("web", "Running", 30)
    assert pod["ready"] is False and refused(host)

    a.agent.ctl("exec", "web", "--", "touch", "/www/healthz")
    wait_for(lambda: a.agent.pod("web")["ready"], 15, "ready once /healthz answers")
    assert wait_for(lambda: http_get("127.0.0.1", host, "/index.html"), 10, "through the proxy") == b"hi\n"
    first = a.agent.pod("web")["containers"][0]

    a.agent.ctl("exec", "web", "--", "touch", "/tmp/sick")   # the exec probe fails from now on

    def restarted() -> dict | None:  # type: ignore[type-arg]
        c = a.agent.pod("web")["containers"][0]
        return c if c["restartCount"] >= 1 else None
    wait_for(restarted, 30, "the container restarted by its liveness probe")
    said = json.loads(a.agent.ctl("events", "web", "-o", "json").stdout)
    assert any(e["reason"] == "Killing" and "liveness" in e["message"] for e in said)
    assert any(e["reason"] == "Unhealthy" and "Liveness probe failed: command 'sh' exited with 1"
               in e["message"] for e in said)
    assert first["restartCount"] == 0


def test_resize_a_containerd_pod_in_place(ctr_agent: CtrAgent) -> None:  # noqa: F811
    from tests.test_probes import cgroup_limits
    a = ctr_agent
    a.agent.ctl("run", "sized", "--image", a.image, "--memory", "64m", "--", "sleep", "600")
    pod = a.agent.wait_phase("sized", "Running", 30)
    pid = pod["containers"][0]["pid"]
    assert cgroup_limits(a.agent, "sized", "sized")[1] == str(64 << 20)
    a.agent.ctl("resize", "sized", "--memory", "96m", "--cpu", "0.5")
    wait_for(lambda: cgroup_limits(a.agent, "sized", "sized")[1] == str(96 << 20), 15, "the new limits")
    pod = a.agent.pod("sized")
    assert pod["containers"][0]["pid"] == pid and pod["restartCount"] == 0 and pod["phase"] == "Running"
    assert cgroup_limits(a.agent, "sized", "sized")[0].split()[0] == "50000"
