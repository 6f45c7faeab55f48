"""The containerd runtime driver: pods as containerd tasks (client.py speaks containerd's gRPC
API), their CNI networks, OCI specs, and the log driver containerd's shim runs per task."""
