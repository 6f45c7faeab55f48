"""The RIK link: the worker side of RIK's gRPC protocol, and RIK instances as riklet pods."""
