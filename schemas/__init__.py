"""Contracts shared by every layer: configs, result records, Parquet schemas.

Nothing here imports torch or Prefect; `microscope`, `tasks`, `flows` and the viewer all read these.
"""
