"""The cross-namespace shared cache against a real S3 server: a fill stage (role ``fill``) downloads
into the cache and keeps ``fills/<name>.json`` current; the tenant's fetch stage (role ``wait``)
follows that record from a read-only view, downloads nothing, and fails with the fill's reason.

The stages run the real runner (``qjob_runner.run``) in threads or forked processes; the record's
heartbeat and the waiter's polling run at test speed (module constants shortened)."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from qjob_api.runner import ExitCode, RunnerConfig
from qjob_runner import modelcache, run
from qjob_runner.context import Paths, RunContext
from qjob_runner.modelcache import cache_key
from qjob_runner.reporting import Reporter
from qjob_runner.storage import ObjectStore

from .helpers import Recording, location, runner_config

FORK = multiprocessing.get_context("fork")  # a process to kill, without a fresh interpreter's imports


@pytest.fixture(autouse=True)
def _test_speed(monkeypatch):
    monkeypatch.setattr(modelcache, "FILL_HEARTBEAT_SECONDS", 0.3)
    monkeypatch.setattr(modelcache, "FILL_POLL_SECONDS", 0.1)


def _config(
    server, bucket, root, calib, out, role, fill="fill-1", stall=30, stage="fetch", dataset=None, **s3
) -> RunnerConfig:
    return RunnerConfig.model_validate(
        runner_config(
            stage=stage,
            model={
                "s3": location(server, bucket, role="model", prefix="models/tiny", **s3).model_dump(),
                "cacheDir": str(root),
                "cacheRole": role,
                "fillRecord": fill,
                "fillStallSeconds": stall,
            },
            calibration={"dataset": dataset or {"path": str(calib)}},
            outputDir=str(out),
        )
    )


def _record(root: Path, name: str) -> dict | None:
    try:
        return json.loads((root / "fills" / f"{name}.json").read_text())
    except FileNotFoundError:
        return None


def _until(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class _DownloadLock:
    """The entry's download lock, held as another fill's download would hold it."""

    def __init__(self, server, bucket, root: Path):
        store = ObjectStore(location(server, bucket, "model", prefix="models/tiny"))
        self.path = root / "s3" / f"{cache_key(store.location, store.list('models/tiny'))}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def waiters(self) -> int:
        """Processes or threads blocked on this lock (Linux /proc/locks marks them ``->``)."""
        st = self.path.stat()
        file = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
        return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and file in line)

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)  # LOCK_UN: a forked child may share the descriptor
        self.file.close()


def _started(config: RunnerConfig) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", run(config)), daemon=True)
    thread.start()
    return thread, out


# ------------------------------------------------------------------- the waiter as a read-only view

#: Audit events of calls that change a file system (besides ``open`` for writing).
_WRITES = {
    "os.rename",  # also os.replace
    "os.remove",  # also os.unlink
    "os.mkdir",
    "os.rmdir",
    "os.utime",
    "os.chmod",
    "os.chown",
    "os.link",
    "os.symlink",
    "os.truncate",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.move",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _mount_read_only(root: Path, refused: list[str]) -> None:
    """This process sees ``root`` as a read-only mount would show it: every write the Python
    runtime reports (its audit events) fails with EROFS, and is noted in ``refused``."""
    top = str(root.resolve())

    def under(arg) -> str | None:
        if isinstance(arg, str | bytes | os.PathLike):
            path = os.path.abspath(os.fsdecode(arg))
            if path == top or path.startswith(top + os.sep):
                return path
        return None

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[2], int) and not args[2] & _WRITE_FLAGS:
            return
        if event == "open" or event in _WRITES:
            for path in filter(None, map(under, args)):
                refused.append(f"{event} {path}")
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    import sys

    sys.addaudithook(hook)


def _wait_read_only(config_json: str, root: str, journal: str) -> None:
    """A forked waiting fetch stage: its progress goes line by line to ``journal``, then its
    result and the writes refused under ``root``."""
    refused: list[str] = []
    _mount_read_only(Path(root), refused)
    try:
        (Path(root) / "probe").write_text("x")
        works = False
    except OSError as exc:
        works = exc.errno == errno.EROFS
    refused.clear()

    class Journal(Reporter):
        def update(self, **fields) -> None:
            lines.write(json.dumps(fields) + "\n")
            super().update(**fields)

    with Path(journal).open("a", buffering=1) as lines:
        result = run(RunnerConfig.model_validate_json(config_json), reporter=Journal("fetch"))
    summary = {"result": result.model_dump(mode="json", by_alias=True), "refused": refused, "guardWorks": works}
    Path(journal).with_suffix(".done").write_text(json.dumps(summary))


def _journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_tenant_waits_read_only_for_the_fill_and_its_gpu_stage_finds_the_entry(
    s3_server, s3_bucket, s3_creds, tiny_llama, calib_jsonl, tmp_path
):
    s3_server.upload_folder(tiny_llama, s3_bucket, "models/tiny")
    model_bytes = sum(p.stat().st_size for p in tiny_llama.rglob("*") if p.is_file())
    root = tmp_path / "shared"
    filler = _config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / "fill-out", "fill")
    # The waiter gives up after 2 s without a change: the fill below waits longer than that for
    # another download's lock, so only its heartbeat keeps it alive.
    tenant = _config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / "tenant-out", "wait", stall=2)
    journal = tmp_path / "waiter.jsonl"
    waiter = FORK.Process(target=_wait_read_only, args=(tenant.model_dump_json(), str(root), str(journal)))
    waiter.start()
    lock = _DownloadLock(s3_server, s3_bucket, root)
    fill, out = _started(filler)
    try:
        _until(lambda: _record(root, "fill-1") is not None, what="the fill record")
        first = _record(root, "fill-1")
        assert first["state"] == "running" and first["request"] == modelcache.request_ref(filler.model)
        relayed = f"shared cache fill fill-1: fill fill-1 started: s3://{s3_bucket}/models/tiny"
        _until(
            lambda: any(u.get("message") == relayed and u["percent"] == 0 for u in _journal(journal)),
            what="the waiter relaying the running fill",
        )
        time.sleep(2.5)  # longer than the waiter's stall window
        assert _record(root, "fill-1")["updatedAt"] != first["updatedAt"]  # the heartbeat
        assert lock.waiters() == 1 and waiter.is_alive()
    finally:
        lock.release()
    fill.join(30)
    waiter.join(30)
    assert out["result"].outcome == "Succeeded", out["result"].message
    done = _record(root, "fill-1")
    assert done["state"] == "succeeded" and done["bytesFetched"] == model_bytes and done["percent"] == 100
    entry = root / done["entry"]
    assert (entry / "config.json").is_file()

    summary = json.loads(journal.with_suffix(".done").read_text())
    result = summary["result"]
    assert result["outcome"] == "Succeeded", result.get("message")
    assert result["modelSize"] == out["result"].model_size.model_dump(mode="json", by_alias=True)
    assert summary["guardWorks"] and summary["refused"] == []  # the waiter wrote nothing under the cache
    ready = f"model ready in the shared cache: {done['entry']} (filled by fill-1, which fetched {model_bytes} bytes)"
    assert ready in [u.get("message") for u in _journal(journal)]

    # The tenant's GPU stage reads the ref the fill wrote (the same request from the same source).
    quantize = _config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / "tenant-out", "wait", stage="quantize")
    ctx = RunContext(config=quantize, paths=Paths.from_config(quantize), reporter=Reporter("quantize"))
    assert modelcache.lookup(ctx) == entry
    ctx.cache_lease.close()


def test_two_fills_of_one_model_at_once_download_it_once(
    s3_server, s3_bucket, s3_creds, tiny_llama, calib_jsonl, tmp_path
):
    s3_server.upload_folder(tiny_llama, s3_bucket, "models/tiny")
    model_bytes = sum(p.stat().st_size for p in tiny_llama.rglob("*") if p.is_file())
    root = tmp_path / "shared"
    lock = _DownloadLock(s3_server, s3_bucket, root)
    try:
        fills = [
            _started(_config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / name, "fill", fill=name))
            for name in ("fill-a", "fill-b")
        ]
        _until(lambda: lock.waiters() == 2, what="both fills at the download lock")
    finally:
        lock.release()
    for thread, _ in fills:
        thread.join(30)
    results = [out["result"] for _, out in fills]
    assert [r.outcome for r in results] == ["Succeeded", "Succeeded"], [r.message for r in results]
    records = [_record(root, name) for name in ("fill-a", "fill-b")]
    assert sorted(r["bytesFetched"] for r in records) == [0, model_bytes]
    assert records[0]["entry"] == records[1]["entry"] and all(r["state"] == "succeeded" for r in records)


def test_a_permanent_fill_failure_fails_the_tenant_with_the_fills_reason(s3_server, s3_creds, calib_jsonl, tmp_path):
    root = tmp_path / "shared"
    (root / "fills").mkdir(parents=True)
    old, recent = root / "fills" / "done-long-ago.json", root / "fills" / "done-lately.json"
    for record in (old, recent):
        record.write_text("{}")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    config = _config(s3_server, "no-such-bucket", root, calib_jsonl, tmp_path / "fill-out", "fill", fill="fill-x")
    fill = run(config)
    assert not old.exists() and recent.exists()  # a fill deletes records older than a day
    assert fill.exit_code == ExitCode.INVALID_INPUT
    record = _record(root, "fill-x")
    assert (record["state"], record["reason"], record["retryable"]) == ("failed", "InvalidInput", False)
    assert "bucket 'no-such-bucket' does not exist" in record["problem"] and "spec.model.s3.bucket" in record["fix"]

    tenant = _config(s3_server, "no-such-bucket", root, calib_jsonl, tmp_path / "tenant-out", "wait", fill="fill-x")
    waited = run(tenant)
    assert (waited.exit_code, waited.reason) == (ExitCode.INVALID_INPUT, "InvalidInput")
    assert waited.message.startswith(f"the shared model cache's fill Job fill-x failed: {record['problem']}. Fix: ")
    assert record["fix"] in waited.message and "ask the platform team" in waited.message


def test_a_killed_fill_is_a_stall_the_tenant_retries(
    s3_server, s3_bucket, s3_creds, tiny_llama, calib_jsonl, tmp_path, monkeypatch
):
    s3_server.upload_folder(tiny_llama, s3_bucket, "models/tiny")
    root = tmp_path / "shared"
    lock = _DownloadLock(s3_server, s3_bucket, root)
    filler = FORK.Process(
        target=run, args=(_config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / "f", "fill", fill="fill-k"),)
    )
    filler.start()
    try:
        _until(lambda: lock.waiters() == 1, what="the fill at the download lock")
        beat = _record(root, "fill-k")["updatedAt"]
        _until(lambda: _record(root, "fill-k")["updatedAt"] != beat, what="a heartbeat")
        os.kill(filler.pid, signal.SIGKILL)  # the pod is gone: no record says so
        filler.join(10)
    finally:
        lock.release()
    monkeypatch.setenv(modelcache.SHARED_CACHE_NAMESPACE_ENV, "platform")
    started = time.monotonic()
    waited = run(_config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / "t", "wait", fill="fill-k", stall=1))
    assert 1 <= time.monotonic() - started < 5
    assert (waited.exit_code, waited.failed_step) == (ExitCode.TRANSIENT, "fetch")
    assert "fill Job fill-k has not updated its record for 1 s (state running: fill fill-k started" in waited.message
    assert "ask the platform team: kubectl -n platform describe job fill-k" in waited.message


def test_a_retried_fill_is_waited_for_and_a_missing_one_is_a_stall(s3_server, s3_creds, calib_jsonl, tmp_path):
    root = tmp_path / "shared"
    refused = "http://127.0.0.1:1"  # connection refused: transient
    assert (
        run(
            _config(s3_server, "b", root, calib_jsonl, tmp_path / "f", "fill", fill="fill-r", endpoint=refused)
        ).exit_code
        == ExitCode.TRANSIENT
    )
    record = _record(root, "fill-r")
    assert (record["state"], record["retryable"]) == ("failed", True)
    reporter = Recording("fetch")
    tenant = _config(
        s3_server, "b", root, calib_jsonl, tmp_path / "t", "wait", fill="fill-r", stall=1, endpoint=refused
    )
    waited = run(tenant, reporter=reporter)  # the fill Job would retry its pod: the tenant waits, then stalls
    assert waited.exit_code == ExitCode.TRANSIENT and "state failed: cannot reach" in waited.message
    assert any("the fill Job fill-r failed and is retried" in (u.get("message") or "") for u in reporter.updates)

    never = run(_config(s3_server, "b", root, calib_jsonl, tmp_path / "t", "wait", fill="fill-none", stall=1))
    assert never.exit_code == ExitCode.TRANSIENT
    assert "fill Job fill-none wrote no record (fills/fill-none.json) in 1 s" in never.message
    assert "describe job fill-none in the shared cache's namespace" in never.message


def test_a_tenant_with_a_hub_dataset_needs_the_texts_the_fill_streamed(
    s3_server, s3_bucket, s3_creds, tiny_llama, calib_jsonl, tmp_path
):
    """The fill streams a Hub dataset's texts (not reachable here: no network) and writes their ref;
    the waiter checks the ref the tenant's GPU stages will read."""
    from qjob_api.v1alpha1 import HuggingFaceDataset
    from qjob_runner.steps import data

    s3_server.upload_folder(tiny_llama, s3_bucket, "models/tiny")
    root = tmp_path / "shared"
    assert run(_config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / "f", "fill")).outcome == "Succeeded"
    hub = {"huggingFace": {"name": "org/texts", "revision": "a" * 40}}
    tenant = _config(s3_server, s3_bucket, root, calib_jsonl, tmp_path / "t", "wait", dataset=hub)
    missing = run(tenant)
    assert (
        missing.exit_code == ExitCode.INVALID_INPUT and "no record of this job's calibration dataset" in missing.message
    )
    texts = root / "datasets" / "k.jsonl"
    texts.parent.mkdir()
    texts.write_text('{"text": "a sample"}\n')
    needed = data.samples_needed(tenant)
    modelcache.write_dataset_ref(root, HuggingFaceDataset.model_validate(hub["huggingFace"]), needed, texts, "a" * 40)
    assert run(tenant).outcome == "Succeeded"


def test_fill_and_wait_need_the_fill_records_name(calib_jsonl, tmp_path):
    for role in ("fill", "wait"):
        result = run(_config(None, "b", tmp_path / "shared", calib_jsonl, tmp_path / "out", role, fill=None))
        assert (
            result.exit_code == ExitCode.INVALID_CONFIG and f"cache role {role} needs model.cacheDir" in result.message
        )
        assert not (tmp_path / "shared").exists()
