"""The baseline servers the benchmark runs next to Aura (peer and framework floor)."""
