"""The gRPC layer: server, servicers (translation only), interceptors (errors, auth)."""
