"""Nothing half-done: artifacts are written into a staging folder beside ``output_dir`` (same
filesystem, so ``os.rename`` is atomic) and renamed into place only when the whole stage
succeeded. ``manifest.json`` is renamed last: its presence means the output is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("qjob_runner.artifacts")

MANIFEST = "manifest.json"
RESULT = "result.json"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class FileHashes:
    """sha256 of files hashed in background threads as soon as they are written.

    A checkpoint's shards are hashed while the exporter writes the next ones, so the manifest does
    not wait for a second pass over gigabytes of weights. hashlib releases the GIL on large
    buffers: shards hash in parallel with each other and with the export. A digest is used only
    if the file still has the size and mtime it had when hashing began; otherwise it is hashed
    again, so a file rewritten later can never carry a stale digest.
    """

    def __init__(self, workers: int | None = None):
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._started: dict[Path, tuple[tuple[int, int], Future[str]]] = {}
        self._lock = threading.Lock()

    def submit(self, path: Path) -> None:
        """Start hashing ``path`` (a file that is complete and will not change)."""
        self._start(Path(path))

    def _start(self, path: Path) -> tuple[tuple[int, int], Future[str]]:
        stamp = _stamp(path)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="qjob-sha256")
            entry = self._started[path.resolve()] = (stamp, self._pool.submit(sha256_file, path))
        return entry

    def map(self, paths: list[Path]) -> list[str]:
        """sha256 of each path: hashes already under way are waited for, the others start now."""
        entries = []
        for path in paths:
            with self._lock:
                entry = self._started.get(path.resolve())
            if entry is None or entry[0] != _stamp(path):
                entry = self._start(path)
            entries.append(entry)
        digests = []
        for path, (stamp, future) in zip(paths, entries, strict=True):
            digest = future.result()
            digests.append(digest if _stamp(path) == stamp else sha256_file(path))
        return digests

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._started.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def describe(path: Path, hashes: FileHashes | None = None) -> tuple[int, str, list[dict[str, object]]]:
    """(total size, sha256, per-file entries). A folder's sha256 is the digest of its sorted
    ``<relative path> <file sha256>`` lines, so it is reproducible across filesystems. Files
    that ``hashes`` already hashed (while they were written) are not read again."""
    own = hashes is None
    hashes = hashes or FileHashes()
    try:
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        digests = hashes.map(paths)
    finally:
        if own:
            hashes.close()
    if path.is_file():
        return path.stat().st_size, digests[0], [{"path": path.name, "size": path.stat().st_size, "sha256": digests[0]}]
    files = [
        {"path": f.relative_to(path).as_posix(), "size": f.stat().st_size, "sha256": d}
        for f, d in zip(paths, digests, strict=True)
    ]
    folder = hashlib.sha256("".join(f"{e['path']} {e['sha256']}\n" for e in files).encode()).hexdigest()
    return sum(int(e["size"]) for e in files), folder, files


class Staging:
    """A private folder next to the destination; ``publish`` renames its entries into place."""

    def __init__(self, destination: Path):
        self.destination = destination
        parent = destination.parent
        parent.mkdir(parents=True, exist_ok=True)
        self.path = parent / f".{destination.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        #: sha256 of staged files, computed as they are written (see ``FileHashes``)
        self.hashes = FileHashes()

    def publish(self, last: str | None = MANIFEST) -> list[Path]:
        """Move every staged entry into ``destination`` (``last`` is moved last)."""
        self.destination.mkdir(parents=True, exist_ok=True)
        entries = sorted(self.path.iterdir(), key=lambda p: (p.name == last, p.name))
        moved = []
        for entry in entries:
            target = self.destination / entry.name
            if target.exists() or target.is_symlink():
                # An earlier attempt's artifact: move it aside first so the swap is atomic.
                old = self.destination / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
                os.rename(entry, target)
                _remove(old)
            else:
                os.rename(entry, target)
            moved.append(target)
        self.discard()
        return moved

    def discard(self) -> None:
        self.hashes.close()
        _remove(self.path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_staging(destination: Path) -> None:
    """Remove staging folders that earlier, killed attempts left behind (by name pattern only)."""
    parent = destination.parent
    if not parent.exists():
        return
    for p in parent.glob(f".{destination.name}.staging-*"):
        log.info("removing staging folder of an earlier attempt: %s", p)
        _remove(p)


def atomic_write_text(path: Path, text: str) -> None:
    # Unique per write: threads share a pid, and pods on a shared volume can have the same one.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
