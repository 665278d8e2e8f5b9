"""Run storage: where every artifact of a run lives, a local folder or any object store.

A run directory is a local path (``runs/demo``, ``/mnt/shared/run``) or a URI that pyarrow
resolves (``s3://bucket/run``, ``gs://bucket/run``, ``abfs://container@account/run``, ``hdfs://``,
``file:///abs/path``). Everything the stages read or write under it goes through a ``Location``:
Ray Data and Ray Train get its filesystem and path, the driver lists, reads and writes small
files through it, and no other module touches ``os``/``shutil`` for artifacts.

The commit rule works without renames, because object stores have none: an artifact folder
is complete when its ``_manifest.json`` exists, and the manifest is always the last file
written into it. A stage writes into ``.<name>.partial`` beside the final folder and then
commits: locally one atomic rename; on an object store each file is copied into the final
folder (server-side), the manifest last, and only then is the partial folder deleted. A crash
part-way leaves a final folder without a manifest, which no reader trusts and ``--resume``
commits again from the partial folder, which still holds everything.

Credentials and endpoints come from each process's own environment (``AWS_*``, a service
account, ``GOOGLE_APPLICATION_CREDENTIALS``...): a ``Location`` pickles as its URI and
resolves its filesystem again wherever it is unpickled, on whichever node.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raydistill.errors import RunDirError

MANIFEST = "_manifest.json"


def is_remote(uri: str) -> bool:
    """A URI of a filesystem other than this machine's (``file://`` is local)."""
    return "://" in uri and not uri.startswith("file://")


def _normalize(uri: str) -> str:
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def storage_error(uri: str, exc: BaseException) -> RunDirError:
    """One line naming the path, what pyarrow said and what to check."""
    said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if is_remote(uri):
        fix = ("check the endpoint (AWS_ENDPOINT_URL for S3-compatible stores), the credentials every node has "
               "(environment, service account), and that the bucket exists")
    else:
        fix = "check the path and that this user may write there"
    return RunDirError(f"cannot use run storage {uri!r} ({said}); {fix}")


class Location:
    """A file or folder in run storage: a local path or a filesystem URI."""

    def __init__(self, uri: str | Path | Location):
        self.uri: str = uri.uri if isinstance(uri, Location) else _normalize(str(uri))
        self._fs: pafs.FileSystem | None = None
        self._path: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # the filesystem is resolved again where it is unpickled: that node's own credentials
        return (Location, (self.uri,))

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name: str) -> Location:
        return Location(posixpath.join(self.uri, name) if self.remote else str(Path(self.uri) / name))

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(self.uri.rsplit("/", 1)[0] if self.remote else str(Path(self.uri).parent))

    def sibling(self, name: str) -> Location:
        return self.parent / name

    def _resolve(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            if not self.remote:
                self._fs, self._path = pafs.LocalFileSystem(), self.uri
            else:
                try:
                    self._fs, self._path = pafs.FileSystem.from_uri(self.uri)
                except Exception as exc:  # unknown scheme, missing credentials, unreachable endpoint
                    raise storage_error(self.uri, exc) from None
        assert self._path is not None
        return self._fs, self._path

    @property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem (what Ray Data's ``filesystem=`` and Ray Train's ``storage_filesystem=`` take)."""
        return self._resolve()[0]

    @property
    def path(self) -> str:
        """The path within ``fs`` (no scheme)."""
        return self._resolve()[1]

    def local_path(self) -> Path:
        if self.remote:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.uri)

    def child_uri(self, fs_path: str) -> str:
        """The URI of a path that ``fs`` listed under this location."""
        rel = posixpath.relpath(fs_path, self.path)
        return posixpath.join(self.uri, rel) if self.remote else str(Path(self.uri) / rel)

    # -- queries ---------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as exc:
            raise storage_error(self.uri, exc) from None

    def exists(self) -> bool:
        info = self._info()
        if info.type != pafs.FileType.NotFound:
            return True
        return self.remote and bool(self.list())  # object stores: a "folder" exists while it holds objects

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def list(self, suffix: str | None = None, *, recursive: bool = False, hidden: bool = False) -> list[pafs.FileInfo]:
        """The files under this folder (sorted by path; none when it does not exist), without
        hidden/metadata files (names starting with ``.`` or ``_``) unless ``hidden``."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except OSError as exc:
            raise storage_error(self.uri, exc) from None
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            if not hidden and any(part.startswith((".", "_")) for part in posixpath.relpath(info.path, self.path).split("/")):
                continue
            if suffix and not info.path.endswith(suffix):
                continue
            out.append(info)
        return sorted(out, key=lambda i: i.path)

    def is_nonempty(self) -> bool:
        return bool(self.list(recursive=True, hidden=True))

    def complete(self) -> bool:
        """A committed artifact: its manifest exists (always the last file written)."""
        return (self / MANIFEST).is_file()

    # -- small files -----------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as fh:
                return fh.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if self._info().type == pafs.FileType.NotFound:
                raise FileNotFoundError(self.uri) from None
            raise storage_error(self.uri, exc) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: locally through a temporary file and a rename; an object store's
        PUT is atomic already."""
        try:
            if self.remote:
                with self.fs.open_output_stream(self.path) as fh:
                    fh.write(data)
                return
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            raise storage_error(self.uri, exc) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, value: Any) -> None:
        self.write_text(json.dumps(value, indent=2, default=str) + "\n")

    # -- folders ---------------------------------------------------------------------------
    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as exc:
            raise storage_error(self.uri, exc) from None

    def delete(self) -> None:
        """Remove this file or folder and everything under it; a missing one is fine."""
        try:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)
            elif info.type == pafs.FileType.Directory or (self.remote and self.list(recursive=True, hidden=True)):
                self.fs.delete_dir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(self.uri, exc) from None

    def upload(self, local_dir: Path) -> None:
        """Move a local folder's files into this folder (merging with what is there): renamed
        where the run directory is on the same local filesystem, else copied; the local folder
        is gone afterwards."""
        try:
            if self.remote:
                pafs.copy_files(str(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)
            else:
                for src in sorted(p for p in local_dir.rglob("*") if not p.is_dir()):
                    dst = Path(self.path) / src.relative_to(local_dir)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(src, dst)
        except OSError as exc:
            raise storage_error(self.uri, exc) from None
        shutil.rmtree(local_dir, ignore_errors=True)

    def download(self, local_dir: Path) -> None:
        """Copy this folder's files (all of them) into a local folder."""
        local_dir.mkdir(parents=True, exist_ok=True)
        try:
            pafs.copy_files(self.path, str(local_dir), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except OSError as exc:
            raise storage_error(self.uri, exc) from None


def location(uri: str | Path | Location) -> Location:
    return uri if isinstance(uri, Location) else Location(uri)


def commit(partial: Location, final: Location) -> None:
    """Make a finished partial folder the final artifact (see the module docstring). The
    partial folder holds its manifest already; it is copied last."""
    if not partial.remote:
        if Path(final.path).exists():
            shutil.rmtree(final.path)  # --overwrite: the old artifact goes only once the new one is whole
        os.replace(partial.path, final.path)
        return
    (final / MANIFEST).delete()  # from here until the new manifest, readers see an incomplete artifact
    final.delete()
    files = partial.list(recursive=True, hidden=True)
    manifest = [f for f in files if posixpath.basename(f.path) == MANIFEST and posixpath.dirname(f.path) == partial.path]
    try:
        for info in [f for f in files if f not in manifest] + manifest:
            rel = posixpath.relpath(info.path, partial.path)
            partial.fs.copy_file(info.path, posixpath.join(final.path, rel))  # server-side copy on object stores
    except OSError as exc:
        raise storage_error(final.uri, exc) from None
    partial.delete()


@contextlib.contextmanager
def scratch(prefix: str = "raydistill-") -> Iterator[Path]:
    """A node-local temporary folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_parquet(ds: Any, folder: Location, *, min_rows_per_file: int | None = None) -> int:
    """``ds.write_parquet`` into run storage; returns the rows Ray Data reports written, for the
    caller to compare with what it can list (a local folder on a cluster whose nodes each have
    their own disk scatters the files, and the driver would see only some)."""
    # Private module, public Datasink API: Dataset.write_parquet returns nothing, while the
    # datasink's on_write_complete (called in this process) gets the written row count.
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink

    class CountingParquetDatasink(ParquetDatasink):
        rows_written = 0

        def on_write_complete(self, write_result: Any) -> None:
            super().on_write_complete(write_result)
            self.rows_written = int(write_result.num_rows)

    # URIs, not filesystem objects, go to the write tasks: each resolves its node's credentials.
    # A fresh uuid names the files, so a resumed run never overwrites the files of the first.
    sink = CountingParquetDatasink(folder.uri, min_rows_per_file=min_rows_per_file, dataset_uuid=uuid.uuid4().hex)
    ds.write_datasink(sink)
    return sink.rows_written
