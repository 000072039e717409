"""The reuse stage on a multi-GB checkpoint: what a job that reuses identical work costs instead of
a GPU run.

An earlier job's output (``--gib`` of safetensors shards plus the small files, its manifest written
by the runner's own registration) lies on a folder (PVC) and under an S3 prefix (versitygw on
loopback). The real runner's reuse stage (``qjob_runner.reuse``) resolves the new job's work inputs
(a PVC tiny model's file hashes, the calibration texts, its library versions), checks every file's
sha256 against the manifest and the status, and publishes the files into the new job's output:
PVC -> PVC (hard links) and S3 -> S3 (download, check, upload, manifest last). GPU seconds: none
(the stage requests no GPU).

    python benchmarks/reuse.py [--gib 4] [--files 4] [--repeats 3] [--workdir DIR]

Prints the figures and writes them to benchmarks/results/reuse.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from model_supply import BUCKET, MiB, clear, location, measured_on, s3_scratch, write_folder
from qjob_dev.bench import RESULTS_DIR, report_results

RESULTS = RESULTS_DIR / "reuse.json"


def earlier_output(folder: Path, gib: float, files: int) -> tuple[int, list[dict]]:
    """A finished job's output: an hf checkpoint folder and the manifest the runner writes for it."""
    from qjob_runner.artifacts import describe

    hf = folder / "hf"
    write_folder(hf, int(gib * (1 << 30)), files)
    (hf / "manifest.json").unlink()
    size, digest, listed = describe(hf)
    entry = {"name": "hf", "path": "hf", "kind": "checkpoint", "format": "hf", "sizeBytes": size, "sha256": digest,
             "files": listed}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps({"job": "a", "stage": "quantize", "artifacts": [entry]}))
    return size, [
        {"kind": "checkpoint", "format": "hf", "uri": "URI/hf", "sizeBytes": size, "sha256": digest},
        {"kind": "manifest", "format": "json", "uri": "URI/manifest.json"},
    ]


def reuse_config(model: Path, calib: Path, out: Path, uri: str, candidate: dict, **extra):
    from qjob_api.runner import RunnerConfig
    from qjob_api.v1alpha1 import QuantizationJobSpec
    from qjob_api.work import recipe_of

    spec = QuantizationJobSpec.model_validate(
        {
            "model": {"pvc": {"claimName": "models", "path": "tiny"}},
            "quantization": {"format": "fp8"},
            "calibration": {"dataset": {"pvc": {"claimName": "data"}}, "samples": 16, "sequenceLength": 64},
            "evaluation": {"enabled": False},
            "output": {"pvc": {"claimName": "artifacts"}},
        }
    )
    return RunnerConfig.model_validate(
        {
            "job": "b",
            "stage": "reuse",
            "model": {"path": str(model)},
            "quantization": {"format": "fp8"},
            "calibration": {"dataset": {"path": str(calib)}, "samples": 16, "sequenceLength": 64},
            "evaluation": {"enabled": False},
            "outputDir": str(out),
            "outputUri": uri,
            "workRecipe": recipe_of(spec).to_api(),
            "reuse": {"candidates": [candidate]},
            **extra,
        }
    )


def timed_reuse(config) -> tuple[float, object]:
    from qjob_runner import run

    t = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - t
    assert result.reuse and result.reuse.reason == "Reused", result.reuse
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="checkpoint size (default 4 GiB)")
    parser.add_argument("--files", type=int, default=4, help="safetensors shards (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="scratch folder (default: a temp dir, removed afterwards)")
    args = parser.parse_args()

    from qjob_api.work import work_key
    from qjob_dev.tiny_models import make_tiny_llama, pydoc_paragraphs, write_jsonl
    from qjob_runner import run
    from qjob_runner.storage import ObjectStore

    with s3_scratch(args.workdir, "qjob-reuse-", roles=("OUTPUT", "REUSE0")) as (work, server):
        client = server.client()
        model = make_tiny_llama(work / "tiny")
        calib = write_jsonl(work / "calib.jsonl", pydoc_paragraphs()[:64])
        a = work / "pvc" / "ml" / "a"
        size, status_artifacts = earlier_output(a, args.gib, args.files)

        def candidate(base: str, key: str, **where) -> dict:
            arts = [{**x, "uri": x["uri"].replace("URI", base)} for x in status_artifacts]
            return {"job": {"namespace": "ml", "name": "a", "uid": "uid-a"}, "workKey": key, "outputUri": base,
                    "artifacts": arts, **where}  # fmt: skip

        # The new job's inputs, as the stage resolves them (a first run with a key that cannot match).
        probe = run(reuse_config(model, calib, work / "probe", "pvc://x/probe", candidate("pvc://x/a", "none",
                                 outputDir=str(a))))  # fmt: skip
        key = work_key(reuse_config(model, calib, work / "p", "p", candidate("p", "k")).work_recipe, probe.work)

        pvc: list[float] = []
        for r in range(args.repeats):
            out = work / "pvc" / "ml" / f"b{r}"
            seconds, _ = timed_reuse(
                reuse_config(model, calib, out, f"pvc://x/b{r}", candidate("pvc://x/a", key, outputDir=str(a)))
            )
            pvc.append(seconds)
            shutil.rmtree(out)
            print(f"reuse PVC -> PVC #{r}: {seconds:.2f} s ({size / MiB / seconds:.0f} MiB/s checked)", flush=True)

        old = location(server, "reuse0", "ml/a")
        old = old.model_copy(update={"credentials_env": "QJOB_S3_REUSE0"})
        ObjectStore(old).upload_folder(a, "ml/a")
        s3: list[float] = []
        for r in range(args.repeats):
            out_s3 = location(server, "output", f"ml/b{r}")
            cfg = reuse_config(
                model,
                calib,
                work / f"scratch{r}",
                f"s3://{BUCKET}/ml/b{r}",
                candidate(f"s3://{BUCKET}/ml/a", key, outputS3=old.model_dump()),
                outputS3=out_s3.model_dump(),
                workDir=str(work / f"work{r}"),
            )
            seconds, _ = timed_reuse(cfg)
            s3.append(seconds)
            clear(client, f"ml/b{r}")
            shutil.rmtree(work / f"scratch{r}", ignore_errors=True)
            print(f"reuse S3 -> S3 #{r}: {seconds:.2f} s ({size / MiB / seconds:.0f} MiB/s)", flush=True)

        results = {
            **measured_on(),
            "checkpoint_bytes": size,
            "gpu_seconds": 0,
            "pvc_to_pvc_seconds": pvc,
            "s3_to_s3_seconds": s3,
            "median_seconds": {"pvc_to_pvc": statistics.median(pvc), "s3_to_s3": statistics.median(s3)},
            "median_mib_per_s": {
                "pvc_to_pvc": round(size / MiB / statistics.median(pvc), 1),
                "s3_to_s3": round(size / MiB / statistics.median(s3), 1),
            },
        }
        report_results(RESULTS, results)


if __name__ == "__main__":
    main()
