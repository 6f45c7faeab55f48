"""The node's policy: what a pod may ask for, checked on every way in (Node API Apply, CHaS
deploy, RIK instances) before anything is written. A refusal names the rule that refused."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import PermissionDenied
from common.imageref import registry_host
from common.volumes import host_paths, under_prefix


@dataclass(frozen=True)
class Policy:
    allowed_registries: tuple[str, ...] = ()        # empty: any registry
    max_cpu_millis: int | None = None               # per pod
    max_memory_bytes: int | None = None             # per pod
    host_ports: tuple[int, int] = (1, 65535)
    allow_host_network: bool = True
    host_path_prefixes: tuple[str, ...] = ()        # empty: no hostPath volume

    @classmethod
    def from_config(cls, cfg: Any) -> Policy:
        return cls(allowed_registries=tuple(cfg.policy_allowed_registries),
                   max_cpu_millis=cfg.policy_max_cpu, max_memory_bytes=cfg.policy_max_memory,
                   host_ports=(int(cfg.policy_host_ports[0]), int(cfg.policy_host_ports[1])),
                   allow_host_network=bool(cfg.policy_allow_host_network),
                   host_path_prefixes=tuple(cfg.volumes_host_path_prefixes))

    def check(self, spec: Mapping[str, Any]) -> None:
        """Raise PermissionDenied naming the rule and the field when ``spec`` (a normalized
        pod spec, see common.model) breaks the policy."""
        if spec.get("hostNetwork") and not self.allow_host_network:
            raise PermissionDenied("refused by policy.allow_host_network: this node does not run "
                                   "pods on the host network", "spec.hostNetwork")
        self._check_host_paths(spec)
        cpu = mem = 0
        cpu_unlimited = mem_unlimited = False
        for i, c in enumerate(spec.get("containers") or []):
            image = c.get("image")
            if image and self.allowed_registries:
                host = registry_host(image)
                if host not in self.allowed_registries:
                    raise PermissionDenied(
                        f"refused by policy.allowed_registries: {host} is not one of "
                        f"{', '.join(self.allowed_registries)}", f"spec.containers[{i}].image")
            res = c.get("resources") or {}
            cpu_unlimited |= res.get("cpu_millis") is None
            mem_unlimited |= res.get("memory_bytes") is None
            cpu += int(res.get("cpu_millis") or 0)
            mem += int(res.get("memory_bytes") or 0)
        if self.max_cpu_millis is not None and (cpu_unlimited or cpu > self.max_cpu_millis):
            asked = "no CPU limit" if cpu_unlimited else f"{cpu / 1000:g} CPU"
            raise PermissionDenied(f"refused by policy.max_cpu: the pod asks for {asked}, at most "
                                   f"{self.max_cpu_millis / 1000:g}", "spec.containers.resources.cpu")
        if self.max_memory_bytes is not None and (mem_unlimited or mem > self.max_memory_bytes):
            asked = "no memory limit" if mem_unlimited else f"{mem / 2**20:g} MiB"
            raise PermissionDenied(f"refused by policy.max_memory: the pod asks for {asked}, at most "
                                   f"{self.max_memory_bytes / 2**20:g} MiB",
                                   "spec.containers.resources.memory")
        lo, hi = self.host_ports
        for p in spec.get("ports") or []:
            if p.get("port") and not lo <= int(p["port"]) <= hi:
                raise PermissionDenied(f"refused by policy.host_ports: host port {p['port']} is outside "
                                       f"{lo}-{hi}", f"spec.containers.ports[{p.get('container')}].port")

    def _check_host_paths(self, spec: Mapping[str, Any]) -> None:
        for i, path in host_paths(spec):
            # where it leads now, too: a symlink under an allowed prefix must not lead out of it
            real = os.path.realpath(path)
            if not under_prefix(path, self.host_path_prefixes) or not under_prefix(
                    real, tuple(os.path.realpath(p) for p in self.host_path_prefixes)):
                allowed = (f"only paths under {', '.join(self.host_path_prefixes)}"
                           if self.host_path_prefixes else "no hostPath volume")
                raise PermissionDenied(f"refused by volumes.host_path_prefixes: {path} is not allowed "
                                       f"on this node ({allowed})", f"spec.volumes[{i}].hostPath.path")
