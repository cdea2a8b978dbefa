"""The domain model: entities, value objects, events, errors and the ports — the rules, no asyncio."""
