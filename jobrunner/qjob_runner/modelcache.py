"""The model cache: one folder per model content, shared by jobs and retries, and the fetch step.

Layout under the cache root (the shared cache PVC in a cluster, else ``QJOB_MODEL_CACHE``):

    s3/<key>/               the objects under an S3 prefix; <key> hashes the endpoint, bucket, prefix and
                            every object's key, size and ETag (a changed object is a new entry)
    hf/<org>--<repo>--<commit>/   a Hugging Face snapshot at a resolved commit
    <entry>.partial/        a download in progress; the next attempt resumes it
    <entry>.lock            held while an entry is checked or downloaded: a second job waits, then reuses it
    <entry>.use             held shared by every stage reading the entry: eviction skips entries in use
    refs/<request>.json     the entry the fetch stage resolved a request (source + asked-for revision) to
    datasets/<key>.jsonl    the calibration texts a job needs from a Hub dataset; <key> hashes the dataset, the
                            commit its revision resolved to, config, split, text field and sample count
    fills/<fill>.json       what the fill Job <fill> of a cross-namespace shared cache is doing (``FillRecord``)

The cache is bounded: before a download the fetch stage evicts least-recently-used entries (by
mtime, touched on every reuse) that no stage holds and that were not used in the last
``keep_seconds``, until the new model fits under ``max_bytes`` (default: 90% of the volume).

The ``fetch`` stage (no GPU) fills an entry and writes the ref; GPU stages mount the cache
read-only and read the ref, so they never download and never wait for a download. Dataset texts
are small (the samples a job uses, not the dataset) and are not evicted.

A cache shared across namespaces (``RunnerModel.cache_role``) is filled only by fill Jobs in its
own namespace, with the platform's credentials (role ``fill``: today's fetch, plus the fill
record); a tenant job's fetch stage mounts its namespace's read-only view of it and follows the
record of its fill Job until the entry is ready (role ``wait``: no download, no write), so a
tenant's token never fetches into it. Its GPU stages read the refs the fill wrote, as with ``own``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qjob_api.reasons import Reason
from qjob_api.runner import NON_RETRYABLE_EXIT_CODES, RunnerModel, RunnerS3
from qjob_api.v1alpha1 import HuggingFaceDataset

from .artifacts import atomic_write_text
from .context import RunContext
from .errors import InvalidConfig, InvalidInput, RunnerError, TransientError, classify
from .steps import inspect
from .storage import ObjectStore, RateMeter, join_key, message_only, relative_key

log = logging.getLogger("qjob_runner.modelcache")

FETCH_STAGE = "fetch"
Sink = Callable[[str, float, float], None]


def pod_cache_root() -> Path:
    """The pod's own cache (no shared cache volume): ``QJOB_MODEL_CACHE``, else ``~/.cache/qjob/models``."""
    return Path(os.environ.get("QJOB_MODEL_CACHE") or Path.home() / ".cache" / "qjob" / "models")


def stage_progress(ctx: RunContext) -> Sink:
    """A RateMeter sink for a stage that is nothing but the download: percent and ETA are the stage's."""
    return lambda message, fraction, eta: ctx.reporter.update(message=message, percent=100 * fraction, eta_seconds=eta)


@contextmanager
def _locked(entry: Path) -> Iterator[None]:
    import fcntl

    entry.parent.mkdir(parents=True, exist_ok=True)
    with entry.with_name(entry.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the pod dies
        yield


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _finish(partial: Path, entry: Path) -> None:
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
    os.rename(partial, entry)
    entry.with_name(entry.name + ".use").touch()


@dataclass(frozen=True)
class CacheBounds:
    """How large the shared cache may grow, and how long a used entry is kept regardless."""

    max_bytes: int | None = None  # None: 90% of the volume
    keep_seconds: float = 86400.0

    @classmethod
    def of(cls, m: RunnerModel) -> CacheBounds:
        return cls(m.cache_max_bytes, float(m.cache_keep_seconds))


def make_room(root: Path, needed: int, bounds: CacheBounds, sink: Sink) -> list[str]:
    """Evict least-recently-used entries until ``needed`` more bytes fit; returns what was evicted.
    Entries a stage holds (shared lock on ``.use``), used within ``keep_seconds``, or being
    downloaded stay."""
    import fcntl

    limit = bounds.max_bytes or int(0.9 * shutil.disk_usage(root).total)
    if needed > limit:
        raise InvalidInput(
            f"the model needs {needed / 2**30:.1f} GiB but the model cache holds at most {limit / 2**30:.1f} GiB",
            "give the model cache PVC more space (the operator's modelCache.maxSize and the claim's size)",
        )
    folders = [p for kind in ("s3", "hf") if (root / kind).is_dir() for p in (root / kind).iterdir() if p.is_dir()]
    used = sum(_folder_bytes(p) for p in folders)
    evicted: list[str] = []
    now = time.time()
    entries = sorted((p for p in folders if not p.name.endswith(".partial")), key=lambda p: p.stat().st_mtime)
    for entry in entries:
        if used + needed <= limit:
            break
        with entry.with_name(entry.name + ".use").open("a") as use:
            try:
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if now - entry.stat().st_mtime < bounds.keep_seconds:
                    continue
                size = _folder_bytes(entry)
                doomed = entry.with_name(f"{entry.name}.evicting-{os.getpid()}")
                os.rename(entry, doomed)  # a lookup now sees it gone, never half-deleted
            except BlockingIOError:
                continue  # a running stage reads it
            except FileNotFoundError:
                continue  # another fetch evicted it first
        shutil.rmtree(doomed, ignore_errors=True)
        used -= size
        evicted.append(f"{entry.parent.name}/{entry.name}")
    if evicted:
        sink(f"evicted {len(evicted)} least recently used model(s) from the cache: {', '.join(evicted)}", 0.0, 0.0)
    if used + needed > limit:
        raise TransientError(
            f"the model cache is full: {used / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB are models that running "
            f"stages read or that were used in the last {bounds.keep_seconds:.0f} s, and this model needs "
            f"{needed / 2**30:.1f} GiB",
            "the pod is retried as jobs finish; or give the model cache more space (modelCache.maxSize, the claim)",
        )
    return evicted


def hold(entry: Path):
    """A shared lock on the entry's ``.use`` file for as long as the returned file stays open."""
    import fcntl

    use = entry.with_name(entry.name + ".use").open("r")
    fcntl.flock(use, fcntl.LOCK_SH)
    return use


# ------------------------------------------------------------------------------------------ S3


def cache_key(location: RunnerS3, objects: list[dict[str, Any]]) -> str:
    """Source + every object's key, size and ETag: a changed object is a new cache entry."""
    base = join_key(location.prefix)
    identity = {
        "endpoint": location.endpoint or f"aws:{location.region}",
        "bucket": location.bucket,
        "prefix": base,
        "objects": [[relative_key(o["Key"], base), int(o["Size"]), o.get("ETag", "")] for o in objects],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def fetch_into_cache(store: ObjectStore, root: Path, sink: Sink, bounds: CacheBounds | None = None) -> tuple[Path, int]:
    """(cache entry, bytes downloaded) for the objects under the store's prefix. The entry is
    renamed into place only when complete; an interrupted download resumes (s3transfer renames
    each file into place only when it is whole, so files already there are complete)."""
    loc = store.location
    objects = store.list(loc.prefix)
    if not objects:
        raise InvalidInput(
            f"no objects under {loc.uri}",
            f"fix {loc.field}.bucket and {loc.field}.prefix: the prefix must hold config.json, the safetensors "
            "weights and the tokenizer files",
        )
    entry = root / cache_key(loc, objects)
    with _locked(entry):
        if entry.is_dir():
            os.utime(entry)  # last use, for eviction
            sink(f"model {loc.uri} found in the cache ({entry.name})", 1.0, 0.0)
            return entry, 0
        partial = entry.with_name(entry.name + ".partial")
        base = join_key(loc.prefix)
        missing = [o for o in objects if not _complete(partial / relative_key(o["Key"], base), int(o["Size"]))]
        if bounds is not None:
            make_room(root.parent, sum(int(o["Size"]) for o in missing), bounds, sink)
        fetched = store.download(missing, loc.prefix, partial, progress=RateMeter(sink, f"downloading {loc.uri}"))
        checked = verify_files(partial, s3_published_hashes(store, objects))
        sink(f"{checked} of {len(objects)} files checked against the store's checksums", 1.0, 0.0)
        _finish(partial, entry)
        return entry, fetched


def fetch_s3(ctx: RunContext, root: Path, sink: Sink | None = None, bounds: CacheBounds | None = None) -> Path:
    store = ObjectStore(ctx.config.model.s3)
    entry, fetched = fetch_into_cache(store, root / "s3", sink or message_only(ctx), bounds)
    ctx.metrics["modelCacheEntry"] = f"s3/{entry.name}"
    ctx.metrics["modelBytesFetched"] = fetched
    return entry


# -------------------------------------------------------------------------------- Hugging Face


def published_hashes(siblings: list[Any]) -> dict[str, tuple[str, str, int | None]]:
    """rfilename -> (algorithm, digest, size) from the Hub's file metadata: the LFS sha256 for
    large files, the git blob id (sha1 of ``blob <size>\\0<content>``) for the others."""
    out = {}
    for s in siblings:
        if getattr(s, "lfs", None) and s.lfs.sha256:
            out[s.rfilename] = ("sha256", s.lfs.sha256, s.lfs.size)
        elif getattr(s, "blob_id", None):
            out[s.rfilename] = ("git-sha1", s.blob_id, s.size)
    return out


class _Crc32:
    """zlib's CRC-32 with a hashlib-like face; S3 publishes it base64-encoded, big-endian."""

    def __init__(self):
        self.value = 0

    def update(self, block: bytes) -> None:
        self.value = zlib.crc32(block, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


#: algorithm -> (hasher factory, encoding of the published digest)
_HASHERS: dict[str, tuple[Callable[[], Any], str]] = {
    "sha256": (hashlib.sha256, "hex"),  # Hugging Face LFS
    "git-sha1": (hashlib.sha1, "hex"),  # Hugging Face git blob id
    "md5": (hashlib.md5, "hex"),  # S3 ETag of a single-part, unencrypted or SSE-S3 object
    "crc32": (_Crc32, "base64"),  # S3 full-object checksums
    "s3-sha1": (hashlib.sha1, "base64"),
    "s3-sha256": (hashlib.sha256, "base64"),
}


def _digest(path: Path, algorithm: str) -> str:
    factory, encoding = _HASHERS[algorithm]
    h = factory()
    if algorithm == "git-sha1":
        h.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest() if encoding == "hex" else base64.b64encode(h.digest()).decode()


def verify_files(folder: Path, published: dict[str, tuple[str, str, int | None]]) -> int:
    """Check every downloaded file the source publishes a hash for (in parallel: hashing releases
    the GIL); a mismatch deletes the file (the retry downloads it again) and fails the attempt.
    Returns how many files were checked."""
    from concurrent.futures import ThreadPoolExecutor

    present = [(name, *published[name]) for name in sorted(published) if (folder / name).is_file()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        actual = list(pool.map(lambda item: _digest(folder / item[0], item[1]), present))
    for (name, algorithm, digest, _), got in zip(present, actual, strict=True):
        if got != digest:
            (folder / name).unlink()
            raise TransientError(
                f"{name} does not match the {algorithm} the source publishes ({digest[:12]}...)",
                "the damaged file was removed; the pod is retried and downloads it again",
            )
    return len(present)


def s3_published_hashes(store: ObjectStore, objects: list[dict[str, Any]]) -> dict[str, tuple[str, str, int]]:
    """relative key -> (algorithm, digest, size): the object's full-object checksum (CRC32, SHA-1,
    SHA-256), else the MD5 ETag of a single-part object that is not KMS/customer-key encrypted.
    Multipart objects with only part-wise (composite) checksums are not checkable as a whole."""
    base = join_key(store.location.prefix)
    out = {}
    for o in objects:
        head = store.head(o["Key"])
        name, size = relative_key(o["Key"], base), int(o["Size"])
        full = head.get("ChecksumType") == "FULL_OBJECT"
        checksums = (("crc32", "ChecksumCRC32"), ("s3-sha256", "ChecksumSHA256"), ("s3-sha1", "ChecksumSHA1"))
        found = next(((alg, head[f]) for alg, f in checksums if full and head.get(f)), None)
        etag = str(head.get("ETag", "")).strip('"')
        plain = "-" not in etag and len(etag) == 32 and head.get("ServerSideEncryption") in (None, "AES256")
        if found:
            out[name] = (*found, size)
        elif plain and not head.get("SSECustomerAlgorithm"):
            out[name] = ("md5", etag, size)
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)


@contextmanager
def _every(interval: float, action: Callable[[], None]) -> Iterator[None]:
    """Call ``action`` every ``interval`` seconds in a thread while the block runs."""
    stop = threading.Event()

    def poll():
        while not stop.wait(interval):
            action()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fetch_hf(ctx: RunContext, root: Path, sink: Sink) -> Path:
    """A Hub snapshot at the commit the revision resolves to, verified against the Hub's hashes."""
    from huggingface_hub import HfApi

    from .steps.resolve import DOWNLOAD_PATTERNS, download, hub_errors

    m = ctx.config.model
    with hub_errors(m):
        info = HfApi().model_info(
            m.hf_repo, revision=m.revision, token=os.environ.get("HF_TOKEN") or None, files_metadata=True
        )
    wanted = [s for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, pat) for pat in DOWNLOAD_PATTERNS)]
    entry = root / "hf" / f"{m.hf_repo.replace('/', '--')}--{info.sha}"
    with _locked(entry):
        if entry.is_dir():
            os.utime(entry)
            sink(f"{m.hf_repo}@{info.sha[:12]} found in the cache", 1.0, 0.0)
            fetched = 0
        else:
            partial = entry.with_name(entry.name + ".partial")
            before = _folder_bytes(partial) if partial.exists() else 0
            total = sum(s.size or 0 for s in wanted)
            make_room(root, max(0, total - before), CacheBounds.of(m), sink)
            meter = RateMeter(sink, f"downloading {m.hf_repo}@{info.sha[:12]}")
            # huggingface_hub has no byte callback: report the folder's growth
            with _every(2.0, lambda: meter(min(_folder_bytes(partial) if partial.exists() else 0, total), total)):
                download(ctx, local_dir=partial, revision=info.sha)
            checked = verify_files(partial, published_hashes(wanted))
            fetched = _folder_bytes(partial) - before
            _finish(partial, entry)
            log.info("%s@%s: %d files checked against the Hub's hashes", m.hf_repo, info.sha, checked)
    ctx.metrics["modelCacheEntry"] = f"hf/{entry.name}"
    ctx.metrics["modelBytesFetched"] = fetched
    ctx.metrics["modelRevision"] = info.sha
    return entry


# ------------------------------------------------------------------------------ fetch and lookup


def request_ref(m: RunnerModel) -> str:
    """What a job asked for (source + asked-for revision), as a file name under ``refs/``."""
    if m.s3:
        source: dict[str, Any] = {"s3": [m.s3.endpoint or f"aws:{m.s3.region}", m.s3.bucket, join_key(m.s3.prefix)]}
    else:
        source = {"hf": [os.environ.get("HF_ENDPOINT", "https://huggingface.co"), m.hf_repo, m.revision]}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------- Hugging Face datasets


def dataset_request(hf: HuggingFaceDataset, needed: int) -> str:
    """What a job asked of a Hub dataset (before the revision resolves), as a file name under ``refs/``."""
    asked = [os.environ.get("HF_ENDPOINT", "https://huggingface.co"), hf.name, hf.revision, hf.config, hf.split]
    return hashlib.sha256(json.dumps(["hf-dataset", *asked, hf.text_field, needed]).encode()).hexdigest()[:32]


def dataset_commit(hf: HuggingFaceDataset) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    from .work import COMMIT

    if COMMIT.fullmatch(hf.revision):
        return hf.revision
    fix = "check spec.calibration.dataset.huggingFace (name, revision) and the token's access to it"
    try:
        return HfApi().dataset_info(hf.name, revision=hf.revision, token=os.environ.get("HF_TOKEN") or None).sha
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.GatedRepoError) as exc:
        raise InvalidInput(f"dataset {hf.name}@{hf.revision} cannot be read: {type(exc).__name__}", fix) from None
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError) as exc:
        raise TransientError(f"cannot reach the Hugging Face Hub for dataset {hf.name}: {exc}", "retried") from None


def write_dataset_ref(root: Path, hf: HuggingFaceDataset, needed: int, entry: Path, commit: str) -> None:
    ref = root / "refs" / f"{dataset_request(hf, needed)}.json"
    ref.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ref, json.dumps({"entry": entry.relative_to(root).as_posix(), "revision": commit}))


def fetch_dataset(ctx: RunContext, root: Path, sink: Sink) -> Path:
    """The texts the job needs from its Hub dataset, streamed once per resolved commit into the cache."""
    from .steps import data

    hf = ctx.config.calibration.dataset.hugging_face
    assert hf is not None
    needed = data.samples_needed(ctx.config)
    commit = dataset_commit(hf)
    identity = [os.environ.get("HF_ENDPOINT", "https://huggingface.co"), hf.name, commit, hf.config, hf.split]
    key = hashlib.sha256(json.dumps([*identity, hf.text_field, needed]).encode()).hexdigest()[:32]
    entry = root / "datasets" / f"{key}.jsonl"
    with _locked(entry):
        if entry.is_file():
            os.utime(entry)
            sink(f"calibration texts of {hf.name}@{commit[:12]} found in the cache", 1.0, 0.0)
        else:
            sink(f"streaming {needed} texts of {hf.name}@{commit[:12]} ({hf.split})", 0.0, 0.0)
            texts = data.stream_hub_texts(hf, needed, revision=commit)
            atomic_write_text(entry, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_dataset_ref(root, hf, needed, entry, commit)
    ctx.metrics["calibrationCacheEntry"] = entry.relative_to(root).as_posix()
    return entry


def _ref_entry(root: Path, request: str, what: str, fix: str) -> Path:
    """The entry ``refs/<request>.json`` names (whether it still exists is the caller's check)."""
    ref = root / "refs" / f"{request}.json"
    try:
        return root / json.loads(ref.read_text())["entry"]
    except (OSError, ValueError, KeyError):
        raise InvalidInput(f"the model cache {root} has no record of this job's {what} ({ref.name})", fix) from None


def dataset_lookup(ctx: RunContext, needed: int) -> Path:
    """The texts file the fetch stage recorded for this job's dataset (GPU stages: read-only)."""
    hf = ctx.config.calibration.dataset.hugging_face
    assert hf is not None
    root = Path(ctx.config.model.cache_dir or "")
    entry = _ref_entry(
        root,
        dataset_request(hf, needed),
        "calibration dataset",
        "the fetch stage did not finish: delete and re-create the QuantizationJob",
    )
    if not entry.is_file():
        raise InvalidInput(f"calibration texts {entry} are gone from the model cache", "re-create the QuantizationJob")
    ctx.metrics["calibrationCacheEntry"] = entry.relative_to(root).as_posix()
    return entry


def run(ctx: RunContext) -> None:
    """The fetch stage's one step, by the cache's role: ``own`` fetches into the namespace's cache,
    ``fill`` fetches into the cross-namespace cache and keeps the fill record, ``wait`` follows it."""
    role = ctx.config.model.cache_role
    if role == "fill":
        fill(ctx)
    elif role == "wait":
        wait_for_fill(ctx)
    else:
        fetch(ctx, stage_progress(ctx))


def fetch(ctx: RunContext, sink: Sink) -> Path:
    """The model (and a Hub calibration dataset's texts) into the cache, then the refs GPU stages read."""
    m = ctx.config.model
    root = Path(m.cache_dir)
    entry = fetch_s3(ctx, root, sink, CacheBounds.of(m)) if m.s3 else fetch_hf(ctx, root, sink)
    ref = root / "refs" / f"{request_ref(m)}.json"
    ref.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "entry": entry.relative_to(root).as_posix(),
        "bytesFetched": ctx.metrics["modelBytesFetched"],
        "fetchedAt": datetime.now(UTC).isoformat(),
        "job": ctx.config.job,
    }
    atomic_write_text(ref, json.dumps(record))
    if ctx.config.calibration.dataset.hugging_face:
        fetch_dataset(ctx, root, sink)
    # The inspect step's reading of the fetched files: the operator sizes the GPU pods (disk, and
    # GPUs when sized automatically) from it, so no separate inspect stage runs.
    ctx.model_size = inspect.fetched_size(entry)
    ctx.reporter.update(
        message=f"model ready in the cache: {record['entry']} ({record['bytesFetched']} bytes fetched)", percent=100
    )
    return entry


def recorded_entry(root: Path, m: RunnerModel) -> Path:
    """The entry ``refs/<request>.json`` names for this model (what GPU stages read)."""
    entry = _ref_entry(
        root,
        request_ref(m),
        "model",
        "the fetch stage did not finish or the entry was evicted: delete and re-create the QuantizationJob",
    )
    if not entry.is_dir():
        raise InvalidInput(
            f"model cache entry {entry} is gone", "it was evicted: delete and re-create the QuantizationJob"
        )
    return entry


def lookup(ctx: RunContext) -> Path:
    """The cache entry the fetch stage recorded for this job's model (GPU stages: read-only)."""
    m = ctx.config.model
    root = Path(m.cache_dir)
    entry = recorded_entry(root, m)
    ctx.cache_lease = hold(entry)  # eviction skips it while this stage runs
    if not entry.is_dir():  # evicted between the check and the lock
        raise InvalidInput(
            f"model cache entry {entry} is gone", "it was evicted: delete and re-create the QuantizationJob"
        )
    ctx.metrics["modelCacheEntry"] = entry.relative_to(root).as_posix()
    ctx.metrics["modelBytesFetched"] = 0
    ctx.reporter.update(message=f"model from the shared cache: {ctx.metrics['modelCacheEntry']}")
    return entry


# ------------------------------------------------- the cross-namespace shared cache: fill and wait

FILLS = "fills"
#: A fill rewrites its record at least this often, also while it waits for another fill's download.
FILL_HEARTBEAT_SECONDS = 5.0
#: How often a waiting fetch stage reads its fill's record.
FILL_POLL_SECONDS = 2.0
#: A fill deletes records older than this when it starts (their jobs are long done).
FILL_RECORD_MAX_AGE = 86400.0
#: The shared cache's namespace, when the operator tells the waiting stage (named in its fixes).
SHARED_CACHE_NAMESPACE_ENV = "QJOB_SHARED_CACHE_NAMESPACE"
_FILL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def fill_record_path(m: RunnerModel) -> Path:
    """``<cache_dir>/fills/<fill_record>.json``; roles fill and wait need both fields."""
    if not m.cache_dir or not m.fill_record or not _FILL_NAME.fullmatch(m.fill_record):
        raise InvalidConfig(
            f"cache role {m.cache_role} needs model.cacheDir and model.fillRecord (a Job name); got "
            f"{m.cache_dir!r} and {m.fill_record!r}",
            "this is an operator bug: the fill Job and the waiting fetch stage get the fill Job's name",
        )
    return Path(m.cache_dir) / FILLS / f"{m.fill_record}.json"


class FillRecord:
    """What a fill Job is doing, in ``fills/<name>.json``: rewritten atomically on every progress
    update and at least every ``FILL_HEARTBEAT_SECONDS``, so a waiter tells a live fill from a dead
    one by ``updatedAt`` changing.

    ``{"state": "running"|"succeeded"|"failed", "request": <request_ref>, "updatedAt": <ISO UTC>,
    "message", "percent", "etaSeconds"}``, plus ``entry`` (relative to the cache root) and
    ``bytesFetched`` on success, ``reason``, ``problem``, ``fix`` and ``retryable`` on failure."""

    def __init__(self, path: Path, request: str):
        self.path = path
        self.fields: dict[str, Any] = {"state": "running", "request": request, "percent": 0.0, "etaSeconds": None}
        self._lock = threading.Lock()  # progress (transfer threads) and heartbeat write the same file

    def write(self, **fields: Any) -> None:
        with self._lock:
            self.fields.update(fields, updatedAt=datetime.now(UTC).isoformat())
            atomic_write_text(self.path, json.dumps(self.fields))

    def update(self, **fields: Any) -> None:
        """``write``, but a failure is only logged (a waiter then sees a stall): it never fails the
        download, nor hides the error a failed fill reports."""
        try:
            self.write(**fields)
        except OSError as exc:
            log.warning("cannot update the fill record %s: %s", self.path, exc)

    def progress(self, message: str, fraction: float, eta: float) -> None:  # a Sink
        self.update(message=message, percent=round(100 * fraction, 1), etaSeconds=round(eta, 1))

    def beat(self) -> None:
        self.update()

    def fail(self, error: RunnerError) -> None:
        self.update(
            state="failed",
            message=str(error),
            reason=str(error.reason),
            problem=error.problem,
            fix=error.fix or "",
            retryable=error.exit_code not in NON_RETRYABLE_EXIT_CODES,
        )


def remove_old_records(folder: Path, max_age: float = FILL_RECORD_MAX_AGE) -> None:
    now = time.time()
    for p in folder.iterdir():
        try:
            if now - p.stat().st_mtime > max_age:
                p.unlink()
        except FileNotFoundError:
            continue  # another fill removed it first


def fill(ctx: RunContext) -> None:
    """Role ``fill``: the ``own`` fetch into the cross-namespace cache, reported in the fill record
    (this Job has no QuantizationJob to report to: its reporter only logs)."""
    m = ctx.config.model
    path = fill_record_path(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_old_records(path.parent)
    record = FillRecord(path, request_ref(m))
    record.write(message=f"fill {m.fill_record} started: {m.s3.uri if m.s3 else m.hf_repo}")
    to_stage = stage_progress(ctx)

    def sink(message: str, fraction: float, eta: float) -> None:
        to_stage(message, fraction, eta)
        record.progress(message, fraction, eta)

    try:
        with _every(FILL_HEARTBEAT_SECONDS, record.beat):
            entry = fetch(ctx, sink)
    except BaseException as exc:
        record.fail(classify(exc))
        raise
    fetched = ctx.metrics["modelBytesFetched"]
    record.write(
        state="succeeded",
        message=f"model ready in the shared cache ({fetched} bytes fetched)",
        percent=100.0,
        etaSeconds=0.0,
        entry=entry.relative_to(Path(m.cache_dir)).as_posix(),
        bytesFetched=fetched,
    )


def _describe_fill(name: str) -> str:
    namespace = os.environ.get(SHARED_CACHE_NAMESPACE_ENV)
    where = f"-n {namespace} " if namespace else ""
    return f"kubectl {where}describe job {name}" + ("" if namespace else " in the shared cache's namespace")


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet (records are replaced atomically, never half-written)
    return record if isinstance(record, dict) else None


def _fill_failed(name: str, record: dict[str, Any]) -> RunnerError:
    """The fill's permanent failure as this job's: same reason, the filler's problem and fix."""
    kind = InvalidConfig if record.get("reason") == Reason.INVALID_CONFIG else InvalidInput
    return kind(
        f"the shared model cache's fill Job {name} failed: {record.get('problem') or record.get('message')}",
        f"{record.get('fix') or 'see the fill Job'} (the fill Job reads the model with the shared cache's own "
        f"credentials, in its own namespace: ask the platform team; {_describe_fill(name)})",
    )


def _fill_stalled(name: str, record: dict[str, Any] | None, seconds: int) -> TransientError:
    if record is None:
        problem = f"the shared model cache's fill Job {name} wrote no record ({FILLS}/{name}.json) in {seconds} s"
    else:
        last = record.get("problem") if record.get("state") == "failed" else record.get("message")
        problem = (
            f"the shared model cache's fill Job {name} has not updated its record for {seconds} s "
            f"(state {record.get('state')}: {last})"
        )
    return TransientError(problem, f"the pod is retried; if it persists, ask the platform team: {_describe_fill(name)}")


def follow_fill(ctx: RunContext) -> dict[str, Any]:
    """Read the fill record every ``FILL_POLL_SECONDS`` until it says succeeded; relay its progress.
    A stall is measured on this pod's clock since ``updatedAt`` last changed (nodes' clocks differ)."""
    m = ctx.config.model
    path, name = fill_record_path(m), m.fill_record
    request = request_ref(m)
    record, seen, since = None, None, time.monotonic()
    ctx.reporter.update(message=f"waiting for the shared model cache's fill Job {name} ({_describe_fill(name)})")
    while True:
        record = _read_record(path) or record
        if record is not None and record.get("updatedAt") != seen:
            seen, since = record.get("updatedAt"), time.monotonic()
            if record.get("request") != request:
                raise InvalidConfig(
                    f"the shared model cache's fill Job {name} fills another model than this job's",
                    "this is an operator bug: each job's fill Job gets the job's own model source",
                )
            state = record.get("state")
            if state == "succeeded":
                return record
            if state == "failed" and not record.get("retryable"):
                raise _fill_failed(name, record)
            if state == "failed":
                ctx.reporter.update(message=f"the fill Job {name} failed and is retried: {record.get('problem')}")
            else:
                ctx.reporter.update(
                    message=f"shared cache fill {name}: {record.get('message')}",
                    percent=record.get("percent"),
                    eta_seconds=record.get("etaSeconds"),
                )
        if time.monotonic() - since > m.fill_stall_seconds:
            raise _fill_stalled(name, record, m.fill_stall_seconds)
        time.sleep(FILL_POLL_SECONDS)


def wait_for_fill(ctx: RunContext) -> None:
    """Role ``wait`` (the read-only view of the shared cache): nothing is downloaded or written.
    When the fill succeeded, the refs GPU stages read must be there; the size is read as ``own``."""
    from .steps import data

    m = ctx.config.model
    root = Path(m.cache_dir)
    record = follow_fill(ctx)
    entry = recorded_entry(root, m)
    if ctx.config.calibration.dataset.hugging_face:
        dataset_lookup(ctx, data.samples_needed(ctx.config))  # the fill streamed the texts
    ctx.model_size = inspect.fetched_size(entry)
    ctx.metrics["modelCacheEntry"] = entry.relative_to(root).as_posix()
    ctx.metrics["modelBytesFetched"] = 0  # by this job
    ctx.metrics["sharedCacheFill"] = m.fill_record
    ctx.metrics["fillBytesFetched"] = record.get("bytesFetched", 0)
    ctx.reporter.update(
        message=f"model ready in the shared cache: {ctx.metrics['modelCacheEntry']} (filled by {m.fill_record}, "
        f"which fetched {ctx.metrics['fillBytesFetched']} bytes)",
        percent=100,
    )
