"""Read the model's weight files into the page cache while the runner imports its libraries.

A fresh pod spends seconds importing torch, transformers and ModelOpt (CPU work) before the
load step reads the weights (disk or network volume work). Reading the files in a background
thread from the first line of ``run`` overlaps the two; ``from_pretrained`` then reads from
memory. Only as much as half the memory the pod may still use is read ahead, so a model larger
than that is not read twice (the page cache would evict the first part before the load).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger("qjob_runner.prefetch")

WEIGHT_SUFFIXES = (".safetensors", ".bin")
CHUNK = 16 << 20
#: Share of the memory still available to this pod that read-ahead may fill.
MEMORY_SHARE = 0.5


def memory_available() -> int | None:
    """Bytes this process may still use: MemAvailable, lowered by a cgroup v2 memory limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def read_ahead(files: list[Path], budget: int) -> int:
    """Read ``files`` in order until ``budget`` bytes; returns the bytes read."""
    buf = bytearray(CHUNK)
    done = 0
    for path in files:
        try:
            with path.open("rb", buffering=0) as f:
                while done < budget and (n := f.readinto(buf)):
                    done += n
        except OSError as exc:  # the load step reports unreadable files properly
            log.debug("read-ahead of %s stopped: %s", path, exc)
        if done >= budget:
            break
    return done


def start(model_path: str | None) -> threading.Thread | None:
    """Start reading a local model folder's weights in the background (None: nothing to read)."""
    if not model_path or not Path(model_path).is_dir():
        return None
    files = weight_files(Path(model_path))
    avail = memory_available()
    if not files or not avail:
        return None
    budget = int(avail * MEMORY_SHARE)
    t = threading.Thread(target=read_ahead, args=(files, budget), name="qjob-prefetch", daemon=True)
    t.start()
    return t
