"""The runner as torchrun ranks (FSDP2) against the runner as one process, on the lent GPUs.

    PYTHONPATH=api:jobrunner:hack python benchmarks/multirank_gpu.py --out DIR
        [--shape 8b|1.1b|tiny] [--formats fp8[,nvfp4]] [--ranks N] [--samples 128] [--seq 512] [--batch 16]

Builds a Llama of the chosen shape from its config (random bf16 weights, ``runner_gpu.py``'s shape
table and model builder, run as its ``--child build_model``; kept under --work between calls),
then per format:

* ``single``: ``python -m qjob_runner`` on GPU 0 alone (``CUDA_VISIBLE_DEVICES=0``), the plain
  one-process path (``device_map``);
* ``ranks``: ``python -m qjob_runner.launch`` (the pod command of a multi-pod plan: torchrun's
  launcher, one runner per GPU) with N ranks on this host (N = visible GPUs; on one GPU the
  1-rank FSDP2 path, which still runs the sharded load, the process group, the amax all-reduce
  and the gathering export);

and compares the two exported checkpoints tensor by tensor: names, dtypes and shapes (must be
equal), the maximum relative difference of every scale tensor (``*_scale``: amax / format
maximum, so the same relative difference as the quantizer amax), how many quantized weights are
bit-identical; and wall time (process and runner steps) and the peak GPU memory used (nvidia-smi,
polled). ModelOpt's CUDA extensions are compiled once before the runs (into --work), so neither
run's calibration includes the compile. ``--shape tiny`` on a machine without GPUs is the CPU
dry run (2 gloo ranks, FP8).

Results: ``$OUT/multirank_gpu.json`` (rewritten after each run) and a summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from runner_gpu import SHAPES  # noqa: E402 - the shape table and model builder are runner_gpu's

RUN_LIMIT_S = 300  # one run must not eat the device call


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class GpuMemory:
    """Peak memory used per GPU while a run lasts (nvidia-smi every 0.5 s; no CUDA in this process)."""

    def __init__(self):
        self.peak: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                used = [int(x) for x in out.split()]
                self.peak = [max(a, b) for a, b in zip(self.peak or used, used, strict=True)]
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def build(shape: str, work: Path, samples: int) -> dict:
    """The model folder and calibration file, built once by runner_gpu.py's builder."""
    model, calib = work / "model", work / "calib.jsonl"
    if (model / "config.json").exists() and calib.exists():
        return {"reused": True}
    kwargs = {"shape": shape, "folder": str(model), "calib": str(calib), "samples": samples}
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "runner_gpu.py"), "--child", "build_model", json.dumps(kwargs)],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT_S,
    )
    line = next((ln for ln in p.stdout.splitlines()[::-1] if ln.startswith("QJOB_CHILD ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"model build failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return {**json.loads(line[len("QJOB_CHILD ") :])["result"], "build_s": time.perf_counter() - t}


EXTENSIONS = r"""
import json, time
t = time.time()
from modelopt.torch.quantization import extensions as e
getters = (e.get_cuda_ext, e.get_cuda_ext_fp8, e.get_cuda_ext_mx)
built = {f.__name__: f(raise_if_failed=False) is not None for f in getters}
print("QJOB_EXTENSIONS " + json.dumps({"seconds": time.time() - t, "built": built}))
"""


def build_extensions(work: Path) -> dict:
    """ModelOpt's CUDA extensions, compiled once into --work before the measured runs, so that
    neither run's calibration includes the compile (the image ships them prebuilt)."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(work / "torch_extensions")
    p = subprocess.run([sys.executable, "-c", EXTENSIONS], capture_output=True, text=True, timeout=RUN_LIMIT_S)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("QJOB_EXTENSIONS ")), None)
    return json.loads(line.split(" ", 1)[1]) if line else {"error": p.stderr[-1500:]}


def runner_config(work: Path, out: Path, fmt: str, args, on_gpu: bool) -> Path:
    cfg = {
        "job": f"multirank-{fmt}",
        "model": {"path": str(work / "model"), "dtype": "bfloat16" if on_gpu else "float32"},
        "quantization": {"format": fmt},
        "targetArchitectures": [],
        "calibration": {
            "dataset": {"path": str(work / "calib.jsonl")},
            "samples": args.samples,
            "sequenceLength": args.seq,
            "batchSize": args.batch,
        },
        "evaluation": {"enabled": False},
        "outputDir": str(out),
    }
    path = out.with_suffix(".json")
    path.write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(kind: str, config: Path, out: Path, ranks: int, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "QJOB_VERIFY_EXPORT": "0", "PYTHONUNBUFFERED": "1"}
    if kind == "single":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = [sys.executable, "-m", "qjob_runner", "--config", str(config)]
    else:
        env.update(NNODES="1", NPROC_PER_NODE=str(ranks), NODE_RANK="0", MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(free_port())
        env["QJOB_TERMINATION_LOG"] = str(out.with_suffix(".termination"))
        cmd = [sys.executable, "-m", "qjob_runner.launch", "--config", str(config)]
    t = time.perf_counter()
    with GpuMemory() as mem, log.open("w") as f:
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=RUN_LIMIT_S)
    wall = time.perf_counter() - t
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    metrics = manifest.get("metrics", {})
    return {
        "exit_code": p.returncode,
        "outcome": result.get("outcome"),
        "message": result.get("message"),
        "process_wall_s": wall,
        "step_seconds": result.get("stepSeconds"),
        "calibration_seconds": metrics.get("calibration_seconds"),
        "calibration": metrics.get("calibration"),
        "devices": metrics.get("devices"),
        "peak_gpu_used_mib": mem.peak,
        "log_tail": log.read_text(errors="replace")[-2500:] if p.returncode else "",
    }


def compare(single: Path, ranks: Path) -> dict:
    """Tensor by tensor, one at a time (two 8B checkpoints need not fit in memory together)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                out.update(dict.fromkeys(sf.keys(), f))  # noqa: SIM118
        return out

    a, b = index(single), index(ranks)
    report = {
        "tensors": len(a),
        "same_names": sorted(a) == sorted(b),
        "only_single": sorted(set(a) - set(b))[:10],
        "only_ranks": sorted(set(b) - set(a))[:10],
    }
    mismatched, scales, worst, identical_weights, weights = [], 0, (0.0, None), 0, 0
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            mismatched.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
            continue
        if name.endswith("_scale"):
            scales += 1
            rel = ((x.float() - y.float()).abs() / x.float().abs().clamp(min=1e-12)).max().item()
            if rel > worst[0]:
                worst = (rel, name)
        elif name.endswith(".weight") and x.element_size() == 1:
            weights += 1
            identical_weights += int(torch.equal(x.view(torch.uint8), y.view(torch.uint8)))
    report.update(
        dtype_shape_mismatches=mismatched[:10],
        same_dtypes_and_shapes=not mismatched and report["same_names"],
        scale_tensors=scales,
        max_relative_scale_difference=worst[0],
        worst_scale=worst[1],
        quantized_weights=weights,
        bit_identical_quantized_weights=identical_weights,
    )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 8b with GPUs, tiny without")
    ap.add_argument("--formats", default="fp8", help="comma-separated; nvfp4 needs a GPU")
    ap.add_argument("--ranks", type=int, default=0, help="default: the visible GPUs (2 gloo ranks on CPU)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", default=None, help="default /tmp/qjob-multirank/<shape>")
    ap.add_argument("--budget", type=float, default=360, help="seconds after which no further format starts")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    gpus = gpu_count()
    args.shape = args.shape or ("8b" if gpus else "tiny")
    ranks = args.ranks or gpus or 2
    work = Path(args.work or f"/tmp/qjob-multirank/{args.shape}")
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) / "multirank_gpu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "settings": {"shape": args.shape, "model": SHAPES[args.shape], "gpus": gpus, "ranks": ranks, **vars(args)},
        "runs": {},
    }

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1, default=str))

    t = started = time.perf_counter()
    results["build"] = build(args.shape, work, args.samples)
    print(f"model {args.shape} ready in {time.perf_counter() - t:.1f} s ({results['build']})", flush=True)
    if gpus:
        results["extensions"] = build_extensions(work)
        print(f"ModelOpt CUDA extensions: {results['extensions']}", flush=True)
    save()
    for fmt in [f for f in args.formats.split(",") if f]:
        if time.perf_counter() - started > args.budget:
            results.setdefault("skipped", []).append(fmt)
            print(f"{fmt}: skipped, --budget {args.budget:.0f} s spent", flush=True)
            continue
        entry = results["runs"].setdefault(fmt, {})
        for kind in ("single", "ranks"):
            out = work / f"{fmt}-{kind}"
            config = runner_config(work, out, fmt, args, on_gpu=gpus > 0)
            entry[kind] = run_one(kind, config, out, ranks, work / f"{fmt}-{kind}.log")
            print(
                f"{fmt} {kind}: exit {entry[kind]['exit_code']} in {entry[kind]['process_wall_s']:.1f} s, "
                f"calibration {entry[kind]['calibration_seconds']}, steps {entry[kind]['step_seconds']}, "
                f"peak GPU MiB {entry[kind]['peak_gpu_used_mib']}",
                flush=True,
            )
            save()
        if all(entry[k]["exit_code"] == 0 for k in ("single", "ranks")):
            entry["comparison"] = compare(work / f"{fmt}-single" / "hf", work / f"{fmt}-ranks" / "hf")
            save()

    print("\nformat  ranks  single s  ranks s  calib 1/N s  same dtypes+shapes  max rel scale diff  identical weights")
    for fmt, entry in results["runs"].items():
        if not {"single", "ranks"} <= set(entry):
            continue
        c = entry.get("comparison", {})
        print(
            f"{fmt:7} {ranks:5}  {entry['single']['process_wall_s']:8.1f}  {entry['ranks']['process_wall_s']:7.1f}  "
            f"{entry['single']['calibration_seconds'] or 0:.2f}/{entry['ranks']['calibration_seconds'] or 0:.2f}  "
            f"{c.get('same_dtypes_and_shapes')!s:18}  {c.get('max_relative_scale_difference', float('nan')):.3g}  "
            f"{c.get('bit_identical_quantized_weights')}/{c.get('quantized_weights')}"
        )
    print(f"saved {out_path}")


if __name__ == "__main__":
    main()
