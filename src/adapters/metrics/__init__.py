"""Prometheus metrics (prometheus-client)."""
