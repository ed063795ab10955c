"""Dataset files wherever they are: a local folder, or a URI that ``pyarrow.fs`` understands
(``s3://bucket/cityscapes``, ``gs://...``, ``file:///mnt/shared``), so that a preparation task
reads the raw dataset on whichever node it runs.

``as_path(root)`` is a ``pathlib.Path`` for a plain path and a ``StoragePath`` (the few
``Path`` methods the sources use) for a URI.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs


class StoragePath:
    """A file or folder under a URI, with the subset of ``pathlib.Path`` the sources use."""

    def __init__(self, uri: str, *, _fs: pafs.FileSystem | None = None, _path: str | None = None) -> None:
        if _fs is None:
            _fs, _path = pafs.FileSystem.from_uri(uri)
        base, sep, query = uri.partition("?")
        self.uri, self.fs, self.path = base.rstrip("/") + sep + query, _fs, _path.rstrip("/")

    def __truediv__(self, part: str) -> StoragePath:
        part = str(part).strip("/")
        if not part:
            return self
        base, sep, query = self.uri.partition("?")  # s3://b/p?endpoint_override=...: the path first
        return StoragePath(f"{base}/{part}{sep}{query}", _fs=self.fs, _path=f"{self.path}/{part}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"StoragePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StoragePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: StoragePath) -> bool:
        return self.uri < other.uri

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def _children(self, recursive: bool) -> list[StoragePath]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        return [self / i.path[len(self.path) + 1:] for i in infos]

    def iterdir(self) -> list[StoragePath]:
        return sorted(self._children(recursive=False), key=str)

    def glob(self, pattern: str) -> list[StoragePath]:
        """The files and folders below whose path relative to this one matches pattern (``*`` stays
        within one level, as in ``Path.glob``)."""
        depth = len(PurePosixPath(pattern).parts)
        found = []
        for child in self._children(recursive=depth > 1):
            rel = PurePosixPath(child.path[len(self.path) + 1:])
            if len(rel.parts) == depth and rel.match(pattern):
                found.append(child)
        return sorted(found, key=str)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()


def is_uri(location: str | Path | StoragePath) -> bool:
    return isinstance(location, StoragePath) or "://" in str(location)


def as_path(location: str | Path | StoragePath) -> Path | StoragePath:
    if isinstance(location, (Path, StoragePath)):
        return location
    return StoragePath(location) if is_uri(location) else Path(location)


def read_bytes(location: str) -> bytes:
    """The bytes of a local file or of an object. A file that is not there raises
    ``FileNotFoundError``; an object store that does not answer raises ``OSError``."""
    return as_path(location).read_bytes()
