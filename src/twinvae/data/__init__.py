"""Data: readers for real image sets, chamber splits, set names and the synthetic generator."""
