"""Serving the trained ALM (OpenAI-compatible, Ray Serve)."""
