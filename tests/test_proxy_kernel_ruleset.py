"""The kernel data path's ruleset builder and transaction, with no kernel: pure functions."""

from __future__ import annotations

import json
from typing import Any

from services.proxy.kernel import ruleset
from services.proxy.kernel.conntrack import Stale, _deleted, _key
from services.proxy.kernel.forwarder import _parse_ep_chain, _ready_in, _stale
from services.proxy.routes import Endpoint

E = Endpoint
T = "riklet_0123abcd"


def text(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def test_a_port_with_two_endpoints_balances_at_random_to_two_dnat_chains() -> None:
    rs = ruleset.build(T, {("TCP", 8080): (E("127.0.0.1", 9000), E("127.0.0.1", 9001))})
    svc = rs.chains["svc_tcp_8080"].rules
    assert len(svc) == 1
    assert svc[0][0] == {"counter": "tcp_8080_new"}
    vmap = svc[0][1]["vmap"]
    assert vmap["key"] == {"numgen": {"mode": "random", "mod": 2, "offset": 0}}
    assert [e[1]["jump"]["target"] for e in vmap["data"]["set"]] == [
        "ep_tcp_8080__127.0.0.1_9000", "ep_tcp_8080__127.0.0.1_9001"]
    ep = rs.chains["ep_tcp_8080__127.0.0.1_9000"].rules
    assert ep[-1][-1] == {"dnat": {"addr": "127.0.0.1", "port": 9000}}
    assert "mangle" not in text(ep)        # a loopback endpoint is no hairpin
    services = text(rs.chains["services"].rules)
    assert '"tcp", 8080' in services and "svc_tcp_8080" in services


def test_entry_is_prerouting_and_output_for_local_addresses_or_the_bind_address() -> None:
    routes = {("UDP", 53): (E("10.88.0.2", 53),)}
    anywhere = ruleset.build(T, routes)
    for name, hook in (("prerouting", "prerouting"), ("output", "output")):
        chain = anywhere.chains[name]
        assert chain.hook == ruleset.Hook("nat", hook, -100)
        assert '"fib"' in text(chain.rules) and '"local"' in text(chain.rules)
    bound = ruleset.build(T, routes, bind="192.0.2.7")
    assert "192.0.2.7" in text(bound.chains["prerouting"].rules)
    assert '"fib"' not in text(bound.chains["prerouting"].rules)


def test_a_pod_endpoint_is_masqueraded_when_it_reaches_itself_and_localhost_clients_are() -> None:
    rs = ruleset.build(T, {("TCP", 80): (E("10.88.0.5", 8080),)})
    ep = rs.chains["ep_tcp_80__10.88.0.5_8080"].rules
    assert '"saddr"' in text(ep[0]) and "10.88.0.5" in text(ep[0]) and "mangle" in text(ep[0])
    post = rs.chains["postrouting"]
    assert post.hook == ruleset.Hook("nat", "postrouting", 100)
    assert text(post.rules).count("masquerade") == 2 and "127.0.0.0" in text(post.rules)


def test_a_port_with_no_ready_endpoint_is_rejected_and_not_dnated() -> None:
    rs = ruleset.build(T, {("TCP", 81): (), ("UDP", 82): (), ("TCP", 83): (E("127.0.0.1", 1),)})
    assert "svc_tcp_81" not in rs.chains and "svc_udp_82" not in rs.chains
    services = text(rs.chains["services"].rules)
    assert "81" not in services.replace("8083", "") and "svc_tcp_83" in services
    guard = rs.chains["guard"]
    assert guard.hook == ruleset.Hook("filter", "input", 0)
    rules = {text(r) for r in guard.rules}
    tcp = next(r for r in rules if "81" in r and '"tcp"' in r)
    udp = next(r for r in rules if "82" in r and '"udp"' in r)
    assert '"tcp reset"' in tcp and '"reject": null' in udp
    # Route_localnet's hole is closed: 127/8 from outside that was not DNAT'ed is dropped.
    assert any('"drop"' in r and "127.0.0.0" in r for r in rules)


def test_every_port_has_in_and_out_counters_counted_once_per_packet() -> None:
    rs = ruleset.build(T, {("TCP", 80): (E("127.0.0.1", 1),), ("UDP", 80): ()})
    assert rs.counters == {"tcp_80_in", "tcp_80_out", "tcp_80_new", "udp_80_in", "udp_80_out", "udp_80_new"}
    assert '"counter": "tcp_80_new"' in text(rs.chains["svc_tcp_80"].rules)
    cnt = text(rs.chains["cnt_tcp_80"].rules)
    assert '"counter": "tcp_80_in"' in cnt and '"counter": "tcp_80_out"' in cnt
    assert rs.chains["count_in"].hook == ruleset.Hook("filter", "prerouting", 0)
    out = rs.chains["count_out"]
    assert out.hook == ruleset.Hook("filter", "output", 0) and '"lo"' in text(out.rules)


def test_first_transaction_creates_everything_and_never_deletes_or_flushes_the_table() -> None:
    rs = ruleset.build(T, {("TCP", 80): (E("127.0.0.1", 1),)})
    cmds = ruleset.commands(rs, None)
    assert cmds[0] == {"add": {"table": {"family": "ip", "name": T}}}
    verbs = [next(iter(c)) for c in cmds]
    assert "delete" not in verbs and "flush" not in verbs
    added = {c["add"]["chain"]["name"] for c in cmds if "chain" in c.get("add", {})}
    assert added == set(rs.chains)
    assert all(c["add"]["rule"]["chain"] in rs.chains for c in cmds if "rule" in c.get("add", {}))


def test_a_later_transaction_touches_only_the_changed_chains() -> None:
    before = ruleset.build(T, {("TCP", 80): (E("127.0.0.1", 1),), ("TCP", 81): (E("127.0.0.1", 2),)})
    after = ruleset.build(T, {("TCP", 80): (E("127.0.0.1", 1),), ("TCP", 81): (E("127.0.0.1", 3),)})
    present = ruleset.Present(frozenset(before.chains), before.counters)
    cmds = ruleset.commands(after, present, before)
    flushed = {c["flush"]["chain"]["name"] for c in cmds if "flush" in c}
    deleted = {c["delete"]["chain"]["name"] for c in cmds if "chain" in c.get("delete", {})}
    added = {c["add"]["chain"]["name"] for c in cmds if "chain" in c.get("add", {})}
    assert flushed == {"svc_tcp_81", "ep_tcp_81__127.0.0.1_2"}
    assert deleted == {"ep_tcp_81__127.0.0.1_2"}
    assert added == {"ep_tcp_81__127.0.0.1_3"}
    # Flushes come before deletes (a chain still jumped to cannot be deleted).
    verbs = [next(iter(c)) for c in cmds]
    last_flush = max(i for i, v in enumerate(verbs) if v == "flush")
    assert last_flush < min(i for i, v in enumerate(verbs) if v == "delete")
    assert not any("table" in c.get("delete", {}) or "table" in c.get("flush", {}) for c in cmds)


def test_reconcile_with_an_unknown_past_rewrites_every_kept_chain_and_drops_the_stale() -> None:
    old = ruleset.build(T, {("UDP", 53): (E("127.0.0.1", 5353),)})
    new = ruleset.build(T, {("TCP", 80): (E("127.0.0.1", 1),)})
    cmds = ruleset.commands(new, ruleset.Present(frozenset(old.chains), old.counters), None)
    flushed = {c["flush"]["chain"]["name"] for c in cmds if "flush" in c}
    assert flushed == set(old.chains)       # kept chains refilled, stale ones emptied first
    deleted_counters = {c["delete"]["counter"]["name"] for c in cmds if "counter" in c.get("delete", {})}
    assert deleted_counters == {"udp_53_in", "udp_53_out", "udp_53_new"}


def test_endpoint_chain_names_parse_back() -> None:
    key, ep = ("UDP", 5353), E("10.88.0.12", 53)
    assert _parse_ep_chain(ruleset.ep_chain(key, ep)) == (key, ep)
    assert _parse_ep_chain("svc_udp_53") is None and _parse_ep_chain("ep_x__y_z") is None
    rs = ruleset.build(T, {key: (ep, E("127.0.0.1", 7))})
    assert _ready_in(ruleset.Present(frozenset(rs.chains))) == {key: (ep, E("127.0.0.1", 7))}


def test_stale_conntrack_entries_udp_at_once_tcp_when_the_endpoint_left_the_routes() -> None:
    a, b = E("127.0.0.1", 1), E("127.0.0.1", 2)
    old = {("UDP", 53): (a, b), ("TCP", 80): (a, b), ("TCP", 81): (a,)}
    new = {("UDP", 53): (b,), ("TCP", 80): (b,)}
    routes = {("UDP", 53): (a, b), ("TCP", 80): (a, b)}       # a: unhealthy, still routed
    assert _stale(old, new, routes) == ([Stale(("UDP", 53), a)], [Stale(("TCP", 81), a)])


def test_conntrack_output_parsing() -> None:
    line = ("udp      17 29 src=127.0.0.1 dst=127.0.0.1 sport=40000 dport=8053 src=127.0.0.1 "
            "dst=127.0.0.1 sport=9053 dport=40000 mark=0 use=1")
    assert _key(line) == ("UDP", 8053)
    assert _key("") is None
    assert _deleted("conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n") == 3
