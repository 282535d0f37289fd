"""A work dir on an object store (``paths.work_dir = "s3://bucket/prefix"``): the store holds the authoritative copy of
every output; each job works in a local mirror folder (``paths.mirror_dir``) and publishes what it finishes.

Objects on an object store appear whole or not at all (a PUT, or a multipart upload, becomes visible only once it
completes), so nothing here relies on rename. Completion is ordered instead: a shard is uploaded before its done
marker, a checkpoint's files before its ``COMPLETE`` marker. A job killed between the two leaves data without a marker,
which every reader treats as not done, and the next job writes it again.

    pull(folder)      download the folder's objects that the mirror lacks or holds at another size (temporary files,
                      leases and the ``.partial`` intermediates stay behind: they belong to one job)
    push(path)        upload one mirror file to its key
    push_tree(folder, last)   every file of a folder, then ``last`` (its marker)
    delete(path)      remove one object

Leases need conditional writes (create only if absent, replace or delete only if unchanged), which pyarrow.fs does not
offer; they go through boto3 (``shared.object_leases``). Configuration is the standard AWS one, read by both libraries:
``AWS_ENDPOINT_URL`` (an S3-compatible server), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WORK_DIR_SCHEMES = ("s3",)  # leases need conditional writes; gs:// has them too, but only S3's are implemented
SKIPPED_DIRS = (".leases", ".partial")  # one job's own state: never pulled
_CHUNK = 8 << 20


def is_uri(value: str) -> bool:
    return "://" in str(value)


def default_mirror(uri: str) -> Path:
    """``$XDG_CACHE_HOME/llavaseg/mirror/<sha256(uri)[:12]>`` (``~/.cache`` without it): one mirror per store URI."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llavaseg" / "mirror" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]


def _skipped(relative: str) -> bool:
    parts = relative.split("/")
    return any(p in SKIPPED_DIRS for p in parts[:-1]) or parts[-1].endswith(".tmp") or ".tmp-" in relative


@dataclass
class ObjectStore:
    """The store at ``uri`` mirrored in ``mirror``: every mirror path ``mirror / rel`` is the object ``uri / rel``."""

    uri: str
    mirror: Path
    _fs: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.uri = self.uri.rstrip("/")
        self.mirror = Path(self.mirror)

    def __getstate__(self) -> dict[str, Any]:  # Ray workers rebuild the file system on their side
        return {"uri": self.uri, "mirror": self.mirror, "_fs": None}

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    def _filesystem(self) -> tuple[Any, str]:
        import pyarrow.fs

        if self._fs is None:
            self._fs = pyarrow.fs.FileSystem.from_uri(self.uri)
        return self._fs

    def contains(self, path: Path) -> bool:
        """Whether ``path`` lies in the mirror (a folder outside it, e.g. a manifest given by path, is not stored)."""
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(self.mirror))

    def relative(self, path: Path) -> str:
        """``path``'s name below the mirror (POSIX separators)."""
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.mirror)).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside the mirror {self.mirror} of {self.uri}") from None

    def key(self, path: Path) -> str:
        """The object key (``bucket/prefix/rel``) of a mirror path."""
        fs, root = self._filesystem()
        relative = self.relative(path)
        return f"{root}/{relative}" if relative != "." else root

    def url(self, path: Path) -> str:
        relative = self.relative(path)
        return self.uri if relative == "." else f"{self.uri}/{relative}"

    def push(self, path: Path) -> None:
        """Upload the mirror file ``path`` to its key; the object appears whole once the upload completes."""
        fs, _ = self._filesystem()
        with open(path, "rb") as source, fs.open_output_stream(self.key(path)) as sink:
            while chunk := source.read(_CHUNK):
                sink.write(chunk)

    def push_tree(self, folder: Path, last: str | None = None) -> int:
        """Upload every file below ``folder``, ``last`` (a name directly in it: its marker) after all others; returns
        the number of files."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not _skipped(p.relative_to(folder).as_posix()))
        marker = folder / last if last else None
        for path in [p for p in files if p != marker] + ([marker] if marker in files else []):
            self.push(path)
        return len(files)

    def exists(self, path: Path) -> bool:
        import pyarrow.fs

        fs, _ = self._filesystem()
        return fs.get_file_info(self.key(path)).type == pyarrow.fs.FileType.File

    def delete(self, path: Path) -> None:
        fs, _ = self._filesystem()
        try:
            fs.delete_file(self.key(path))
        except FileNotFoundError:
            pass

    def delete_tree(self, folder: Path) -> None:
        fs, _ = self._filesystem()
        try:
            fs.delete_dir(self.key(folder))
        except FileNotFoundError:
            pass

    def read(self, path: Path) -> bytes | None:
        """The bytes of the object at a mirror path, None when the store lacks it."""
        fs, _ = self._filesystem()
        try:
            with fs.open_input_stream(self.key(path)) as source:
                return source.read()
        except FileNotFoundError:
            return None

    def pull_file(self, path: Path, mtime: float | None = None) -> bool:
        """Download one object to its mirror path (temporary name, then rename); False when the store lacks it.
        ``mtime``: the object's time, given to the file, so that every machine's copy has the same size and mtime
        (what ``shared.shard_inputs`` digests of an image)."""
        fs, _ = self._filesystem()
        path = Path(path)
        try:
            source = fs.open_input_stream(self.key(path))
        except FileNotFoundError:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.pull-{os.getpid()}.tmp")
        try:
            with source, open(temporary, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
            if mtime is not None:
                os.utime(temporary, (mtime, mtime))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return True

    def pull(self, folder: Path) -> set[str]:
        """Download the objects below ``folder`` that the mirror lacks or holds at another size; returns the names
        (relative to ``folder``) of every file the store holds there.

        A mirror file the store lacks is kept (another job may not have published it yet, or it is this job's own).
        """
        import pyarrow.fs

        fs, _ = self._filesystem()
        folder = Path(folder)
        prefix = self.key(folder)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return set()
        pulled, names = 0, set()
        for info in infos:
            if info.type != pyarrow.fs.FileType.File:
                continue
            relative = info.path[len(prefix) :].lstrip("/")
            if not relative or _skipped(relative):
                continue
            names.add(relative)
            local = folder / relative
            mtime = info.mtime.timestamp() if info.mtime is not None else None
            if local.is_file() and local.stat().st_size == info.size:
                continue
            if self.pull_file(local, mtime):
                pulled += 1
        if pulled:
            log.info("pulled %d file(s) of %s", pulled, self.url(folder))
        return names


def store_for(config: Any) -> ObjectStore | None:
    """The object store of ``config``'s work dir, None for a local one."""
    value = config.paths.work_dir
    if not is_uri(value):
        return None
    mirror = config.paths.mirror_dir
    mirror_path = (Path(config.base_dir) / mirror).resolve() if mirror else default_mirror(value)
    return ObjectStore(value, mirror_path)


def pull_inputs(config: Any, folders: list[Path]) -> ObjectStore | None:
    """With an object-store work dir: bring each of ``folders`` that lies in the mirror up to date from the store (a
    checkpoint, stage-1 shards another machine wrote); returns the store, None for a local work dir."""
    store = store_for(config)
    for folder in sorted({Path(f) for f in folders}) if store is not None else []:
        if store.contains(folder):
            store.pull(folder)
    return store


def push_if(store: ObjectStore | None, *paths: Path) -> None:
    """Publish mirror files in order (data first, marker last); nothing for a local work dir."""
    if store is not None:
        for path in paths:
            store.push(Path(path))


def publish_shard(store: ObjectStore, shard_path: Path) -> None:
    """Upload a finished shard, then its done marker: the marker is published only over complete data."""
    from shared import shards

    store.push(Path(shard_path))
    store.push(shards.done_path(Path(shard_path)))


def refresh_shard(store: ObjectStore, shard_path: Path) -> None:
    """Bring a shard's published state into the mirror: its done marker, and its data when the mirror's bytes do not
    match that marker (another job finished it since)."""
    from shared import shards

    shard_path = Path(shard_path)
    marker = shards.done_path(shard_path)
    published = store.read(marker)
    if published is None or (marker.is_file() and marker.read_bytes() == published):
        return  # nothing published, or what the mirror holds: the marker's identity stays (FinishedCheck.redo)
    marker.parent.mkdir(parents=True, exist_ok=True)
    temporary = marker.with_name(f".{marker.name}.pull-{os.getpid()}.tmp")
    temporary.write_bytes(published)
    os.replace(temporary, marker)
    done = shards.read_done(shard_path) or {}
    if not shard_path.is_file() or shards.checksum_problem(shard_path, done) is not None:
        store.pull_file(shard_path)


def fetch_input(value: str, cache: Path, flag: str = "--input") -> Path:
    """A local path for ``value``; an object-store URI (``s3://bucket/in/table.csv``, or a folder) is downloaded
    first, with everything beside it (the images a table names), under ``cache/<sha256(uri)[:12]>``.

    Raises:
        ValueError: naming ``flag``, for a URI whose scheme pyarrow.fs cannot open or an object that is not there.
    """
    import pyarrow
    import pyarrow.fs

    if not is_uri(value):
        return Path(value)
    uri = value.rstrip("/")
    try:
        fs, key = pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as error:
        raise ValueError(f"{flag}: cannot open {value!r}: {error}") from None
    kind = fs.get_file_info(key).type
    if kind == pyarrow.fs.FileType.NotFound:
        raise ValueError(f"{flag}: {value!r} does not exist")
    folder_uri = uri.rsplit("/", 1)[0] if kind == pyarrow.fs.FileType.File else uri
    store = ObjectStore(folder_uri, Path(cache) / hashlib.sha256(folder_uri.encode()).hexdigest()[:12])
    store.pull(store.mirror)
    return store.mirror / uri.rsplit("/", 1)[1] if kind == pyarrow.fs.FileType.File else store.mirror
