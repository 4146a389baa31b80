"""The `tuneserve` command line: a thin gRPC client (plus `serve`, which runs the service itself)."""
