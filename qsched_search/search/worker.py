"""One local search worker: `python -m qsched_search.search.worker SETTINGS.json` (see `start_local_workers`)."""

from __future__ import annotations

from pathlib import Path


def main(spec_path: str) -> int:
    """One local worker: the settings file `start_local_workers` wrote, run as a search of this process's share."""
    import json

    from qsched_search.errors import QschedError
    from qsched_search.logs import quiet_libraries
    from qsched_search.results.layout import ResultsDir
    from qsched_search.search.stage import SearchSettings, open_search_session, run_search
    from qsched_search.session import RunSettings

    quiet_libraries()
    spec = json.loads(Path(spec_path).read_text())
    run = spec["run"]
    run = RunSettings(**{**run, **{k: tuple(run[k]) for k in ("precisions", "prompts", "metrics")}})
    try:
        settings = SearchSettings(**spec["search"])
        session = open_search_session(run, settings.objective)
        try:
            result = run_search(session, settings, ResultsDir(spec["out"]), on_status=print)
        finally:
            session.close()
    except QschedError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved", flush=True)
        return 130
    print(f"worker done: {result.new_evaluations} new evaluations ({result.stopped_because})", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1]))
