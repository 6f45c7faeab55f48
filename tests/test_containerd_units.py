"""The containerd driver's pure parts: OCI spec, image references, exit classification, the
log driver, proto rewriting and the settings. No containerd needed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common import config
from common.errors import InvalidArgument
from common.imageref import normalize_ref
from common.model import parse_workload
from common.pb.containerd import _rewrite
from services.manager.containerd import ocispec
from services.manager.containerd.client import chain_id
from services.manager.containerd.exits import classify, should_restart
from services.manager.containerd.images import pull_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = {"config": {"Entrypoint": ["/entry"], "Cmd": ["serve", "--port", "80"],
                    "Env": ["PATH=/bin", "MODE=image"], "WorkingDir": "/srv", "User": "1000:1001"}}


@pytest.mark.parametrize(("ref", "expected"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
    ("localhost/app:v1", "localhost/app:v1"),
    ("registry.example/team/app:v2", "registry.example/team/app:v2"),
    ("busybox@sha256:abc", "docker.io/library/busybox@sha256:abc"),
])
def test_image_references_are_made_explicit(ref: str, expected: str) -> None:
    assert normalize_ref(ref) == expected


def test_plain_http_only_for_configured_registries() -> None:
    assert "--plain-http" in pull_args("10.0.0.5:5000/app:1", "overlayfs", {"10.0.0.5:5000"})
    assert "--plain-http" not in pull_args("10.0.0.6:5000/app:1", "overlayfs", {"10.0.0.5:5000"})
    assert "--plain-http" not in pull_args("busybox", "overlayfs", {"docker.io"} - {"docker.io"})


def test_command_and_args_follow_kubernetes() -> None:
    assert ocispec.argv_of(IMAGE, [], []) == ["/entry", "serve", "--port", "80"]
    assert ocispec.argv_of(IMAGE, [], ["other"]) == ["/entry", "other"]
    assert ocispec.argv_of(IMAGE, ["sh", "-c"], ["echo hi"]) == ["sh", "-c", "echo hi"]
    with pytest.raises(InvalidArgument) as exc:
        ocispec.argv_of({"config": {}}, [], [])
    assert exc.value.field == "command"


def test_env_merges_pod_over_image_and_user_is_numeric() -> None:
    env = ocispec.env_of(IMAGE, {"MODE": "pod", "EXTRA": "1"})
    assert env == ["PATH=/bin", "MODE=pod", "EXTRA=1"]
    assert ocispec.env_of({}, {})[0].startswith("PATH=")
    assert ocispec.user_of(IMAGE) == (1000, 1001)
    assert ocispec.user_of({"config": {"User": "nginx"}}) == (0, 0)
    assert ocispec.user_of({"config": {}}, (65534, 65534)) == (65534, 65534)


def test_spec_carries_limits_namespaces_and_files() -> None:
    spec = ocispec.build(argv=["sleep", "1"], env=["A=1"], cwd="/srv", hostname="web",
                         netns="/var/run/netns/x", cgroups_path="/riklet/a/web/c",
                         memory_bytes=64 << 20, cpu_millis=250, etc_files={"/etc/hosts": "/p/hosts"})
    linux = spec["linux"]
    assert linux["resources"]["memory"] == {"limit": 64 << 20}
    assert linux["resources"]["cpu"] == {"quota": 25_000, "period": 100_000}
    assert {"type": "network", "path": "/var/run/netns/x"} in linux["namespaces"]
    assert linux["cgroupsPath"] == "/riklet/a/web/c"
    assert spec["process"]["noNewPrivileges"] is True
    assert "CAP_SYS_ADMIN" not in spec["process"]["capabilities"]["bounding"]
    assert {"destination": "/etc/hosts", "type": "bind", "source": "/p/hosts",
            "options": ["rbind", "ro"]} in spec["mounts"]
    host = ocispec.build(argv=["true"], env=[], cwd="", hostname="h", netns=None, cgroups_path="/x",
                         memory_bytes=None, cpu_millis=None, etc_files={})
    assert all(n["type"] != "network" for n in host["linux"]["namespaces"])
    assert "memory" not in host["linux"]["resources"] and host["process"]["cwd"] == "/"


def test_exits_are_classified_like_process_pods() -> None:
    assert classify(0, False)["reason"] == "Completed"
    assert classify(3, False) == {"exitCode": 3, "signal": None, "reason": "Error", "message": None}
    assert classify(137, True)["reason"] == "OOMKilled"
    killed = classify(137, False)
    assert (killed["reason"], killed["signal"]) == ("Signaled", "SIGKILL")
    assert classify(143, False)["signal"] == "SIGTERM"
    assert should_restart("Always", classify(0, False))
    assert not should_restart("OnFailure", classify(0, False))
    assert should_restart("OnFailure", classify(1, False))
    assert not should_restart("Never", classify(1, False))


def test_chain_id_of_layers() -> None:
    assert chain_id(["sha256:a"]) == "sha256:a"
    two = chain_id(["sha256:a", "sha256:b"])
    assert two.startswith("sha256:") and two != chain_id(["sha256:b", "sha256:a"])


def test_proto_rewrite_keeps_packages_and_drops_go_annotations() -> None:
    src = '''syntax = "proto3";
package containerd.services.tasks.v1;
import "github.com/containerd/containerd/api/types/mount.proto";
import "google/rpc/status.proto";
import weak "gogoproto/gogo.proto";
option (gogoproto.goproto_getters_all) = true;
message M {
\tstring id = 1 [(gogoproto.customname) = "ID", (gogoproto.nullable) = false];
}
'''
    out = _rewrite(src)
    assert 'import "common/pb/ctrd/types/mount.proto";' in out
    assert 'import "common/pb/ctrd/rpc/status.proto";' in out
    assert "gogoproto" not in out
    assert "package containerd.services.tasks.v1;" in out
    assert "string id = 1;" in out


def test_log_driver_writes_both_streams_and_signals_ready(tmp_path: object) -> None:
    """Run the log driver as containerd's shim does: stdout on fd 3, stderr on fd 4, and fd 5
    closed by the driver once it is ready."""
    log = os.path.join(str(tmp_path), "c.log")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    # move the pipe ends to 3, 4 and 5 (through high numbers: the originals may be 3 to 5)
    script = (f"import os, sys; sys.path.insert(0, {ROOT!r}); "
              f"src = [{out_r}, {err_r}, {ready_w}]; "
              "high = [os.dup2(fd, 100 + i) for i, fd in enumerate(src)]; "
              "[os.close(fd) for fd in src]; "
              "[os.dup2(fd, 3 + i) for i, fd in enumerate(high)]; [os.close(fd) for fd in high]; "
              "from services.manager.containerd.logdriver import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", script, "max_files", "2", "path", log,
                             "max_size", "1000"], pass_fds=(out_r, err_r, ready_w))
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    assert os.read(ready_r, 1) == b""  # EOF: the driver closed its end of fd 5
    os.close(ready_r)
    os.write(out_w, b"to stdout\n")
    os.write(err_w, b"to stderr\n")
    os.close(out_w)
    os.close(err_w)
    assert proc.wait(timeout=10) == 0
    with open(log, "rb") as fh:
        data = fh.read()
    assert b"to stdout\n" in data and b"to stderr\n" in data


def test_log_driver_refuses_odd_arguments() -> None:
    from services.manager.containerd.logdriver import parse_args
    with pytest.raises(SystemExit):
        parse_args(["path"])
    assert parse_args(["path", "/x", "max_size", "5"]) == {"path": "/x", "max_size": "5"}


def test_settings_for_containerd_and_network() -> None:
    cfg = config.load(environ={"CONTAINERD_SOCKET": "unix:///run/x.sock", "RIKLET_POD_SUBNET": "10.9.0.0/24",
                               "RIKLET_INSECURE_REGISTRIES": "a:5000, b"})
    assert cfg.containerd_address == "/run/x.sock"
    assert cfg.containerd_namespace == "riklet"
    assert cfg.network_subnet == "10.9.0.0/24"
    assert cfg.containerd_insecure_registries == ("a:5000", "b")
    for env, field in [({"CONTAINERD_SOCKET": "relative.sock"}, "CONTAINERD_SOCKET"),
                       ({"RIKLET_POD_SUBNET": "10.9.0.1/24"}, "RIKLET_POD_SUBNET"),
                       ({"RIKLET_BRIDGE": "a-bridge-name-too-long"}, "RIKLET_BRIDGE")]:
        with pytest.raises(InvalidArgument) as exc:
            config.load(environ=env)
        assert exc.value.field == field


def test_a_pod_runs_on_one_runtime() -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_workload({"name": "mix", "spec": {"containers": [
            {"name": "a", "image": "busybox"}, {"name": "b", "command": ["sleep", "1"]}]}})
    assert exc.value.field == "spec.containers"
