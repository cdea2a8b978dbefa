"""The offline model: deterministic, no network, drives real runs for demos and tests."""

from adapters.offline.model import OfflineChatModel, parse_directives

__all__ = ["OfflineChatModel", "parse_directives"]
