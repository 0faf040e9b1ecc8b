"""Posterior queries and differential expression over a trained module and its data."""
