"""The on-disk contract, importable without torch: file names and columns, schedules, fronts and picks, provenance.

Probe, search, calibrate and report read and write results only through this package, so that the rules (which
schedule is on the front, which uniform schedule is the baseline, which way a metric points) exist once.
"""
