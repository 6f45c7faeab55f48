"""``riklet-notify``: tells systemd how the agent is (Type=notify, STATUS=, the watchdog)."""
