"""Images of the containerd runtime: pulled once per reference at a time (with progress),
imported from archives, listed and removed unless a pod's container uses them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import Conflict, Internal, NotFound, RikletError
from common.imageref import normalize_ref, registry_host
from services.manager.containerd.client import LABEL_POD, Containerd, ImageInfo
from services.manager.containerd.exits import StartFailure


def pull_args(ref: str, snapshotter: str, insecure: set[str]) -> list[str]:
    """``ctr images pull`` arguments: plain HTTP only for registries configured as insecure
    (containerd, like Docker, also allows it for loopback registries on its own)."""
    args = ["images", "pull", "--snapshotter", snapshotter]
    if registry_host(ref) in insecure:
        args.append("--plain-http")
    return args


@dataclass(frozen=True)
class PullStatus:
    """A pull's downloads so far, each ``(ref, state, offset, total)``: "downloading" while
    containerd ingests it, "done" once it left the ingests."""
    message: str
    layers: tuple[tuple[str, str, int, int], ...]


class Layers:
    """The downloads one pull has seen (containerd lists only those still in progress)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, int, int]] = {}

    def update(self, statuses: list[tuple[str, int, int]]) -> tuple[tuple[str, str, int, int], ...]:
        now = {ref: (offset, total) for ref, offset, total in statuses}
        for ref, (state, _offset, total) in list(self.seen.items()):
            if ref not in now and state != "done":
                self.seen[ref] = ("done", total, total)
        for ref, (offset, total) in now.items():
            self.seen[ref] = ("downloading", offset, total)
        return tuple((ref, st, off, tot) for ref, (st, off, tot) in self.seen.items())

    def finish(self, image_layers: list[tuple[str, int]]) -> None:
        """The image's layers, done, for those that were fetched too fast to be seen (or were
        already here)."""
        for digest, size in image_layers:
            self.seen.setdefault(f"layer-{digest}", ("done", size, size))


class Images:
    """The image half of :class:`services.manager.containerd.runtime.ContainerdRuntime`."""

    def __init__(self, client: Containerd, insecure_registries: tuple[str, ...]) -> None:
        self.client = client
        self.insecure = set(insecure_registries)
        self._pull_locks: dict[str, threading.Lock] = {}
        self._pull_guard = threading.Lock()

    def ensure_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        if self.client.has_image(image):
            return
        with self._pull_guard:
            lock = self._pull_locks.setdefault(image, threading.Lock())
        with lock:  # one pull per image at a time; the others wait for it
            if not self.client.has_image(image):
                self.pull(image, progress)

    def pull(self, image: str, progress: Callable[[str], None] | None = None,
             layers: Callable[[PullStatus], None] | None = None) -> str:
        """``layers``, when given, is told each download's progress (instead of ``progress``)."""
        ref = normalize_ref(image)
        args = pull_args(ref, self.client.snapshotter, self.insecure)
        done = threading.Event()
        seen = Layers()

        def report() -> None:
            while not done.wait(0.5 if layers is None else 0.2):
                with contextlib.suppress(RikletError):
                    statuses = self.client.ingest_statuses()
                    got, total = sum(s[1] for s in statuses), sum(s[2] for s in statuses)
                    message = f"pulling image {ref}: {got / 2**20:.1f} of {total / 2**20:.1f} MiB"
                    if layers is not None:
                        layers(PullStatus(message, seen.update(statuses)))
                    elif progress is not None and total:
                        progress(message)

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            self.client.ctr(*args, ref)
        except Internal as exc:
            raise StartFailure("ErrImagePull", f"cannot pull image {ref}: {exc.message.split(': ', 1)[-1]}"
                           ) from None
        finally:
            done.set()
            reporter.join()
        if layers is not None:
            with contextlib.suppress(RikletError):
                seen.finish(self.client.image_layers(ref))
            layers(PullStatus(f"pulled image {ref}", seen.update([])))
        elif progress is not None:
            progress(f"pulled image {ref}")
        return ref

    def import_archive(self, path: str) -> list[str]:
        before = {i.name for i in self.client.images()}
        out = self.client.ctr("images", "import", "--snapshotter", self.client.snapshotter, path)
        names = [line.split()[1] for line in out.splitlines() if line.startswith("unpacking ")
                 and len(line.split()) > 1]
        after = {i.name for i in self.client.images()}
        return sorted(set(names) | (after - before))

    def images(self) -> list[ImageInfo]:
        return self.client.images()

    def remove_image(self, image: str) -> str:
        ref = image if self.client.has_image(image) else normalize_ref(image)
        users = [labels.get(LABEL_POD, cid) for cid, labels, used in self.client.containers_with_images()
                 if used == ref]
        if users:
            raise Conflict(f"image {ref} is used by pod(s) {', '.join(sorted(set(users)))}", "image")
        try:
            self.client.remove_image(ref)
        except NotFound:
            raise NotFound(f"no image {image} on this node", "image") from None
        return ref
