"""Resolving a query source — a file, directory, glob or pyarrow-filesystem URI — to its files.

Everything here runs on the driver before Ray starts and touches only file listings and the
first bytes of one file, so a wrong path or a wrong column fails in a second, not after the
teacher's engines have spent minutes starting.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from raydistill.errors import DataError
from raydistill.paths import BUILTIN_PREFIX

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    """The files of one query source, all of one format, on one filesystem."""

    uri: str
    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    format: str
    # Built-in queries live in the driver's cache, which other nodes of a cluster do not see:
    # they are small (a few thousand rows) and read on the driver, then handed to Ray.
    on_driver: bool = False


def _split_glob(path: str) -> tuple[str, str | None]:
    """'dir/sub/*.jsonl' → ('dir/sub', 'dir/sub/*.jsonl'): the static base folder and the pattern."""
    parts = PurePosixPath(path).parts
    for i, part in enumerate(parts):
        if any(ch in part for ch in _GLOB_CHARS):
            return str(PurePosixPath(*parts[:i])) if i else ".", path
    return path, None


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for unknown schemes / missing credentials
        raise DataError(f"cannot open query source {uri!r}: {exc}; check the URI scheme and credentials") from None


def resolve_source(uri: str) -> Source:
    """A file, directory (recursive), glob or URI → its query files; errors name what to fix."""
    on_driver = uri.startswith(BUILTIN_PREFIX)
    if on_driver:
        from raydistill.data.builtin import builtin_queries_path

        uri = builtin_queries_path(uri[len(BUILTIN_PREFIX) :])
    fs, path = _filesystem(uri)
    base, pattern = _split_glob(path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"query source {uri!r} not found; check queries.train_path / queries.eval_path")
    if info.type == pafs.FileType.File and pattern is None:
        files = [(info.path, info.size)]
    else:
        listing = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = sorted(
            (f.path, f.size)
            for f in listing
            if f.type == pafs.FileType.File
            and not PurePosixPath(f.path).name.startswith((".", "_"))  # hidden / _SUCCESS markers
            and (fnmatch.fnmatch(f.path, pattern) if pattern else PurePosixPath(f.path).suffix in FORMATS)
        )
    if not files:
        raise DataError(f"no query files (.jsonl .json .parquet .csv .txt) match {uri!r}; point the path at your queries")
    suffixes = {PurePosixPath(f).suffix for f, _ in files}
    unknown = sorted(suffixes - set(FORMATS))
    if unknown:
        raise DataError(f"query source {uri!r} has files with unknown extension {unknown[0]!r}; use .jsonl, .json, .parquet, .csv or .txt")
    formats = {FORMATS[s] for s in suffixes}
    if len(formats) > 1:
        raise DataError(f"query source {uri!r} mixes formats {sorted(formats)}; keep one format per source")
    if all(size == 0 for _, size in files):
        raise DataError(f"query source {uri!r} is empty; add one query per row/line")
    return Source(uri=uri, filesystem=fs, files=tuple(f for f, _ in files), format=formats.pop(), on_driver=on_driver)


def first_columns(source: Source) -> list[str]:
    """The column names of the first non-empty file, read from its header only."""
    if source.format == "text":
        return ["text"]
    if source.format == "json":
        return []  # a whole-file JSON document: no cheap header; checked while reading
    for path in source.files:
        if source.format == "parquet":
            import pyarrow.parquet as pq

            try:
                return pq.read_schema(path, filesystem=source.filesystem).names
            except Exception as exc:
                raise DataError(f"query file {path!r} is not a readable Parquet file ({exc}); check the file") from None
        with source.filesystem.open_input_stream(path) as stream:
            head = stream.read(1 << 16)
        if not head.strip():
            continue
        line = head.splitlines()[0]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"query file {path!r} is not UTF-8 ({exc.reason} at byte {exc.start}); re-encode it as UTF-8") from None
        if source.format == "csv":
            import csv

            return next(csv.reader([text]))
        try:
            first = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"query file {path!r} line 1 is not JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(first, dict):
            raise DataError(f"query file {path!r} line 1 is not a JSON object; write one object per line, e.g. {{\"text\": ...}}")
        return list(first)
    return []


def check_columns(source: Source, text_column: str) -> None:
    """Fail before Ray starts when the text column is not in the source's first file."""
    columns = first_columns(source)
    if columns and text_column not in columns:
        raise DataError(
            f"query source {source.uri!r} has no column {text_column!r} (columns: {columns}); "
            f"set queries.text_column to the column holding the query text"
        )


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """An exception and everything it wraps: __cause__/__context__ and Ray's ``.cause``."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])


def explain_read_failure(exc: BaseException, uri: str) -> DataError | None:
    """The user-facing error behind a failed Ray Data read of ``uri``, if it is a data problem.

    Reads run in Ray workers, so a bad file surfaces wrapped in Ray's task errors; this finds
    our own DataError (e.g. a missing column in a later file) or an encoding failure inside.
    """
    for e in _causes(exc):
        if isinstance(e, DataError):
            return e
        if isinstance(e, UnicodeDecodeError):
            # Ray rebuilds exceptions across processes; the position fields may not survive.
            where = f" ({e.reason} at byte {e.start})" if getattr(e, "reason", None) else ""
            return DataError(f"query source {uri!r} has bytes that are not UTF-8{where}; re-encode it as UTF-8")
        message = str(e)
        if type(e).__name__ == "ArrowInvalid" and ("UTF8" in message or "utf-8" in message.lower() or "encoding" in message):
            first = message.strip().splitlines()[0][:160]
            return DataError(f"query source {uri!r} has bytes that are not UTF-8 ({first}); re-encode it as UTF-8")
    return None
