"""`molmocap serve`: a local HTTP API (Molmo-style caption/ask routes and OpenAI chat completions) on one model."""

from .app import create_app

__all__ = ["create_app"]
