"""Evaluation: routing analysis (expert × domain affinity), plots, and the experiments."""
