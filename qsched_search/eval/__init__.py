"""Metrics by name and the scoring of a schedule against the all-reference run."""
