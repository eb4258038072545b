"""Prefect tasks: thin wrappers over `microscope.stages` adding cache keys, retries, progress, artifacts."""
