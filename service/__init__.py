"""tuneserve: fine-tune pretrained vision models over gRPC and serve them with TorchServe."""

__version__ = "0.1.0"
