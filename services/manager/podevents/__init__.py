"""Pod events in the manager: the :class:`Recorder` (queued, batched writes to memory and the
live followers of ``Events``) and the events derived from status transitions."""

from services.manager.podevents.recorder import Follower, NullRecorder, Recorder, Records
from services.manager.podevents.transitions import StatusEvents, Transition, transitions

__all__ = ["Follower", "NullRecorder", "Recorder", "Records", "StatusEvents", "Transition", "transitions"]
