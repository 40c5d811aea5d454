"""`qsched search --workers K`: starts K local worker processes on one study, then returns its storage URL."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from qsched_search.cli._common import console
from qsched_search.distributed import last_line, run_workers, worker_argv
from qsched_search.errors import QschedError
from qsched_search.paths import ResultsDir

WORKER_COMMAND = [sys.executable, "-m", "qsched_search", "search"]


def start_local_workers(ctx, workers: int, results: ResultsDir, storage: str | None, probe: str | None) -> str:
    """Runs this `qsched search` command in `workers` processes sharing one study and waits for them.

    Each worker writes its own files to `OUT/workers/N/` (log.txt included) and no images; the caller then writes
    the results of the whole study to OUT.

    Args:
        ctx (`typer.Context`): the command's context (its parsed options become the workers' command line).
        workers (`int`): how many processes.
        results (`ResultsDir`): the command's output folder.
        storage (`str`, *optional*): the study's database URL; `sqlite:///OUT/study.db` if None.
        probe (`str`, *optional*): the probe table; `OUT/probe.csv` if None.

    Returns:
        `str`: the storage URL, for the final, evaluation-free pass over the study.
    """
    from qsched_search.search import open_storage, sqlite_url

    url = storage or sqlite_url(results.study_db)
    open_storage(url)  # the tables are made once, here, and a bad URL fails here rather than in K workers
    options = {p.name: max(p.opts, key=len) for p in ctx.command.params if p.opts and p.opts[0].startswith("-")}
    probe = probe or (str(results.probe_csv) if results.probe_csv.is_file() else None)
    folders = [results.root / "workers" / str(k) for k in range(workers)]
    # The workers measure; coefficients, if asked for, are calibrated once, by this process, on the whole study.
    argvs = [worker_argv(ctx.params, options, {"workers": None, "out": str(folder), "storage": url, "images": 0,
                                               "probe_table": probe, "with_coefficients": None}) for folder in folders]
    logs = [folder / "log.txt" for folder in folders]
    with Progress(TextColumn("[bold]search[/] {task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(f"{workers} workers on {url.split('@')[-1]}", total=None)

        def on_poll(codes):
            running = sum(c is None for c in codes)
            progress.update(task, description=f"{running} of {workers} workers running (logs: {results.root}/workers/*/log.txt)")

        codes = run_workers(WORKER_COMMAND, argvs, logs, on_poll=on_poll)
    failed = [(k, c) for k, c in enumerate(codes) if c != 0]
    for k, code in failed:
        console.print(f"worker {k} exited with code {code}: {last_line(logs[k]) or 'no output'} ({logs[k]})", highlight=False)
    if len(failed) == workers:
        reason = last_line(logs[failed[0][0]]).removeprefix("error:").strip()
        raise QschedError(f"all {workers} workers failed ({reason or f'exit code {failed[0][1]}'}); see {Path(logs[0]).parent.parent}/*/log.txt")
    return url
