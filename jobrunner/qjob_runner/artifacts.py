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
import uuid
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


def describe(path: Path) -> tuple[int, str, list[dict[str, object]]]:
    """(total size, sha256, per-file entries). A folder's sha256 is the digest of its sorted
    ``<relative path> <file sha256>`` lines, so it is reproducible across filesystems."""
    if path.is_file():
        digest = sha256_file(path)
        return path.stat().st_size, digest, [{"path": path.name, "size": path.stat().st_size, "sha256": digest}]
    from concurrent.futures import ThreadPoolExecutor

    paths = sorted(p for p in path.rglob("*") if p.is_file())
    # hashlib releases the GIL on large buffers: shards of a big checkpoint hash in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(sha256_file, paths))
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
