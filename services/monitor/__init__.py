"""riklet-monitor: node and pod metrics over IPC and Prometheus."""
