"""Deployment side of Microscope: prefect.yaml, Kubernetes work-pool templates, the webhook receiver."""
