"""Sparse autoencoders: architectures, training (PyTorch Lightning), evaluation, SAELens-format files."""
