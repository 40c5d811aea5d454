"""Atomic file writes: every result file appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator


# A temporary file is named .NAME.HOST-PID.RANDOM.tmp, so that a later run can tell one left by a killed process
# (remove_stale_temporaries) from one that a live process is still writing.
_HOST = socket.gethostname().replace(".", "_")
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:  # name the file being written, not its temporary twin (which is removed below)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes, anywhere under `folder`, the temporary files of atomic writes whose process on this host is gone
    (what a SIGKILL in mid-write leaves); another host's or a live process's are kept. Returns the removed paths."""
    removed = []
    for tmp in Path(folder).rglob(".*.tmp"):
        match = _TEMPORARY.match(tmp.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_writable(folder: str | Path, option: str = "--out") -> None:
    """Makes `folder` and checks that a file can be created in it, before any work is done; clears the temporary
    files a killed run left there.

    Args:
        folder (`str` or `Path`): the output folder.
        option (`str`, defaults to `"--out"`): the option that named it, for the message.

    Raises:
        `QschedError`: one line naming the folder, the reason and the fix.
    """
    from qsched_search.errors import QschedError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
        remove_stale_temporaries(folder)
    except OSError as exc:
        raise QschedError(f"{option} {str(folder)!r} is not a writable folder ({exc.strerror or type(exc).__name__}); "
                          "pass a folder you can write to") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: str | Path, frame) -> None:
    """Writes a pandas DataFrame without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_figure(path: str | Path, figure, **kwargs) -> None:
    """Saves a matplotlib figure; the format follows the suffix of `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
