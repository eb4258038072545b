"""Microscope SDK: Prefect-free compute and I/O for auditing checkpoints."""

__version__ = "0.1.0"
