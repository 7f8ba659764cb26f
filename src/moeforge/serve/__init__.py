"""Serving: the batched KV-cache generation engine (and, later, the OpenAI-compatible API)."""
