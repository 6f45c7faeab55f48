"""The Node API: the gRPC service `rikletctl` talks to, and the stream budget that keeps watches
and log follows from taking the workers unary calls need."""
