"""The package version, read by pyproject and `qsched --version`."""

__version__ = "0.1.0"
