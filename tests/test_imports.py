"""The parts that processes touching only files or the study import must not pull in torch."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def test_results_storage_and_workers_import_without_torch():
    code = ("import qsched_search.results, qsched_search.search.storage, qsched_search.search.workers; "
            "import sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_results_contract_modules_import_without_torch():
    # Every module of qsched_search.results (the on-disk contract the report and tools read) and the menu.
    code = ("import pkgutil, importlib, sys, qsched_search.results as r; "
            "[importlib.import_module(m.name) for m in pkgutil.iter_modules(r.__path__, 'qsched_search.results.')]; "
            "import qsched_search.quant.levels; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
