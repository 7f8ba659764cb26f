"""Tokens: the tokenizer (special, identity and PII tokens, ChatML template); packing and shards follow."""
