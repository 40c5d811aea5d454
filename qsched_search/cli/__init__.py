"""The `qsched` command line: one module per command, joined in `app.py`."""

import sys

from qsched_search.logs import quiet_libraries

# Before any command module imports torch, diffusers or torchao: their import-time notices are library chatter on a
# plain run (`--verbose` shows them).
quiet_libraries(verbose="--verbose" in sys.argv[1:] or "-v" in sys.argv[1:])
