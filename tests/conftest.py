"""Shared fixtures: tiny random-weight pipelines built in code, and the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import build_tiny_sd_pipeline

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """The tiny pipeline saved with save_pretrained: loaded through the same code path as a hub model."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline().save_pretrained(folder)
    return folder
