"""`python -m qsched_search ...`: the `qsched` command (how `qsched search --workers K` starts its workers)."""

from qsched_search.cli.app import main

main()
