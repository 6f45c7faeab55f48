"""The proxy's kernel data path: nftables rules, conntrack hygiene, endpoint health."""
