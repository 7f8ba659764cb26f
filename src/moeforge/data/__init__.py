"""The data pipeline: sources → records (the dataset contract) → cleaned, deduplicated, split shards."""
