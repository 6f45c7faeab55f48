"""The kernel data path's nftables ruleset, computed from the routes with no I/O.

One table of riklet's own per agent (``ip riklet_<agent id>``), shaped like kube-proxy's
nftables proxier::

    chain prerouting  { type nat hook prerouting priority dstnat;  LOCAL jump services }
    chain output      { type nat hook output priority dstnat;      LOCAL jump services }
    chain services    { meta l4proto . th dport vmap { tcp . 8080 : jump svc_tcp_8080, ... } }
    chain svc_tcp_8080 { counter name "tcp_8080_new"
                         numgen random mod 2 vmap { 0 : jump ep_tcp_8080__A, 1 : jump ep_... } }
    chain ep_tcp_8080__10.88.0.5_80 { ip saddr 10.88.0.5 meta mark set meta mark | MASQ_MARK
                                      meta l4proto tcp dnat to 10.88.0.5:80 }
    chain postrouting { type nat hook postrouting priority srcnat;
                        ct status dnat ip saddr 127.0.0.0/8 oifname != "lo" masquerade
                        ct status dnat meta mark & MASQ_MARK == MASQ_MARK masquerade }
    chain guard       { type filter hook input priority filter;
                        iifname != "lo" ip daddr 127.0.0.0/8 ct status ! dnat drop
                        LOCAL meta l4proto tcp th dport 8081 ct status ! dnat reject with tcp reset }
    chain count_in    { type filter hook prerouting priority filter;
                        ct status dnat meta l4proto tcp
                        ct original proto-dst vmap { 8080 : jump cnt_tcp_8080 } }
    chain count_out   { type filter hook output priority filter; oifname != "lo" (the same) }
    chain cnt_tcp_8080 { ct direction original counter name "tcp_8080_in"
                         ct direction reply counter name "tcp_8080_out" }

``LOCAL`` is ``fib daddr type local`` (any address of this node), or ``ip daddr BIND`` when the
proxy's bind address is not 0.0.0.0. A port whose endpoints are all unready is rejected (TCP
reset, ICMP port unreachable for UDP and SCTP) in ``guard``: a reject is not allowed in a nat
chain. Counting happens once per packet: in prerouting for whatever is received (loopback
included) and in output for what leaves by another interface. NAT chains only see a flow's
first packet; its NAT decision then lives in conntrack, so rewriting these chains never moves
an established flow.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.proxy.routes import Endpoint, RouteKey

FAMILY = "ip"
MASQ_MARK = 0x10000          # set on hairpin packets (a pod reaching itself via a host port)
_PRIO_DSTNAT, _PRIO_FILTER, _PRIO_SRCNAT = -100, 0, 100

Expr = dict[str, Any]
Rule = tuple[Expr, ...]


@dataclass(frozen=True)
class Hook:
    type: str          # nat | filter
    hook: str          # prerouting | output | postrouting | input
    prio: int


@dataclass(frozen=True)
class Chain:
    rules: tuple[Rule, ...] = ()
    hook: Hook | None = None      # a base chain (attached to a netfilter hook)


@dataclass(frozen=True)
class Ruleset:
    """The whole desired content of one table."""

    table: str
    chains: Mapping[str, Chain] = field(default_factory=dict)
    counters: frozenset[str] = frozenset()


def table_name(agent_id: str) -> str:
    return f"riklet_{agent_id}"


def kernel_endpoint(ep: Endpoint) -> bool:
    """Whether the kernel path can carry traffic to ``ep``: an IPv4 table DNATs to IPv4 only."""
    return ":" not in ep.address


def proto_name(protocol: str) -> str:
    return protocol.lower()


def svc_chain(key: RouteKey) -> str:
    return f"svc_{proto_name(key[0])}_{key[1]}"


def ep_chain(key: RouteKey, ep: Endpoint) -> str:
    return f"ep_{proto_name(key[0])}_{key[1]}__{ep.address}_{ep.port}"


def cnt_chain(key: RouteKey) -> str:
    return f"cnt_{proto_name(key[0])}_{key[1]}"


def counter_names(key: RouteKey) -> tuple[str, str]:
    """The named counters of a host port: (arriving from clients, returning to them)."""
    base = f"{proto_name(key[0])}_{key[1]}"
    return f"{base}_in", f"{base}_out"


def flows_counter(key: RouteKey) -> str:
    """The named counter of a host port's new flows (connections; UDP flows): a NAT chain sees
    only a flow's first packet."""
    return f"{proto_name(key[0])}_{key[1]}_new"


# --- expressions (libnftables JSON) ------------------------------------------------------------

def _match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def _payload(protocol: str, fld: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": fld}}


def _jump(chain: str) -> Expr:
    return {"jump": {"target": chain}}


def _not_dnat() -> Expr:
    return _match({"&": [{"ct": {"key": "status"}}, "dnat"]}, 0)


def _is_dnat() -> Expr:
    return _match({"ct": {"key": "status"}}, "dnat", "in")


def _local(bind: str) -> Expr:
    if bind in ("0.0.0.0", "") or ":" in bind:     # an IPv6 bind address: this table is IPv4's
        return _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    return _match(_payload("ip", "daddr"), bind)


def _loopback_net() -> Expr:
    return {"prefix": {"addr": "127.0.0.0", "len": 8}}


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


# --- chains ------------------------------------------------------------------------------------

def _services(ready: Mapping[RouteKey, tuple[Endpoint, ...]]) -> Chain:
    entries = [[{"concat": [proto_name(k[0]), k[1]]}, _jump(svc_chain(k))]
               for k in sorted(ready) if ready[k]]
    if not entries:
        return Chain()
    key = {"concat": [_meta("l4proto"), _payload("th", "dport")]}
    return Chain(rules=(({"vmap": {"key": key, "data": {"set": entries}}},),))


def _service(key: RouteKey, endpoints: tuple[Endpoint, ...]) -> Chain:
    count = {"counter": flows_counter(key)}
    if len(endpoints) == 1:
        return Chain(rules=((count, _jump(ep_chain(key, endpoints[0]))),))
    # Random, not round robin: the kernel keeps no turn; over many flows it spreads evenly.
    entries = [[i, _jump(ep_chain(key, ep))] for i, ep in enumerate(endpoints)]
    gen = {"numgen": {"mode": "random", "mod": len(endpoints), "offset": 0}}
    return Chain(rules=((count, {"vmap": {"key": gen, "data": {"set": entries}}}),))


def _endpoint(key: RouteKey, ep: Endpoint) -> Chain:
    rules: list[Rule] = []
    if not _is_loopback(ep.address):
        # A pod reaching itself through a host port: the reply must come back through here.
        mark = {"|": [_meta("mark"), MASQ_MARK]}
        rules.append((_match(_payload("ip", "saddr"), ep.address),
                      {"mangle": {"key": _meta("mark"), "value": mark}}))
    rules.append((_match(_meta("l4proto"), proto_name(key[0])),
                  {"dnat": {"addr": ep.address, "port": ep.port}}))
    return Chain(rules=tuple(rules))


def _postrouting() -> Chain:
    # A node-local client (source 127.x) sent to an endpoint off loopback: its source must be
    # an address the endpoint can answer.
    localhost = (_is_dnat(), _match(_payload("ip", "saddr"), _loopback_net()),
                 _match(_meta("oifname"), "lo", "!="), {"masquerade": None})
    hairpin = (_is_dnat(), _match({"&": [_meta("mark"), MASQ_MARK]}, MASQ_MARK), {"masquerade": None})
    return Chain(rules=(localhost, hairpin), hook=Hook("nat", "postrouting", _PRIO_SRCNAT))


def _guard(routes: Mapping[RouteKey, tuple[Endpoint, ...]], bind: str) -> Chain:
    # route_localnet lets 127.0.0.0/8 be routed; only DNAT'ed traffic may use that (as kube-proxy
    # guards it): anything else from outside addressed to loopback is dropped.
    rules: list[Rule] = [(_match(_meta("iifname"), "lo", "!="),
                          _match(_payload("ip", "daddr"), _loopback_net()), _not_dnat(), {"drop": None})]
    for key in sorted(k for k, eps in routes.items() if not eps):
        reject = {"reject": {"type": "tcp reset"}} if key[0] == "TCP" else {"reject": None}
        rules.append((_local(bind), _match(_meta("l4proto"), proto_name(key[0])),
                      _match(_payload("th", "dport"), key[1]), _not_dnat(), reject))
    return Chain(rules=tuple(rules), hook=Hook("filter", "input", _PRIO_FILTER))


def _count(routes: Mapping[RouteKey, tuple[Endpoint, ...]], hook: str) -> Chain:
    rules: list[Rule] = []
    for proto in sorted({k[0] for k in routes}):
        entries = [[port, _jump(cnt_chain((p, port)))] for p, port in sorted(routes) if p == proto]
        head: list[Expr] = [_match(_meta("oifname"), "lo", "!=")] if hook == "output" else []
        rules.append((*head, _is_dnat(), _match(_meta("l4proto"), proto_name(proto)),
                      {"vmap": {"key": {"ct": {"key": "proto-dst", "dir": "original"}},
                                "data": {"set": entries}}}))
    return Chain(rules=tuple(rules), hook=Hook("filter", hook, _PRIO_FILTER))


def _counting(key: RouteKey) -> Chain:
    inbound, outbound = counter_names(key)
    return Chain(rules=((_match({"ct": {"key": "direction"}}, "original"), {"counter": inbound}),
                        (_match({"ct": {"key": "direction"}}, "reply"), {"counter": outbound})))


def build(table: str, routes: Mapping[RouteKey, tuple[Endpoint, ...]], bind: str = "0.0.0.0") -> Ruleset:
    """The table for ``routes`` (each host port's *ready* endpoints; empty: refuse the port).
    Endpoints the kernel path cannot carry (IPv6) are left out by the caller."""
    chains: dict[str, Chain] = {
        "prerouting": Chain(rules=((_local(bind), _jump("services")),),
                            hook=Hook("nat", "prerouting", _PRIO_DSTNAT)),
        "output": Chain(rules=((_local(bind), _jump("services")),), hook=Hook("nat", "output", _PRIO_DSTNAT)),
        "services": _services(routes),
        "postrouting": _postrouting(),
        "guard": _guard(routes, bind),
        "count_in": _count(routes, "prerouting"),
        "count_out": _count(routes, "output"),
    }
    counters: set[str] = set()
    for key, endpoints in routes.items():
        chains[cnt_chain(key)] = _counting(key)
        counters.update((*counter_names(key), flows_counter(key)))
        if endpoints:
            chains[svc_chain(key)] = _service(key, endpoints)
            for ep in endpoints:
                chains[ep_chain(key, ep)] = _endpoint(key, ep)
    return Ruleset(table=table, chains=chains, counters=frozenset(counters))


# --- the transaction ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Present:
    """What the kernel holds of the table now (from ``nft -j list table``)."""

    chains: frozenset[str] = frozenset()
    counters: frozenset[str] = frozenset()


def _chain_obj(table: str, name: str, chain: Chain) -> Expr:
    obj: Expr = {"family": FAMILY, "table": table, "name": name}
    if chain.hook is not None:
        obj.update(type=chain.hook.type, hook=chain.hook.hook, prio=chain.hook.prio, policy="accept")
    return obj


def commands(desired: Ruleset, present: Present | None, applied: Ruleset | None = None) -> list[Expr]:
    """One nft transaction taking the table from ``present`` (None: absent) to ``desired``.

    Never flushes or deletes the table: chains whose rules changed since ``applied`` (all of
    them when ``applied`` is None, as on start) are flushed and refilled, new ones added, stale
    ones flushed then deleted, all in one batch, which the kernel applies atomically."""
    table = desired.table
    cmds: list[Expr] = [{"add": {"table": {"family": FAMILY, "name": table}}}]
    have = present.chains if present is not None else frozenset()
    stale = sorted(have - desired.chains.keys())
    changed = sorted(name for name, chain in desired.chains.items() if name in have and
                     (applied is None or applied.chains.get(name) != chain))
    for name in stale + changed:
        cmds.append({"flush": {"chain": {"family": FAMILY, "table": table, "name": name}}})
    for name in sorted(desired.chains.keys() - have):
        cmds.append({"add": {"chain": _chain_obj(table, name, desired.chains[name])}})
    old_counters = present.counters if present is not None else frozenset()
    for name in sorted(desired.counters - old_counters):
        cmds.append({"add": {"counter": {"family": FAMILY, "table": table, "name": name}}})
    for name in sorted(set(changed) | (desired.chains.keys() - have)):
        for rule in desired.chains[name].rules:
            cmds.append({"add": {"rule": {"family": FAMILY, "table": table, "chain": name,
                                          "expr": list(rule)}}})
    for name in stale:
        cmds.append({"delete": {"chain": {"family": FAMILY, "table": table, "name": name}}})
    for name in sorted(old_counters - desired.counters):
        cmds.append({"delete": {"counter": {"family": FAMILY, "table": table, "name": name}}})
    return cmds


def delete_table(table: str) -> list[Expr]:
    return [{"delete": {"table": {"family": FAMILY, "name": table}}}]
