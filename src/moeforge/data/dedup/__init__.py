"""Deduplication: exact (content hash) here; near-duplicates (MinHash, semantic) join in the next data issue."""
