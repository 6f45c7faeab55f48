"""Runtime Memory: the single owner of pod state (SQLite), served over ZeroMQ IPC."""
