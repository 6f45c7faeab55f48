"""The process runtime: pods of plain commands, each held by a small per-pod shim."""

from services.manager.process.runtime import ProcessRuntime

__all__ = ["ProcessRuntime"]
