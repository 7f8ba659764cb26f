"""Training: the trainer loop and its building blocks (metrics, collapse detection, ghost experts, resource guard)."""
