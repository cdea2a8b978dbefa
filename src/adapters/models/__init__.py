"""Adapters of the `ChatModel` port: the language models Aura can talk to."""
