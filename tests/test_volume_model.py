"""Pod volumes in the workload format: each bad field is named; the policy on hostPath."""

from __future__ import annotations

import os
from typing import Any

import pytest

from common import config
from common.errors import InvalidArgument, PermissionDenied
from common.model import parse_workload
from common.policy import Policy


def workload(volumes: Any, mounts: Any = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "command": ["true"]}
    if mounts is not None:
        container["volumeMounts"] = mounts
    return {"name": "p", "spec": {"volumes": volumes, "containers": [container]}}


SCRATCH = [{"name": "s", "emptyDir": {}}]


@pytest.mark.parametrize(("volumes", "mounts", "field"), [
    ("nope", None, "spec.volumes"),
    ([{"name": "Bad_Name", "emptyDir": {}}], None, "spec.volumes[0].name"),
    ([{"name": "s", "emptyDir": {}}, {"name": "s", "emptyDir": {}}], None, "spec.volumes[1].name"),
    ([{"name": "s"}], None, "spec.volumes[0]"),
    ([{"name": "s", "emptyDir": {}, "hostPath": {"path": "/x"}}], None, "spec.volumes[0].hostPath"),
    ([{"name": "s", "nfs": {}}], None, "spec.volumes[0].nfs"),
    ([{"name": "s", "emptyDir": {"medium": "Disk"}}], None, "spec.volumes[0].emptyDir.medium"),
    ([{"name": "s", "emptyDir": {"sizeLimit": "lots"}}], None, "spec.volumes[0].emptyDir.sizeLimit"),
    ([{"name": "s", "hostPath": {"path": "etc"}}], None, "spec.volumes[0].hostPath.path"),
    ([{"name": "s", "hostPath": {"path": "/srv/../etc"}}], None, "spec.volumes[0].hostPath.path"),
    ([{"name": "s", "hostPath": {"path": "/srv", "type": "Dir"}}], None, "spec.volumes[0].hostPath.type"),
    ([{"name": "s", "persistentVolumeClaim": {}}], None, "spec.volumes[0].persistentVolumeClaim.claimName"),
    ([{"name": "s", "persistentVolumeClaim": {"claimName": "d", "readOnly": "yes"}}], None,
     "spec.volumes[0].persistentVolumeClaim.readOnly"),
    (SCRATCH, "nope", "spec.containers[0].volumeMounts"),
    (SCRATCH, [{"name": "other", "mountPath": "/m"}], "spec.containers[0].volumeMounts[0].name"),
    (SCRATCH, [{"name": "s", "mountPath": "m"}], "spec.containers[0].volumeMounts[0].mountPath"),
    (SCRATCH, [{"name": "s", "mountPath": "/"}], "spec.containers[0].volumeMounts[0].mountPath"),
    (SCRATCH, [{"name": "s", "mountPath": "/m"}, {"name": "s", "mountPath": "/m/"}],
     "spec.containers[0].volumeMounts[1].mountPath"),
    (SCRATCH, [{"name": "s", "mountPath": "/m", "subPath": "a/../../x"}],
     "spec.containers[0].volumeMounts[0].subPath"),
    (SCRATCH, [{"name": "s", "mountPath": "/m", "subPath": "/abs"}],
     "spec.containers[0].volumeMounts[0].subPath"),
    (SCRATCH, [{"name": "s", "mountPath": "/m", "readOnly": 1}],
     "spec.containers[0].volumeMounts[0].readOnly"),
    (SCRATCH, [{"name": "s", "mountPath": "/m", "mountPropagation": "Bidirectional"}],
     "spec.containers[0].volumeMounts[0].mountPropagation"),
])
def test_each_bad_field_is_named(volumes: Any, mounts: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_workload(workload(volumes, mounts))
    assert err.value.field == field


def test_a_mount_without_volumes_names_the_mount() -> None:
    doc = {"name": "p", "spec": {"containers": [{"name": "a", "command": ["true"],
                                                  "volumeMounts": [{"name": "s", "mountPath": "/m"}]}]}}
    with pytest.raises(InvalidArgument) as err:
        parse_workload(doc)
    assert err.value.field == "spec.containers[0].volumeMounts[0].name"


def test_normalized_form_and_older_specs_unchanged() -> None:
    spec = parse_workload(workload(
        [{"name": "ram", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
         {"name": "h", "hostPath": {"path": "/srv//www/"}},
         {"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
        [{"name": "d", "mountPath": "/data/", "subPath": "./a/b", "readOnly": True}])).pods[0][1]
    assert spec["volumes"] == [
        {"name": "ram", "emptyDir": {"medium": "Memory", "sizeLimit": 8 << 20}},
        {"name": "h", "hostPath": {"path": "/srv/www", "type": ""}},
        {"name": "d", "persistentVolumeClaim": {"claimName": "data", "readOnly": False}}]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "d", "mountPath": "/data", "readOnly": True, "subPath": "a/b"}]
    plain = parse_workload({"name": "p", "spec": {"containers": [{"name": "a", "command": ["true"]}]}})
    assert "volumes" not in plain.pods[0][1] and "volumeMounts" not in plain.pods[0][1]["containers"][0]


def test_host_path_is_refused_by_default_and_allowed_under_a_configured_prefix() -> None:
    spec = parse_workload(workload([{"name": "h", "hostPath": {"path": "/srv/www"}}])).pods[0][1]
    default = Policy.from_config(config.load(None, {}))
    with pytest.raises(PermissionDenied) as err:
        default.check(spec)
    assert err.value.field == "spec.volumes[0].hostPath.path"
    assert "volumes.host_path_prefixes" in err.value.message
    allowed = Policy.from_config(config.load(None, {"RIKLET_HOST_PATH_PREFIXES": "/srv"}))
    allowed.check(spec)
    with pytest.raises(PermissionDenied):   # a prefix is a directory, not a string prefix
        Policy(host_path_prefixes=("/sr",)).check(spec)


def test_chas_deploy_body_takes_volumes_as_extensions() -> None:
    from services.manager.chas.deploy import body_field, parse_deploy

    req = parse_deploy({"name": "web", "command": ["true"],
                        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
                        "volumeMounts": [{"name": "d", "mountPath": "/data"}]})
    spec = parse_workload(req.document).pods[0][1]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "data"
    assert spec["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"
    bad = parse_deploy({"name": "web", "command": ["true"],
                        "volumeMounts": [{"name": "x", "mountPath": "/m"}]})
    with pytest.raises(InvalidArgument) as err:
        parse_workload(bad.document)
    assert body_field(err.value.field) == "volumeMounts[0].name"
    assert body_field("spec.volumes[0].hostPath.path") == "volumes[0].hostPath.path"



def host_path_spec(path: Any) -> dict[str, Any]:
    return parse_workload(workload([{"name": "h", "hostPath": {"path": str(path)}}])).pods[0][1]


def test_a_symlink_under_the_prefix_cannot_lead_out_of_it(tmp_path: Any) -> None:
    os.symlink("/etc", tmp_path / "escape")
    os.mkdir(tmp_path / "inside")
    policy = Policy(host_path_prefixes=(str(tmp_path),))
    policy.check(host_path_spec(tmp_path / "inside"))
    with pytest.raises(PermissionDenied) as err:
        policy.check(host_path_spec(tmp_path / "escape"))
    assert err.value.field == "spec.volumes[0].hostPath.path"
