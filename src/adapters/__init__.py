"""Adapters: one folder per technology, each implementing domain ports."""
