"""The named-volume store on its own: durable create, refusals naming the field, removal only
without users, leftovers of an interrupted create or remove swept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from services.manager.volumes.store import VolumeStore, claimed_by


def test_create_list_remove(tmp_path: Path) -> None:
    store = VolumeStore(str(tmp_path))
    info = store.create("data", 1 << 20)
    assert info.size_bytes == 1 << 20 and os.path.isdir(info.path) and store.exists("data")
    with pytest.raises(AlreadyExists):
        store.create("data")
    with pytest.raises(InvalidArgument) as err:
        store.create("Not_A_Label")
    assert err.value.field == "name"
    with pytest.raises(Conflict) as busy:
        store.remove("data", lambda name: ["web", "db"])
    assert "web, db" in busy.value.message and store.exists("data")
    assert [v.name for v in VolumeStore(str(tmp_path)).all()] == ["data"]   # reopened: still there
    store.remove("data", lambda name: [])
    assert store.all() == [] and not os.listdir(store.root)
    with pytest.raises(NotFound):
        store.get("data")


def test_leftovers_are_swept_when_the_store_opens(tmp_path: Path) -> None:
    root = tmp_path / "volumes"
    (root / ".new-x-1234").mkdir(parents=True)
    (root / ".rm-y-5678" / "data").mkdir(parents=True)
    assert VolumeStore(str(tmp_path)).all() == [] and not os.listdir(root)


def test_claimed_by_names_the_pods_that_claim_a_volume() -> None:
    def rec(name: str, claim: str | None) -> dict[str, object]:
        vols = [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}] if claim else []
        return {"name": name, "spec": {"volumes": vols}}
    assert claimed_by([rec("b", "data"), rec("a", "data"), rec("c", "other"), rec("d", None)],
                      "data") == ["a", "b"]
