"""Files a run leaves beside its checkpoints (the manifest, importance scores, probe texts, replay
records), written so that a reader never sees half of one."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one ``os.replace``
    (atomic on POSIX and Windows), creating the folder if needed. Returns ``path``.

        >>> import os, tempfile
        >>> path = write_atomic(os.path.join(tempfile.mkdtemp(), "a", "b.json"), "{}")
        >>> open(path).read()
        '{}'
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
