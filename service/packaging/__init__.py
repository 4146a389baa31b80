"""Packaging and serving: .mar archives, the TorchServe child process, versions, the gate, predictions."""
