"""Where the package's own data lives (menu, families, schema, embedded models), found through the installed package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# importlib.resources answers for an editable install and a wheel alike; the package is always unpacked on disk
# (setuptools installs it as plain files), so a Path is safe to hand to diffusers and yaml.
PACKAGE_DIR = Path(str(resources.files("qsched_search")))
# The repository's configs/ is a link to this folder: one copy, edited in the repository, shipped in the wheel.
CONFIG_DIR = PACKAGE_DIR / "configs"
FAMILY_DIR = CONFIG_DIR / "families"
DEFAULT_MENU = CONFIG_DIR / "precisions.yaml"
SCHEMA_DIR = PACKAGE_DIR / "schemas"
SCHEDULE_SCHEMA = SCHEMA_DIR / "schedule.schema.json"
EMBEDDED_MODEL_DIR = PACKAGE_DIR / "models" / "fmnist-lcm"
EMBEDDED_JUDGE_DIR = PACKAGE_DIR / "models" / "fmnist-judge"
REPORT_CSS = PACKAGE_DIR / "report" / "report.css"
