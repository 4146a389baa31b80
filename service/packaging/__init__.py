"""The serving backend (backend.py, chosen in choose_backend.py) and TorchServe, its implementation."""
