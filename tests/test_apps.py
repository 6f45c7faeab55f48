"""The seed's App file: its conversion (pure), and ``rikletctl apply -f`` / ``get apps`` /
``delete`` through a real agent on containerd with the test image."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import yaml

from common.app import app_of, app_workload, is_app_file, parse_app
from common.errors import InvalidArgument
from tests.support import wait_for
from tests.test_containerd import CtrAgent, ctr_agent  # noqa: F401  (the fixture)

SEED_FILE = """\
name: nginx
repo: https://example.com/nginx | /usr/share/nginx/html
version: 1.19.1
action: deploy
metadata:
    name: app1
"""


def test_the_seeds_file_as_it_is() -> None:
    doc = yaml.safe_load(SEED_FILE)
    assert is_app_file(doc)
    app = parse_app(doc)
    assert (app.pod, app.name, app.action) == ("app1", "nginx", "deploy")
    assert app.image == "example.com/nginx:1.19.1"   # the registry alternative of the two
    [(pod, spec)] = app_workload(app).pods
    assert pod == "app1" and spec["workload"] == "app1"
    [c] = spec["containers"]
    assert (c["name"], c["image"], c["runtime"]) == ("nginx", "example.com/nginx:1.19.1", "containerd")
    assert app_of(spec) == {"name": "nginx", "repo": doc["repo"], "version": "1.19.1"}


def test_conversion_rules() -> None:
    app = parse_app({"name": "web", "repo": "127.0.0.1:5000/team/web", "version": 3, "action": "destroy"})
    assert (app.pod, app.image, app.action) == ("web", "127.0.0.1:5000/team/web:3", "destroy")
    assert parse_app({"name": "web", "repo": "busybox", "version": "latest"}).image == "busybox:latest"
    # an ordinary workload is not an app, and its pods carry no marker
    assert not is_app_file({"name": "web", "spec": {"containers": []}})
    assert app_of({"containers": []}) is None


@pytest.mark.parametrize(("doc", "field", "words"), [
    ({"name": "web", "repo": "/usr/share/nginx/html", "version": "1"}, "repo", "local path"),
    ({"name": "web", "repo": "./site", "version": "1"}, "repo", "local path"),
    ({"name": "web", "repo": "a.io/x | b.io/y", "version": "1"}, "repo", "give one"),
    ({"name": "web", "repo": "ftp://a.io/x", "version": "1"}, "repo", "scheme"),
    ({"name": "web", "repo": "a.io/x:2", "version": "1"}, "repo", "version"),
    ({"name": "web", "repo": "a.io/X Y", "version": "1"}, "repo", "not an image repository"),
    ({"name": "web", "repo": "a.io/x", "version": 1.10}, "version", "quote"),
    ({"name": "web", "repo": "a.io/x"}, "version", "tag"),
    ({"name": "web", "repo": "a.io/x", "version": "1 2"}, "version", "tag"),
    ({"name": "Web", "repo": "a.io/x", "version": "1"}, "name", "DNS label"),
    ({"name": "web", "repo": "a.io/x", "version": "1", "metadata": {"name": "a_b"}}, "metadata.name", "DNS"),
    ({"name": "web", "repo": "a.io/x", "version": "1", "metadata": {"labels": {}}}, "metadata.labels",
     "unknown"),
    ({"name": "web", "repo": "a.io/x", "version": "1", "metadata": "x"}, "metadata", "mapping"),
    ({"name": "web", "repo": "a.io/x", "version": "1", "action": "start"}, "action", "deploy or destroy"),
    ({"name": "web", "repo": "a.io/x", "version": "1", "replicas": 2}, "replicas", "unknown"),
])
def test_bad_fields_are_named(doc: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_app(doc)
    assert err.value.field == field and words in err.value.message


# -- through the agent ------------------------------------------------------------------------


@pytest.mark.integration
def test_apply_get_apps_delete(ctr_agent: CtrAgent, tmp_path: Any) -> None:  # noqa: F811
    ctr, a = ctr_agent, ctr_agent.agent
    repo, version = ctr.image.rsplit(":", 1)
    path = os.path.join(tmp_path, "app.yaml")

    def app_file(action: str, name: str) -> str:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"name: box\nrepo: {repo}\nversion: {version}\naction: {action}\n"
                     f"metadata:\n  name: {name}\n")
        return path

    assert a.ctl("apply", "-f", app_file("deploy", "app1")).stdout == "app/app1 deployed\n"
    assert a.ctl("apply", "-f", app_file("deploy", "app2")).stdout == "app/app2 deployed\n"
    a.ctl("run", "plain", "--", "sleep", "300")      # an ordinary pod: no app
    pod = a.pod("app1")
    assert pod["spec"]["containers"][0]["image"] == ctr.image

    def apps() -> dict[str, list[str]]:
        lines = a.ctl("get", "apps").stdout.splitlines()
        assert lines[0].split() == ["NAME", "STATUS", "AGE"]
        return {line.split()[0]: line.split()[1:] for line in lines[1:]}

    # busybox's default command (sh) ends at once: the app completes, and restarts (Always)
    listed = wait_for(lambda: (x := apps()) and x.get("app1", [""])[0] in ("Running", "Completed") and x,
                      30, "app1 listed with its status")
    assert set(listed) == {"app1", "app2"}
    assert "plain" in a.ctl("get", "pods").stdout.split()
    [one] = json.loads(a.ctl("get", "app", "app1", "-o", "json").stdout)
    assert (one["name"], one["app"]) == ("app1", {"name": "box", "repo": repo, "version": version})
    assert a.ctl("get", "app", "plain").stdout.splitlines() == ["NAME  STATUS  AGE"]

    node = json.loads(a.ctl("node", "-o", "json").stdout)["resources"]["id"]
    assert a.ctl("delete", "app1").stdout == f"app1 deleted on {node}\n"
    assert a.ctl("apply", "-f", app_file("destroy", "app2")).stdout == f"app2 deleted on {node}\n"
    assert a.ctl("delete", "plain").stdout == "pod/plain deleted\n"
    wait_for(lambda: not a.pods(), 30, "every pod gone")
    res = a.ctl("apply", "-f", app_file("destroy", "app2"), check=False)
    assert res.returncode == 1 and "metadata.name" in res.stderr and "app2" in res.stderr
