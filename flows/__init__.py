"""Prefect flows and the `microscope` command line."""
