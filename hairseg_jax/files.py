"""Files written whole or not at all (standard library only, importable from anywhere)."""

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it to ``path``: a
    reader, or a crash, never sees a partial file. The file gets the permissions of any new
    file (0666 less the umask), not ``tempfile``'s owner-only 0600."""
    path = Path(path)
    # Its name's start, so that any name a folder allows (255 bytes) leaves room for the rest.
    start = os.fsencode(path.name)[:200].decode(errors="ignore")
    temporary = path.parent / f".{start}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _naming(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException as e:
        os.unlink(temporary)
        if isinstance(e, OSError):
            raise _naming(e, path) from e
        raise


def _naming(error: OSError, path: Path) -> OSError:
    """A new ``error`` (e.g. a full disk's, which names no file, or one naming the temporary
    file) that names ``path``, of the same kind where it has an error number."""
    if error.errno is None:
        return OSError(f"{error}: {str(path)!r}")
    return OSError(error.errno, error.strerror, str(path))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically (``write_atomically``)."""
    write_atomically(path, json.dumps(data, indent=2) + "\n")
