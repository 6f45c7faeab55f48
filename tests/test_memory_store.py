"""The store on its own: real SQLite in a temporary directory, no sockets."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import Conflict, InvalidArgument, NotFound, RikletError
from services.memory.store import DB_NAME, MAX_DOC_BYTES, Store

SPEC: dict[str, Any] = {"containers": [{"name": "app", "image": "busybox"}], "ports": [8080]}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(str(tmp_path))
    yield s
    s.close()


def test_a_new_pod_is_pending_at_version_1_and_emits_applied(store: Store) -> None:
    change = store.apply("web", SPEC)
    pod = change.result["pod"]
    assert change.result["changed"] is True
    assert pod["version"] == 1 and pod["desired"] == "running"
    assert pod["status"] == {"phase": "Pending"} and pod["spec"] == SPEC
    assert len(pod["uid"]) == 32 and pod["created_at"] == pod["updated_at"]
    [ev] = change.events
    assert (ev.topic, ev.seq) == ("pod.web.applied", 1)
    assert ev.data == {"kind": "applied", "pod": pod}
    assert store.get("web") == pod and store.seq == 1


def test_applying_the_same_spec_again_changes_nothing(store: Store) -> None:
    first = store.apply("web", SPEC).result["pod"]
    again = store.apply("web", {"ports": [8080], "containers": [{"image": "busybox", "name": "app"}]})
    assert again.result == {"pod": first, "changed": False}
    assert again.events == () and store.seq == 1


def test_a_new_spec_replaces_the_old_one_and_bumps_the_version(store: Store) -> None:
    uid = store.apply("web", SPEC).result["pod"]["uid"]
    change = store.apply("web", {**SPEC, "ports": [9090]})
    pod = change.result["pod"]
    assert (pod["version"], pod["uid"], pod["spec"]["ports"]) == (2, uid, [9090])
    assert [ev.seq for ev in change.events] == [2]


def test_apply_wants_a_stopped_pod_running_again(store: Store) -> None:
    store.apply("web", SPEC)
    store.set_desired("web", "stopped")
    pod = store.apply("web", SPEC).result["pod"]
    assert (pod["desired"], pod["version"]) == ("running", 3)


def test_apply_keeps_a_given_uid_and_refuses_another(store: Store) -> None:
    assert store.apply("web", SPEC, uid="abc").result["pod"]["uid"] == "abc"
    assert store.apply("web", SPEC, uid="abc").result["changed"] is False
    with pytest.raises(Conflict) as exc:
        store.apply("web", {"other": 1}, uid="xyz")
    assert exc.value.field == "uid"
    assert store.get("web")["spec"] == SPEC


def test_set_status_replaces_the_status_and_bumps_the_version(store: Store) -> None:
    uid = store.apply("web", SPEC).result["pod"]["uid"]
    change = store.set_status("web", uid, {"phase": "Running", "pid": 42}, expect_version=1)
    assert change.result["status"] == {"phase": "Running", "pid": 42}
    assert change.result["version"] == 2
    [ev] = change.events
    assert (ev.topic, ev.seq, ev.data["kind"]) == ("pod.web.status", 2, "status")


@pytest.mark.parametrize(("name", "uid", "expect", "error", "field"), [
    ("web", "wrong", None, Conflict, "uid"),
    ("web", None, 7, Conflict, "expect_version"),
    ("nope", None, None, NotFound, "name"),
])
def test_set_status_rejections_name_the_field_and_change_nothing(
        store: Store, name: str, uid: str | None, expect: int | None,
        error: type[RikletError], field: str) -> None:
    pod = store.apply("web", SPEC).result["pod"]
    with pytest.raises(error) as exc:
        store.set_status(name, uid or pod["uid"], {"phase": "Running"}, expect_version=expect)
    assert exc.value.field == field
    assert store.get("web") == pod and store.seq == 1


def test_set_desired_bumps_once_and_is_a_no_op_when_unchanged(store: Store) -> None:
    store.apply("web", SPEC)
    change = store.set_desired("web", "stopped")
    assert (change.result["desired"], change.result["version"]) == ("stopped", 2)
    assert [(ev.topic, ev.data["kind"]) for ev in change.events] == [("pod.web.desired", "desired")]
    again = store.set_desired("web", "stopped")
    assert again.events == () and again.result["version"] == 2
    with pytest.raises(NotFound):
        store.set_desired("nope", "stopped")


def test_remove_deletes_the_record_and_says_so(store: Store) -> None:
    uid = store.apply("web", SPEC).result["pod"]["uid"]
    gen = store.set_desired("web", "deleted").result["generation"]
    with pytest.raises(Conflict) as exc:
        store.remove("web", "wrong", gen)
    assert exc.value.field == "uid"
    change = store.remove("web", uid, gen)
    assert change.result is None
    [ev] = change.events
    assert (ev.topic, ev.data) == ("pod.web.removed", {"kind": "removed", "name": "web", "uid": uid})
    with pytest.raises(NotFound) as gone:
        store.get("web")
    assert gone.value.field == "name"
    with pytest.raises(NotFound):
        store.remove("web", uid, gen)


def test_generation_advances_with_what_is_wanted_not_with_status(store: Store) -> None:
    pod = store.apply("web", SPEC).result["pod"]
    assert pod["generation"] == 1
    assert store.set_status("web", pod["uid"], {"phase": "Running"}).result["generation"] == 1
    assert store.apply("web", SPEC).result["pod"]["generation"] == 1  # unchanged
    assert store.apply("web", {**SPEC, "x": 1}).result["pod"]["generation"] == 2
    assert store.set_desired("web", "stopped").result["generation"] == 3
    assert store.set_desired("web", "stopped").result["generation"] == 3


def test_a_late_delete_never_removes_the_pod_applied_after_it(store: Store) -> None:
    """The race of issue 12: apply, delete, apply again; the reconciler then finishes the
    delete with the record it read before the second apply."""
    uid = store.apply("race", SPEC).result["pod"]["uid"]
    deleted = store.set_desired("race", "deleted").result
    again = store.apply("race", SPEC).result
    assert again["changed"] and again["pod"]["desired"] == "running"
    with pytest.raises(Conflict) as exc:
        store.remove("race", uid, deleted["generation"])
    assert exc.value.field == "generation"
    with pytest.raises(Conflict):  # nor can its stale status overwrite the new one
        store.set_status("race", uid, {"phase": "Terminated"}, generation=deleted["generation"])
    assert store.get("race")["desired"] == "running"
    assert store.get("race")["status"] == {"phase": "Pending"}


def test_only_a_deleted_pod_can_be_removed(store: Store) -> None:
    pod = store.apply("web", SPEC).result["pod"]
    with pytest.raises(Conflict) as exc:
        store.remove("web", pod["uid"], pod["generation"])
    assert exc.value.field == "desired"
    assert store.get("web")["desired"] == "running"


def test_a_fenced_desire_refuses_a_pod_that_changed(store: Store) -> None:
    pod = store.apply("web", SPEC).result["pod"]
    store.apply("web", {**SPEC, "x": 1})
    with pytest.raises(Conflict):
        store.set_desired("web", "deleted", uid=pod["uid"], generation=pod["generation"])
    with pytest.raises(Conflict):
        store.set_desired("web", "deleted", uid="other")
    assert store.get("web")["desired"] == "running"


def test_a_schema_1_database_gains_generations(tmp_path: Path) -> None:
    import sqlite3
    path = str(tmp_path / "riklet.db")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE pods (name TEXT PRIMARY KEY, uid TEXT NOT NULL, version INTEGER NOT NULL,
            desired TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL);
        INSERT INTO pods VALUES ('web', 'u1', 3, 'running', '{}', '{}', 1.0, 2.0);
        PRAGMA user_version=1;""")
    db.close()
    s = Store(path)
    try:
        assert s.get("web")["generation"] == 1 and s.get("web")["version"] == 3
        assert s.set_desired("web", "deleted").result["generation"] == 2
    finally:
        s.close()


def test_list_and_snapshot_agree_with_the_sequence(store: Store) -> None:
    for name in ("db", "web", "cache"):
        store.apply(name, SPEC)
    snap = store.snapshot()
    assert [p["name"] for p in snap["pods"]] == ["cache", "db", "web"]
    assert snap["pods"] == store.list()
    assert snap["seq"] == 3 and snap["epoch"] == store.epoch


@pytest.mark.parametrize("name", ["", "Web", "-web", "web-", "a" * 64, "a.b", "a_b", 5, None])
def test_bad_names_are_refused(store: Store, name: Any) -> None:
    with pytest.raises(InvalidArgument) as exc:
        store.apply(name, SPEC)
    assert exc.value.field == "args.name"


@pytest.mark.parametrize("name", ["a", "0", "a" * 63, "web-1", "1-2-3"])
def test_good_names_are_accepted(store: Store, name: str) -> None:
    assert store.apply(name, SPEC).result["pod"]["name"] == name


@pytest.mark.parametrize("spec", [[], "x", None, {"n": float("nan")}, {"big": "x" * MAX_DOC_BYTES}])
def test_bad_specs_are_refused(store: Store, spec: Any) -> None:
    with pytest.raises(InvalidArgument) as exc:
        store.apply("web", spec)
    assert exc.value.field == "args.spec"
    assert store.list() == [] and store.seq == 0


@pytest.mark.parametrize(("call", "field"), [
    (lambda s, uid: s.set_status("web", uid, ["Running"]), "args.status"),
    (lambda s, uid: s.set_status("web", 7, {}), "args.uid"),
    (lambda s, uid: s.set_status("web", uid, {}, expect_version=True), "args.expect_version"),
    (lambda s, uid: s.set_status("web", uid, {}, expect_version=0), "args.expect_version"),
    (lambda s, uid: s.set_desired("web", "paused"), "args.desired"),
    (lambda s, uid: s.remove("web", "", 1), "args.uid"),
    (lambda s, uid: s.remove("web", uid, True), "args.generation"),
    (lambda s, uid: s.set_status("web", uid, {}, generation=0), "args.generation"),
    (lambda s, uid: s.apply("web", SPEC, uid=3), "args.uid"),
])
def test_other_bad_arguments_name_their_field(store: Store, call: Any, field: str) -> None:
    uid = store.apply("web", SPEC).result["pod"]["uid"]
    with pytest.raises(InvalidArgument) as exc:
        call(store, uid)
    assert exc.value.field == field
    assert store.seq == 1


def test_everything_survives_reopening(tmp_path: Path) -> None:
    s = Store.open(str(tmp_path))
    uid = s.apply("web", SPEC).result["pod"]["uid"]
    s.set_status("web", uid, {"phase": "Running"})
    before = s.snapshot()
    s.close()
    again = Store.open(str(tmp_path))
    assert again.snapshot() == before
    assert [ev.seq for ev in again.apply("db", SPEC).events] == [3]
    again.close()


def test_each_database_has_its_own_epoch(tmp_path: Path) -> None:
    a, b = Store.open(str(tmp_path / "a")), Store.open(str(tmp_path / "b"))
    assert a.epoch != b.epoch and len(a.epoch) == 32
    a.close()
    b.close()


def test_the_database_is_private_durable_and_in_wal_mode(store: Store, tmp_path: Path) -> None:
    store.apply("web", SPEC)
    path = tmp_path / DB_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_retried_write_gets_the_first_answer_even_after_a_restart(tmp_path: Path) -> None:
    s = Store.open(str(tmp_path))
    uid = s.apply("web", SPEC).result["pod"]["uid"]
    first = s.set_status("web", uid, {"phase": "Running"}, expect_version=1, request_id="r1")
    s.close()
    s = Store.open(str(tmp_path))
    retry = s.set_status("web", uid, {"phase": "Running"}, expect_version=1, request_id="r1")
    assert retry.result == first.result and retry.events == ()
    assert s.get("web")["version"] == 2
    gen = s.set_desired("web", "deleted").result["generation"]
    s.remove("web", uid, gen, request_id="r2")
    assert s.remove("web", uid, gen, request_id="r2").result is None
    s.close()


def test_a_failed_write_is_not_remembered(store: Store) -> None:
    with pytest.raises(NotFound):
        store.set_desired("web", "stopped", request_id="r1")
    store.apply("web", SPEC)
    assert store.set_desired("web", "stopped", request_id="r1").result["desired"] == "stopped"


# -- the indexes an apply reads instead of every pod (schema 3) -------------------------------

def web(workload: str, *ports: tuple[str, int]) -> dict[str, Any]:
    return {"workload": workload, "containers": [{"name": "app"}],
            "ports": [{"protocol": p, "port": n, "target_port": 80} for p, n in ports]}


def names(records: list[dict[str, Any]]) -> list[str]:
    return [r["name"] for r in records]


def test_query_returns_the_named_the_workload_and_the_port_holders_once(store: Store) -> None:
    store.apply("a-0", web("a", ("TCP", 8080)))
    store.apply("a-1", web("a", ("TCP", 8080)))
    store.apply("b", web("b", ("TCP", 9090), ("UDP", 53)))
    store.apply("c", web("c", ("UDP", 9090)))
    store.apply("d", web("d"))
    store.set_desired("b", "deleted")   # a pod being deleted still holds its port until removed
    assert names(store.query(["d", "zz"], "a", [["TCP", 9090]])) == ["a-0", "a-1", "b", "d"]
    assert names(store.query([], None, [["UDP", 9090], ["UDP", 53]])) == ["b", "c"]
    assert store.query(["a-0"], "a", [["TCP", 8080]]) == store.list(workload="a")
    assert store.query([], "nothing", [["TCP", 1]]) == []


def test_the_port_index_follows_the_spec_and_forgets_a_removed_pod(store: Store) -> None:
    pod = store.apply("web", web("web", ("TCP", 8080))).result["pod"]
    store.set_status("web", pod["uid"], {"phase": "Running"})     # a status keeps the claim
    assert names(store.query([], None, [["TCP", 8080]])) == ["web"]
    store.apply("web", web("web", ("TCP", 8081)))                  # a new spec moves it
    assert store.query([], None, [["TCP", 8080]]) == []
    assert store.claimed(1, 65535) == [("TCP", 8081)]
    gone = store.set_desired("web", "deleted").result
    store.remove("web", gone["uid"], gone["generation"])
    assert store.claimed(1, 65535) == [] and store.list(workload="web") == []


def test_claimed_lists_the_ports_of_a_range(store: Store) -> None:
    store.apply("a", web("a", ("TCP", 30000), ("UDP", 30000), ("TCP", 40000)))
    store.apply("b", web("b", ("TCP", 30000), ("TCP", 29999)))
    assert store.claimed(30000, 32767) == [("TCP", 30000), ("UDP", 30000)]


def test_find_answers_by_uid(store: Store) -> None:
    uid = store.apply("web", SPEC, uid="u-1").result["pod"]["uid"]
    assert store.find(uid)["name"] == "web"
    with pytest.raises(NotFound) as exc:
        store.find("u-2")
    assert exc.value.field == "uid"


def test_list_pages_by_name_and_filters_by_workload(store: Store) -> None:
    for name in ("e", "a", "d", "b", "c"):
        store.apply(name, web("odd" if name in "ace" else "even"))
    assert names(store.list(limit=2)) == ["a", "b"]
    assert names(store.list(after="b", limit=2)) == ["c", "d"]
    assert names(store.list(after="d", limit=2)) == ["e"]
    assert names(store.list(after="a", workload="odd")) == ["c", "e"]
    assert names(store.list()) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.list(limit=0), "args.limit"),
    (lambda s: s.list(limit=True), "args.limit"),
    (lambda s: s.list(limit=10**6), "args.limit"),
    (lambda s: s.list(after="Not A Name"), "args.after"),
    (lambda s: s.list(workload=5), "args.workload"),
    (lambda s: s.query("web"), "args.names"),
    (lambda s: s.query(["ok", "Bad"]), "args.names[1]"),
    (lambda s: s.query(["x"] * 5000), "args.names"),
    (lambda s: s.query([], "w", [["TCP", 0]]), "args.ports[0]"),
    (lambda s: s.query([], "w", [["TCP", 80], "TCP/80"]), "args.ports[1]"),
    (lambda s: s.query([], ["w"]), "args.workload"),
    (lambda s: s.claimed(0, 10), "args.low"),
    (lambda s: s.claimed(10, "20"), "args.high"),
    (lambda s: s.find(""), "args.uid"),
])
def test_bad_query_arguments_name_their_field(store: Store, call: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        call(store)
    assert exc.value.field == field


def test_a_schema_2_database_gains_its_indexes(tmp_path: Path) -> None:
    path = str(tmp_path / "riklet.db")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE pods (name TEXT PRIMARY KEY, uid TEXT NOT NULL, version INTEGER NOT NULL,
            desired TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, generation INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE requests (id TEXT PRIMARY KEY, op TEXT NOT NULL, result TEXT NOT NULL, at REAL NOT NULL);
        INSERT INTO meta VALUES ('seq', '7'), ('epoch', 'e1');
        PRAGMA user_version=2;""")
    db.execute("INSERT INTO pods VALUES ('web-0', 'u1', 3, 'running', ?, '{}', 1.0, 2.0, 4)",
               (json.dumps(web("web", ("TCP", 8080))),))
    db.execute("INSERT INTO pods VALUES ('odd', 'u2', 1, 'running', ?, '{}', 1.0, 2.0, 1)",
               (json.dumps({"workload": 5, "ports": "junk"}),))   # memory stores what it is given
    db.commit()
    db.close()
    s = Store(path)
    try:
        assert names(s.query([], "web", [])) == ["web-0"]
        assert names(s.query([], None, [["TCP", 8080]])) == ["web-0"]
        assert s.get("web-0")["generation"] == 4 and s.seq == 7 and s.epoch == "e1"
        assert names(s.query(["odd"], None, [])) == ["odd"]
        s.apply("web-0", web("web", ("TCP", 8081)))
        assert s.claimed(1, 65535) == [("TCP", 8081)]
    finally:
        s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()


def test_an_encoded_list_carries_the_stored_documents_as_text(store: Store) -> None:
    store.apply("web", web("shop", ("TCP", 8080)))
    [plain], [encoded] = store.list(), store.list(encoded=True)
    assert json.loads(encoded.pop("spec_json")) == plain.pop("spec")
    assert json.loads(encoded.pop("status_json")) == plain.pop("status")
    assert encoded.pop("workload") == "shop" and encoded == plain
    with pytest.raises(InvalidArgument) as exc:
        store.list(encoded="yes")
    assert exc.value.field == "args.encoded"


def test_stamps_page_like_list_and_names_pick_records(store: Store) -> None:
    for name in ("c", "a", "b"):
        store.apply(name, web("w" if name != "b" else "v"))
    uid = store.get("a")["uid"]
    store.set_status("a", uid, {"phase": "Running"})
    assert store.stamps() == [("a", uid, 2), ("b", store.get("b")["uid"], 1), ("c", store.get("c")["uid"], 1)]
    assert [s[0] for s in store.stamps(after="a", limit=1)] == ["b"]
    assert [s[0] for s in store.stamps(workload="w")] == ["a", "c"]
    assert names(store.list(names=["c", "a", "zz"])) == ["a", "c"]
    assert store.list(names=[]) == []
    with pytest.raises(InvalidArgument) as exc:
        store.list(names=["a", "B"])
    assert exc.value.field == "args.names[1]"


# -- pods.delete: a workload's pods, or every pod, wanted deleted in one transaction ---------

def test_delete_many_wants_a_workloads_pods_or_all_deleted_at_once(store: Store) -> None:
    store.apply_workload("web", [["web-0", _wl("web")], ["web-1", _wl("web")]])
    store.apply_workload("db", [["db-0", _wl("db")]])
    store.set_desired("web-1", "deleted")   # already going: not named again
    web = store.delete_many("web", request_id="r1")
    assert web.result == {"pods": ["web-0"]} and [ev.topic for ev in web.events] == ["pod.web-0.desired"]
    assert store.get("web-0")["generation"] == 2   # a fenced remove names this generation
    assert store.delete_many("web", request_id="r1").result == {"pods": ["web-0"]}   # a retry
    everything = store.delete_many()
    assert everything.result == {"pods": ["db-0"]}
    assert {p["name"]: p["desired"] for p in store.list()} == {
        "db-0": "deleted", "web-0": "deleted", "web-1": "deleted"}
    assert store.delete_many().events == ()


@pytest.mark.parametrize("workload", ["", "x" * 254, 7])
def test_delete_many_refuses_a_bad_workload_and_changes_nothing(store: Store, workload: object) -> None:
    store.apply_workload("web", [["web-0", _wl("web")]])
    seq = store.seq
    with pytest.raises(InvalidArgument) as exc:
        store.delete_many(workload)
    assert exc.value.field == "args.workload"
    assert store.seq == seq and store.get("web-0")["desired"] == "running"


# -- workload.apply: a workload's pods in one transaction ------------------------------------

def _wl(workload: str, image: str = "busybox") -> dict[str, Any]:
    return {"workload": workload, "containers": [{"name": "app", "image": image}]}


def test_a_workload_applies_its_pods_and_deletes_its_extra_replicas_at_once(store: Store) -> None:
    first = store.apply_workload("web", [["web-0", _wl("web")], ["web-1", _wl("web")], ["web-2", _wl("web")]])
    assert [r["pod"]["name"] for r in first.result["pods"]] == ["web-0", "web-1", "web-2"]
    assert all(r["changed"] for r in first.result["pods"])
    assert [ev.topic for ev in first.events] == [
        "pod.web-0.applied", "pod.web-1.applied", "pod.web-2.applied"]
    assert [ev.seq for ev in first.events] == [1, 2, 3]

    fewer = store.apply_workload("web", [["web-0", _wl("web", "nginx")]])
    [only] = fewer.result["pods"]
    assert only["changed"] and only["pod"]["spec"]["containers"][0]["image"] == "nginx"
    assert [ev.topic for ev in fewer.events] == [
        "pod.web-0.applied", "pod.web-1.desired", "pod.web-2.desired"]
    assert {p["name"]: p["desired"] for p in store.list()} == {
        "web-0": "running", "web-1": "deleted", "web-2": "deleted"}
    assert store.get("web-1")["generation"] == 2   # a fenced remove names this generation

    again = store.apply_workload("web", [["web-0", _wl("web", "nginx")]])
    assert again.events == () and again.result["pods"][0]["changed"] is False


def test_a_workload_apply_is_all_or_nothing(store: Store) -> None:
    store.apply_workload("db", [["db-0", _wl("db")]])
    store.apply("job", {"workload": "job", "instance_id": "i-1"})
    seq = store.seq
    with pytest.raises(Conflict) as exc:
        store.apply_workload("web", [["web-0", _wl("web")], ["db-0", _wl("web")]])
    assert (exc.value.message, exc.value.field) == ("pod db-0 belongs to workload db", "name")
    with pytest.raises(Conflict) as exc:
        store.apply_workload("job", [["job", _wl("job")]])
    assert exc.value.message == "pod job is instance i-1 of the RIK scheduler"
    assert store.seq == seq and [p["name"] for p in store.list()] == ["db-0", "job"]


def test_a_workload_shrink_leaves_the_schedulers_instances_and_pods_already_going(store: Store) -> None:
    store.apply("i-pod", {"workload": "web", "instance_id": "i-9"})
    store.apply_workload("web", [["web-0", _wl("web")], ["web-1", _wl("web")]])
    store.set_desired("web-1", "deleted")
    change = store.apply_workload("web", [["web-0", _wl("web")]])
    assert change.events == ()
    assert {p["name"]: p["desired"] for p in store.list()} == {
        "i-pod": "running", "web-0": "running", "web-1": "deleted"}


@pytest.mark.parametrize(("workload", "pods", "field"), [
    ("", [["a", _wl("")]], "args.workload"),
    ("web", [], "args.pods"),
    ("web", "web-0", "args.pods"),
    ("web", [["web-0"]], "args.pods[0]"),
    ("web", [["Web", _wl("web")]], "args.pods[0][0]"),
    ("web", [["web-0", ["not", "an", "object"]]], "args.pods[0][1]"),
    ("web", [["web-0", _wl("db")]], "args.pods[0]"),
    (7, [["web-0", _wl("web")]], "args.workload"),
])
def test_bad_workload_applies_name_their_field_and_change_nothing(
        store: Store, workload: Any, pods: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        store.apply_workload(workload, pods)
    assert exc.value.field == field
    assert store.seq == 0 and store.list() == []
