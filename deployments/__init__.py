"""Base-model families and the one generic Serve deployment that serves them."""

from deployments.loading import load_pipeline

__all__ = ["load_pipeline"]
