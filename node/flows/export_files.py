"""The NDJSON files of an export that receives its lines in mixed types (an export from other
members): ``<type>-<n>.ndjson``, :data:`LINES_PER_FILE` lines a file, and where they stand, so
that an export interrupted after a checkpoint goes on from it with no line written twice or
lost (:meth:`TypeFiles.standing`, and ``standing=`` to resume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

LINES_PER_FILE = 250_000


class TypeFiles:
    """The files of one export folder; ``output``: the manifest's items of those closed."""

    def __init__(self, folder: Path, url: str, standing: dict[str, Any] | None = None) -> None:
        self.folder, self.url = folder, url
        self.open: dict[str, tuple[BinaryIO, int, int]] = {}  # type: (file, n, lines)
        self.output: list[dict[str, Any]] = []
        if standing is not None:
            self._resume(standing)

    def write(self, resource_type: str, line: bytes) -> None:
        handle, number, count = self.open.get(resource_type) or (None, 0, 0)
        if handle is None or count == LINES_PER_FILE:
            if handle is not None:
                self._done(resource_type, handle, number, count)
            number, count = number + 1, 0
            handle = self._path(resource_type, number).open("wb")
        handle.write(line + b"\n")
        self.open[resource_type] = (handle, number, count + 1)

    def standing(self) -> dict[str, Any]:
        """Where the files stand, every line written so far on disk (fsync'd): what
        ``TypeFiles(folder, url, standing)`` resumes from."""
        current = {}
        for resource_type, (handle, number, count) in sorted(self.open.items()):
            handle.flush()
            os.fsync(handle.fileno())
            current[resource_type] = [number, count, handle.tell()]
        return {"output": list(self.output), "open": current}

    def close(self) -> None:
        for resource_type, (handle, number, count) in sorted(self.open.items()):
            self._done(resource_type, handle, number, count)
        self.open.clear()

    def _resume(self, standing: dict[str, Any]) -> None:
        """Reopen the files as they stood: what was written after is cut off (a file begun
        after it is written anew when its first line comes again)."""
        self.output = list(standing["output"])
        for resource_type, (number, count, size) in standing["open"].items():
            handle = self._path(resource_type, number).open("r+b")
            handle.truncate(size)
            handle.seek(size)
            self.open[resource_type] = (handle, number, count)

    def _done(self, resource_type: str, handle: BinaryIO, number: int, count: int) -> None:
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        name = self._path(resource_type, number).name
        self.output.append({"type": resource_type, "url": f"{self.url}/{name}", "count": count})

    def _path(self, resource_type: str, number: int) -> Path:
        return self.folder / f"{resource_type}-{number}.ndjson"
