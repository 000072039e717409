"""Model supply and artifact upload against a real S3 server (versitygw on loopback, hack/s3server).

1. Upload throughput of a multi-GB artifact folder: the runner's uploader (``ObjectStore.upload_folder``:
   one s3transfer manager for all files, 64 MiB parts, 16 in parallel, manifest last) against a plain
   boto3 ``upload_file`` of the same files one after the other (boto3's default TransferConfig), in the
   same run, alternating which goes first. Goal: ours / plain >= 0.9.
2. Bytes a second job and a retry fetch for the same model through the fetch stage. Goal: 0.
   The same across namespaces through the shared cache (``modelCache.shared``): each job's fill
   (role fill, the platform's credentials) and its waiting fetch stage (role wait, read-only):
   the second namespace's fill fetches 0 bytes.
3. Seconds a GPU pod spends before its first calibration batch (resolve + load + data steps) for a
   model in S3 whose folder holds ``--pad-gib`` of extra bytes: the GPU pod downloading it itself,
   against reading it from the cache the fetch stage filled. Goal: no downloading in the GPU pod.

    python benchmarks/model_supply.py [--gib 4] [--files 4] [--repeats 3] [--pad-gib 1] [--workdir DIR]

Prints the figures and writes them to benchmarks/results/model_supply.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qjob_dev.bench import RESULTS_DIR, report_results
from qjob_dev.s3server import S3Server

RESULTS = RESULTS_DIR / "model_supply.json"
MiB = 1 << 20
BUCKET = "bench"


@contextlib.contextmanager
def s3_scratch(workdir: str | None, prefix: str, roles: tuple[str, ...]) -> Iterator[tuple[Path, S3Server]]:
    """A scratch folder (``workdir``, else a temp dir removed afterwards) and a versitygw server in it
    holding BUCKET, whose root credentials the runner finds for each of ``roles`` (QJOB_S3_<ROLE>_*)."""
    work = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    server = S3Server(work / "s3").start()
    try:
        for role in roles:
            os.environ[f"QJOB_S3_{role}_ACCESS_KEY_ID"] = server.access_key
            os.environ[f"QJOB_S3_{role}_SECRET_ACCESS_KEY"] = server.secret_key
        server.client().create_bucket(Bucket=BUCKET)
        yield work, server
    finally:
        server.stop()
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def measured_on() -> dict[str, str]:
    """Where the figures come from: the S3 server, the machine, the command line."""
    return {
        "server": "versitygw v1.8.0 posix backend on 127.0.0.1 (qjob_dev.s3server)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work)",
        "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
    }


def safetensors_header(size: int) -> bytes:
    """The length prefix and JSON header of a safetensors file of ``size`` bytes holding one U8 tensor
    (the fetch stage reads every shard's header)."""

    def header(payload: int) -> bytes:
        return json.dumps({"weight": {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]}}).encode()

    width = len(header(size))  # the longest it can be; padded with spaces, which JSON allows
    payload = size - 8 - width
    return struct.pack("<Q", width) + header(payload).ljust(width)


def write_folder(folder: Path, total: int, files: int) -> int:
    """Safetensors shards (one tensor of random bytes each) plus the small files an HF checkpoint has."""
    folder.mkdir(parents=True)
    block = os.urandom(64 * MiB)
    size = total // files
    for i in range(files):
        with (folder / f"model-{i + 1:05d}-of-{files:05d}.safetensors").open("wb") as f:
            head = safetensors_header(size)
            f.write(head)
            for off in range(len(head), size, len(block)):
                f.write(block[: min(len(block), size - off)])
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_bytes(os.urandom(2 * MiB))
    (folder / "manifest.json").write_text('{"complete": true}')
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def clear(client, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def location(server, role: str, prefix: str):
    from qjob_api.runner import RunnerS3

    return RunnerS3(
        field=f"spec.{role}.s3",
        endpoint=server.endpoint,
        region=server.region,
        bucket=BUCKET,
        prefix=prefix,
        credentials_env=f"QJOB_S3_{role.upper()}",
    )


def bench_upload(server, folder: Path, size: int, repeats: int) -> dict:
    from qjob_runner.storage import ObjectStore

    plain_client = server.client()  # boto3 defaults, as a user's script would have them

    def ours(prefix):
        ObjectStore(location(server, "output", prefix)).upload_folder(folder, prefix)

    def plain(prefix):
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                plain_client.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(folder).as_posix()}")

    seconds: dict[str, list[float]] = {"ours": [], "plain": []}
    for r in range(repeats):
        order = [("ours", ours), ("plain", plain)] if r % 2 == 0 else [("plain", plain), ("ours", ours)]
        for name, fn in order:
            prefix = f"upload/{name}-{r}"
            t = time.perf_counter()
            fn(prefix)
            seconds[name].append(time.perf_counter() - t)
            clear(plain_client, prefix)  # the server's disk holds one copy at a time
            print(
                f"upload {name} #{r}: {seconds[name][-1]:.2f} s, {size / MiB / seconds[name][-1]:.0f} MiB/s", flush=True
            )
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "bytes": size,
        "seconds": seconds,
        "median_seconds": med,
        "median_mib_per_s": {k: round(size / MiB / v, 1) for k, v in med.items()},
        "ratio_ours_over_plain": round(med["plain"] / med["ours"], 3),
        "goal": ">= 0.9",
    }


def runner_config(stage: str, server, model_prefix: str, cache: Path | None, calib: Path, out: Path, **cache_role):
    from qjob_api.runner import RunnerConfig

    model = {"s3": location(server, "model", model_prefix).model_dump(), "task": "causal-lm", "dtype": "float32"}
    if cache is not None:
        model.update(cacheDir=str(cache), **cache_role)
    return RunnerConfig.model_validate(
        {
            "job": "bench",
            "stage": stage,
            "model": model,
            "quantization": {"format": "fp8"},
            "calibration": {"dataset": {"path": str(calib)}, "samples": 16, "sequenceLength": 64, "batchSize": 4},
            "evaluation": {"enabled": False},
            "outputDir": str(out),
        }
    )


def fetched(cache: Path) -> int:
    [ref] = (cache / "refs").glob("*.json")
    return json.loads(ref.read_text())["bytesFetched"]


def bench_fetch(server, folder: Path, size: int, work: Path, calib: Path) -> dict:
    """First job, second job, and a retry after a download interrupted half-way."""
    from qjob_runner import run

    client = server.client()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), BUCKET, f"models/big/{p.relative_to(folder).as_posix()}")
    cache = work / "cache"
    out = {}
    t = time.perf_counter()
    first = run(runner_config("fetch", server, "models/big", cache, calib, work / "o1"))
    assert first.outcome == "Succeeded", first.message
    out["first_job"] = {"bytes": fetched(cache), "seconds": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    second = run(runner_config("fetch", server, "models/big", cache, calib, work / "o2"))
    assert second.outcome == "Succeeded", second.message
    out["second_job"] = {"bytes": fetched(cache), "seconds": round(time.perf_counter() - t, 2)}
    # A retry of a fetch that died half-way: the entry is back to .partial with half the shards.
    [entry] = [p for p in (cache / "s3").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    partial = entry.with_name(entry.name + ".partial")
    entry.rename(partial)
    shards = sorted(partial.glob("*.safetensors"))
    for p in shards[len(shards) // 2 :]:
        p.unlink()
    lost = size - sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    t = time.perf_counter()
    retry = run(runner_config("fetch", server, "models/big", cache, calib, work / "o3"))
    assert retry.outcome == "Succeeded", retry.message
    out["retry_after_interrupted_download"] = {
        "bytes": fetched(cache),
        "bytes_missing_before_retry": lost,
        "seconds": round(time.perf_counter() - t, 2),
    }
    # A retry of a GPU stage after a finished fetch reads the cache: measured in bench_gpu_wait.
    out["shared_cache"] = bench_shared(server, work, calib)
    out["goal"] = "second job 0 bytes (also in another namespace); retry only the missing bytes"
    return out


def bench_shared(server, work: Path, calib: Path) -> dict:
    """One job in each of two namespaces through the shared cache: its fill, then its waiting
    fetch stage on the same (here: not read-only) folder."""
    from qjob_runner import run

    shared, out = work / "shared", {}
    for namespace in ("a", "b"):
        record = f"fill-{namespace}"
        t = time.perf_counter()
        fill = run(runner_config("fetch", server, "models/big", shared, calib, work / f"{record}-o",
                                 cacheRole="fill", fillRecord=record))  # fmt: skip
        assert fill.outcome == "Succeeded", fill.message
        filled = time.perf_counter() - t
        wait = run(runner_config("fetch", server, "models/big", shared, calib, work / f"wait-{namespace}-o",
                                 cacheRole="wait", fillRecord=record))  # fmt: skip
        assert wait.outcome == "Succeeded", wait.message
        out[f"namespace_{namespace}"] = {
            "fill_bytes": json.loads((shared / "fills" / f"{record}.json").read_text())["bytesFetched"],
            "fill_seconds": round(filled, 2),
            "waiting_fetch_stage_seconds": round(time.perf_counter() - t - filled, 2),
        }
    return out


def bench_gpu_wait(server, work: Path, calib: Path, pad: int) -> dict:
    """resolve + load + data seconds of the quantize stage (what a GPU pod holds its GPUs for
    before calibrating): downloading the model itself, against the cache the fetch stage filled."""
    from qjob_dev.tiny_models import make_tiny_llama
    from qjob_runner import run

    model = make_tiny_llama(work / "tiny")
    (model / "extra").mkdir()
    with (model / "extra" / "padding.dat").open("wb") as f:  # downloaded with the model, never loaded
        block = os.urandom(64 * MiB)
        for off in range(0, pad, len(block)):
            f.write(block[: min(len(block), pad - off)])
    client = server.client()
    for p in sorted(model.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), BUCKET, f"models/tiny/{p.relative_to(model).as_posix()}")
    model_bytes = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())

    def before_calibration(result) -> float:
        return round(sum(result.step_seconds.get(s, 0.0) for s in ("resolve", "load", "data")), 2)

    os.environ["QJOB_MODEL_CACHE"] = str(work / "pod-cache")  # the GPU pod's own scratch volume
    itself = run(runner_config("quantize", server, "models/tiny", None, calib, work / "q1"))
    assert itself.outcome == "Succeeded", itself.message
    cache = work / "shared-cache"
    fetch = run(runner_config("fetch", server, "models/tiny", cache, calib, work / "f"))
    assert fetch.outcome == "Succeeded", fetch.message
    cached = run(runner_config("quantize", server, "models/tiny", cache, calib, work / "q2"))
    assert cached.outcome == "Succeeded", cached.message
    retry = run(runner_config("quantize", server, "models/tiny", cache, calib, work / "q3"))
    assert retry.outcome == "Succeeded", retry.message
    bytes_in = {
        name: json.loads((work / d / "manifest.json").read_text())["metrics"]["modelBytesFetched"]
        for name, d in (("itself", "q1"), ("cached", "q2"), ("retry", "q3"))
    }
    return {
        "model_bytes": model_bytes,
        "gpu_pod_downloads_itself": {
            "seconds_before_calibration": before_calibration(itself),
            "resolve_seconds": round(itself.step_seconds["resolve"], 2),
            "bytes_fetched_by_gpu_pod": bytes_in["itself"],
        },
        "fetch_stage_then_gpu_pod": {
            "fetch_stage_seconds_no_gpu": round(fetch.step_seconds["fetch"], 2),
            "seconds_before_calibration": before_calibration(cached),
            "resolve_seconds": round(cached.step_seconds["resolve"], 2),
            "bytes_fetched_by_gpu_pod": bytes_in["cached"],
        },
        "gpu_stage_retry_bytes_fetched": bytes_in["retry"],
        "note": "CPU run: load/data of a 2-layer model take well under a second; the difference is the download",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="artifact size (default 4 GiB)")
    parser.add_argument("--files", type=int, default=4, help="safetensors shards (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pad-gib", type=float, default=1.0, help="extra bytes in the model folder of part 3")
    parser.add_argument("--workdir", help="scratch folder (default: a temp dir, removed afterwards)")
    args = parser.parse_args()

    from qjob_dev.tiny_models import pydoc_paragraphs, write_jsonl

    with s3_scratch(args.workdir, "qjob-model-supply-", roles=("MODEL", "OUTPUT")) as (work, server):
        folder = work / "artifact"
        size = write_folder(folder, int(args.gib * (1 << 30)), args.files)
        calib = write_jsonl(work / "calib.jsonl", pydoc_paragraphs()[:64])
        import boto3
        import botocore

        results = {
            **measured_on(),
            "boto3": boto3.__version__,
            "botocore": botocore.__version__,
            "upload": bench_upload(server, folder, size, args.repeats),
        }
        print(json.dumps(results["upload"], indent=2), flush=True)
        results["fetch"] = bench_fetch(server, folder, size, work, calib)
        print(json.dumps(results["fetch"], indent=2), flush=True)
        results["gpu_wait"] = bench_gpu_wait(server, work, calib, int(args.pad_gib * (1 << 30)))
        print(json.dumps(results["gpu_wait"], indent=2), flush=True)
        report_results(RESULTS, results, not_shown=("upload", "fetch", "gpu_wait"))  # printed as they came


if __name__ == "__main__":
    main()
