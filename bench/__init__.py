"""Aura's benchmark suite: one command, `python -m bench`, runs everything.

See docs/performance.md for what is measured, against which baselines, and the latest figures.
"""
