"""Aura's domain: runs, plans, approvals, events, the agent loop and the ports they need.

Pure Python (standard library and pure-data libraries only). Import-linter forbids any import of
adapters, the composition root, web frameworks, Redis clients or JWT libraries from here.
"""
