"""Volumes of an image pod (containerd): a named volume, a read-only mount of it, a Memory
emptyDir; the named volume's data outlives the pod, nothing of the emptyDir does."""

from __future__ import annotations

import json
import os

import pytest

from tests.support import wait_for
from tests.test_containerd import CtrAgent, ctr_agent  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration


def test_image_pod_mounts_named_volume_and_memory_empty_dir(ctr_agent: CtrAgent) -> None:  # noqa: F811
    a = ctr_agent
    a.agent.ctl("volume", "create", "shared")
    script = ("echo from-the-image > /data/f; echo x > /ro/g || echo write-refused; "
              "grep ' /ram ' /proc/mounts; echo done; exec sleep 300")
    a.agent.ctl("apply", "-f", "-", input=json.dumps({"name": "img", "spec": {
        "restartPolicy": "Never",
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "shared"}},
                    {"name": "r", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}}],
        "containers": [{"name": "c", "image": a.image, "command": ["sh", "-c", script],
                        "volumeMounts": [{"name": "d", "mountPath": "/data"},
                                         {"name": "d", "mountPath": "/ro", "readOnly": True},
                                         {"name": "r", "mountPath": "/ram"}]}]}}))
    out = wait_for(lambda: (o := a.agent.ctl("logs", "img").stdout) and "done" in o and o, 30,
                   "the image pod ran")
    assert "write-refused" in out and " /ram tmpfs " in out and "size=4096k" in out
    a.agent.ctl("delete", "img")
    wait_for(lambda: not a.agent.pods(), 30, "pod removed")
    assert not os.path.exists(os.path.join(a.agent.state_dir, "pods", "img"))
    path = json.loads(a.agent.ctl("volume", "inspect", "shared").stdout)["path"]
    with open(os.path.join(path, "f"), encoding="utf-8") as fh:
        assert fh.read() == "from-the-image\n"
    a.agent.ctl("volume", "rm", "shared")
