"""The node-agent seed's App file (seed 000, "App"): one image deployed or destroyed.

```yaml
name: nginx                       # the application
repo: https://example.com/nginx   # where its image lives (a registry repository)
version: 1.19.1                   # the image's tag
action: deploy                    # or destroy
metadata:
  name: app1                      # this deployment: the pod's name (default: name)
```

``repo`` with ``version`` is the image ``repo:version`` (a leading ``https://`` or ``http://``
is dropped: whether a registry is reached over plain HTTP is the node's
``containerd.insecure_registries``, as for any image). A ``repo`` that is a local path is
refused: riklet runs images and commands, and a directory of files (the seed's
``/usr/share/nginx/html``) is neither. The seed's own example, ``repo: https://example.com/nginx
| /usr/share/nginx/html``, is accepted as it is: of alternatives separated by ``|``, the one
registry repository is taken. The app runs on containerd as a one-container pod named
``metadata.name`` (else ``name``), its container named ``name``; its spec carries
``app: {name, repo, version}``, which is how an app is told apart from other workloads
(``rikletctl get apps``). Pure: no I/O, shared by the Node API and any other boundary.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgument, excerpt
from common.model import Workload, dns_label, parse_workload

APP_KEYS = frozenset({"name", "repo", "version", "action", "metadata"})
METADATA_KEYS = frozenset({"name"})
ACTIONS = ("deploy", "destroy")
MAX_REPO = 400
MAX_VERSION = 128
SPEC_KEY = "app"     # the pod spec's marker: {name, repo, version}
_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_REPO = re.compile(r"[a-z0-9]([a-z0-9._:-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*")
_SCHEMES = ("https://", "http://")


def is_app_file(document: Mapping[str, Any]) -> bool:
    """Whether a decoded document is an App file rather than a workload: it has ``repo`` and
    none of a workload's ``spec`` or ``kind``."""
    return "repo" in document and "spec" not in document and "kind" not in document


@dataclass(frozen=True)
class App:
    name: str        # the application (the container's name)
    pod: str         # the deployment: the pod's and workload's name
    repo: str        # as given
    version: str
    image: str       # repo:version, without a URL scheme
    action: str

    def marker(self) -> dict[str, str]:
        return {"name": self.name, "repo": self.repo, "version": self.version}


def _version(value: object) -> str:
    if isinstance(value, (bool, float)):
        # YAML reads 1.10 as the number 1.1: the tag meant would be lost
        raise InvalidArgument(f"expected a tag such as 1.19.1; quote {excerpt(value)} to keep it as written",
                              "version")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise InvalidArgument("expected the image's tag, e.g. 1.19.1", "version")
    if len(value) > MAX_VERSION or not _VERSION.fullmatch(value):
        raise InvalidArgument(f"not an image tag: {excerpt(value)}", "version")
    return value


def _image(repo: object) -> str:
    """The image repository ``repo`` names. The seed writes its two kinds of source as
    alternatives (``https://example.com/nginx | /usr/share/nginx/html``): of such a list, the
    one registry repository is taken; local paths are refused."""
    if not isinstance(repo, str) or not repo.strip():
        raise InvalidArgument("expected the image's repository, e.g. registry.example.com/nginx", "repo")
    if len(repo) > MAX_REPO:
        raise InvalidArgument(f"longer than {MAX_REPO} characters", "repo")
    choices = [part.strip() for part in repo.split("|")]
    remote = [part for part in choices if not _is_path(part)]
    if len(remote) > 1:
        raise InvalidArgument(f"{excerpt(repo)} names {len(remote)} repositories: give one", "repo")
    return _repository(remote[0] if remote else choices[0])


def _is_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", "file:"))


def _repository(text: str) -> str:
    if _is_path(text):
        raise InvalidArgument(
            f"{excerpt(text)} is a local path: riklet runs images (give a registry repository, e.g. "
            "registry.example.com/nginx) or commands (apply a Pod manifest without an image)", "repo")
    for scheme in _SCHEMES:
        if text.startswith(scheme):
            text = text[len(scheme):].rstrip("/")
            break
    else:
        if "://" in text:
            raise InvalidArgument(f"unsupported scheme in {excerpt(text)} (https://, http://, or none)",
                                  "repo")
    if not _REPO.fullmatch(text):
        raise InvalidArgument(f"not an image repository: {excerpt(text)} (its tag goes in version)", "repo")
    if ":" in text.rsplit("/", 1)[-1]:
        raise InvalidArgument("give the tag in version, not in repo", "repo")
    return text


def parse_app(document: Mapping[str, Any]) -> App:
    """An App file, validated: every field is checked and a bad one named."""
    unknown = sorted(str(k) for k in document if k not in APP_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown field (an App file has {', '.join(sorted(APP_KEYS))})", unknown[0])
    name = dns_label(document.get("name"), "name")
    metadata = document.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise InvalidArgument("expected a mapping with name", "metadata")
    extra = sorted(str(k) for k in metadata if k not in METADATA_KEYS)
    if extra:
        raise InvalidArgument("unknown field (metadata has name)", f"metadata.{extra[0]}")
    pod = dns_label(metadata["name"], "metadata.name") if "name" in metadata else name
    action = document.get("action", "deploy")
    if action not in ACTIONS:
        raise InvalidArgument(f"expected deploy or destroy, got {excerpt(action)}", "action")
    repo = document.get("repo")
    version = _version(document.get("version"))
    image = _image(repo)
    return App(name=name, pod=pod, repo=str(repo).strip(), version=version,
               image=f"{image}:{version}", action=str(action))


def app_workload(app: App, default_grace: float = 10.0) -> Workload:
    """The app as riklet's workload: one pod, one containerd container, marked as an app."""
    workload = parse_workload({"apiVersion": "v1", "kind": "Pod", "name": app.pod, "spec": {
        "containers": [{"name": app.name, "image": app.image}]}}, default_grace)
    return Workload(name=workload.name, kind=workload.kind,
                    pods=tuple((pod, {**spec, SPEC_KEY: app.marker()}) for pod, spec in workload.pods))


def app_of(spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The app marker of a pod's spec; None for a pod made from an ordinary manifest."""
    marker = spec.get(SPEC_KEY)
    return marker if isinstance(marker, Mapping) else None
