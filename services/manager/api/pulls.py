"""The Node API's ``PullProgress`` from what an image pull reports: a line of text, or the
downloads so far (:class:`services.manager.containerd.images.PullStatus`)."""

from __future__ import annotations

from typing import Any

from common.pb import node_pb2 as pb


def pull_progress(item: Any) -> pb.PullProgress:
    if isinstance(item, str):
        return pb.PullProgress(message=item)
    layers = [pb.PullLayer(ref=ref, state=state, offset=offset, total=total)
              for ref, state, offset, total in item.layers]
    return pb.PullProgress(message=item.message, layers=layers, bytes_done=sum(x.offset for x in layers),
                           bytes_total=sum(x.total for x in layers))
