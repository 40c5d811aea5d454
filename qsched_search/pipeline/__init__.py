"""Pipelines: loading and families, the rollout of a schedule, the step hook, apply_schedule, coefficients."""
