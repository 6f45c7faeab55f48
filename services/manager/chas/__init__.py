"""The CHaS link: the node's HTTP API from the CHaS specification (api.py), its connection
limits (conn.py), the registration and health reports to the CHaS API server (client.py) and the
counters both keep (stats.py)."""
