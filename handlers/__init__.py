"""Code that runs inside TorchServe's Python workers (and, for the promotion gate, in the service)."""
