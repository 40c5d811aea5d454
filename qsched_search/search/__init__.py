"""Probe, warm-start priors, samplers, storage and workers (importable without torch), the study, the stage."""
