"""Containers' health probes: liveness, readiness and startup (see :mod:`.prober`)."""

from services.manager.probes.prober import Prober

__all__ = ["Prober"]
