"""``qjob``: the user's command line.

  qjob run -f job.yaml --local     run a job's runner pipeline on this machine (no Kubernetes)
  qjob status NAME [-n NS]         phase, progress, stages, artifacts of a QuantizationJob
  qjob wait NAME [-n NS]           block until Succeeded (exit 0) or Failed (exit 1); 2 on timeout

``wait`` is for automation (CI pipelines, scripts): its exit code says how the job ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from qjob_api.runner import RunnerConfig
from qjob_api.v1alpha1 import GROUP, KIND, PLURAL, TERMINAL_PHASES, VERSION, QuantizationJob
from qjob_operator.builders import CACHE_ROOT, CALIBRATION_ROOT, PVC_ROOT, QuantizationJobRef, build_runner_config
from qjob_operator.config import OperatorConfig
from qjob_operator.fetch import MODEL_CACHE_ROOT
from qjob_operator.plan import plan_stages

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2


# ----------------------------------------------------------------------------------- local run


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def local_runner_config(
    job: QuantizationJob,
    stage_name: str,
    volumes: dict[str, Path],
    config_maps: dict[str, dict[str, str]],
    workdir: Path,
) -> RunnerConfig:
    """The RunnerConfig the operator would mount, with in-pod paths mapped to this machine:
    PVC claims (the model cache's too) to ``volumes[claim]`` (default ``workdir/pvc/<claim>``), calibration ConfigMaps
    (from the same manifest file) to files under ``workdir``, reporting to a local file."""
    ref = QuantizationJobRef(job.metadata.get("name", "local"), job.metadata.get("namespace", "default"), "local")
    operator_config = OperatorConfig()
    stages = {s.name: s for s in plan_stages(job.spec, operator_config)}
    if stage_name not in stages:
        raise SystemExit(f"qjob: no stage {stage_name!r} in this job; it has: {', '.join(stages)}")
    config = build_runner_config(ref, job.spec, stages[stage_name], operator_config)

    def local(path: str | None) -> str | None:
        if not path:
            return path
        if path.startswith(PVC_ROOT + "/"):
            claim, _, rest = path[len(PVC_ROOT) + 1 :].partition("/")
            root = volumes.get(claim, workdir / "pvc" / claim)
            return str(root / rest) if rest else str(root)
        if path.startswith(CALIBRATION_ROOT + "/"):
            cm = job.spec.calibration.dataset.config_map
            data = config_maps.get(cm.name)
            if data is None or cm.key not in data:
                raise SystemExit(
                    f"qjob: calibration ConfigMap {cm.name!r} (key {cm.key!r}) is not in the manifest "
                    "file: add the ConfigMap document to it, or use a dataset on a PVC with --volume"
                )
            target = workdir / "calibration" / cm.key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[cm.key])
            return str(target)
        if path.startswith(CACHE_ROOT + "/"):  # the pod's scratch volume (e.g. an S3 output's staging)
            return str(workdir / "cache" / path[len(CACHE_ROOT) + 1 :])
        if path == MODEL_CACHE_ROOT:  # the shared model cache claim
            claim = stages[stage_name].cache.claim
            return str(volumes.get(claim, workdir / "pvc" / claim))
        return path

    return config.model_copy(
        update={
            "model": config.model.model_copy(
                update={"path": local(config.model.path), "cache_dir": local(config.model.cache_dir)}
            ),
            "calibration": config.calibration.model_copy(
                update={
                    "dataset": config.calibration.dataset.model_copy(
                        update={"path": local(config.calibration.dataset.path)}
                    )
                }
            ),
            "output_dir": local(config.output_dir),
            "reporting": config.reporting.model_copy(update={"kind": "file"}),
        }
    )


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        print("qjob run: only --local is supported; in a cluster, `kubectl apply -f` the manifest", file=sys.stderr)
        return 2
    docs = _documents(Path(args.file))
    jobs = [d for d in docs if d.get("kind") == KIND]
    if len(jobs) != 1:
        print(f"qjob run: expected one {KIND} in {args.file}, found {len(jobs)}", file=sys.stderr)
        return 2
    job = QuantizationJob.model_validate(jobs[0])
    config_maps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    volumes = {}
    for item in args.volume:
        claim, sep, directory = item.partition("=")
        if not sep:
            print(f"qjob run: --volume takes CLAIM=DIR, got {item!r}", file=sys.stderr)
            return 2
        volumes[claim] = Path(directory).resolve()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qjob-local-")).resolve()
    config = local_runner_config(job, args.stage, volumes, config_maps, workdir)
    print(
        f"qjob: running stage {args.stage} of {job.metadata.get('name')} locally; artifacts in {config.output_dir}",
        file=sys.stderr,
    )
    from qjob_runner.pipeline import run  # the runner's heavy imports only when running locally

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # Libraries print progress to stdout; keep stdout for the result JSON (scripts parse it).
    with contextlib.redirect_stdout(sys.stderr):
        result = run(config)
    print(result.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    return result.exit_code


# ------------------------------------------------------------------------------- status & wait


async def _get(name: str, namespace: str) -> dict[str, Any]:
    from kubernetes_asyncio import client, config

    await config.load_kube_config()
    async with client.ApiClient() as api:
        return await client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _namespace(args: argparse.Namespace) -> str:
    """-n, else the kubeconfig context's namespace, else default (as kubectl does)."""
    if args.namespace:
        return args.namespace
    from kubernetes_asyncio import config

    try:
        _, active = config.list_kube_config_contexts()
        return active["context"].get("namespace") or "default"
    except (config.ConfigException, OSError, KeyError, TypeError):
        return "default"


def format_status(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    progress = status.get("progress") or {}
    lines = [
        f"{obj['metadata']['namespace']}/{obj['metadata']['name']}: {status.get('phase', 'Pending')}"
        + (f" ({status['reason']})" if status.get("reason") else ""),
    ]
    if status.get("message"):
        lines.append(f"  {status['message']}")
    lines.append(
        f"  progress: {progress.get('percent', 0)}%"
        + (f" in {progress['stage']}" if progress.get("stage") else "")
        + (f", about {progress['etaSeconds']}s left" if progress.get("etaSeconds") else "")
    )
    for stage in status.get("stages") or []:
        where = f" on {stage['node']} ({stage.get('gpuProduct') or '?'})" if stage.get("node") else ""
        lines.append(
            f"  stage {stage['name']}: {stage.get('phase')}{where}, attempts {stage.get('attempts', 0)}"
            + (f" [{stage['reason']}]" if stage.get("reason") and stage.get("phase") != "Succeeded" else "")
        )
    for artifact in status.get("artifacts") or []:
        arch = f" [{artifact['architecture']}]" if artifact.get("architecture") else ""
        lines.append(f"  artifact {artifact['kind']}/{artifact['format']}{arch}: {artifact['uri']}")
        for rt in artifact.get("runtimes") or []:
            gpus = ", ".join(rt.get("architectures") or [])
            lines.append(f"    serve with {rt['name']} {rt['minVersion']}+ on {gpus}: {rt['command']}")
    if quality := status.get("quality"):
        lines.append(f"  quality: {quality['metric']} {quality.get('baseline')} -> {quality.get('quantized')}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    obj = asyncio.run(_get(args.name, _namespace(args)))
    print(json.dumps(obj.get("status") or {}, indent=2) if args.output == "json" else format_status(obj))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    namespace = _namespace(args)
    deadline = time.monotonic() + args.timeout
    last = None
    while True:
        obj = asyncio.run(_get(args.name, namespace))
        status = obj.get("status") or {}
        percent = (status.get("progress") or {}).get("percent", 0)
        line = f"{status.get('phase', 'Pending')} {percent}% {status.get('reason') or ''}"
        if line != last and not args.quiet:
            print(f"{args.name}: {line}".rstrip(), file=sys.stderr)
            last = line
        if status.get("phase") in TERMINAL_PHASES:
            print(format_status(obj))
            return EXIT_SUCCEEDED if status["phase"] == "Succeeded" else EXIT_FAILED
        if time.monotonic() > deadline:
            print(
                f"qjob wait: {args.name} still {status.get('phase', 'Pending')} after {args.timeout}s", file=sys.stderr
            )
            return EXIT_TIMEOUT
        time.sleep(args.interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qjob", description="QuantizationJob command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a QuantizationJob's runner pipeline locally")
    run.add_argument("-f", "--file", required=True, help="manifest with one QuantizationJob (and its ConfigMaps)")
    run.add_argument("--local", action="store_true", help="run on this machine, without Kubernetes")
    run.add_argument("--stage", default="quantize", help="stage to run (default quantize; or build-<arch>)")
    run.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="CLAIM=DIR",
        help="local folder standing in for a PersistentVolumeClaim (repeatable)",
    )
    run.add_argument("--workdir", help="folder for unmapped claims and calibration files (default: a temp dir)")
    run.set_defaults(func=cmd_run)

    for name, func, text in (
        ("status", cmd_status, "show a QuantizationJob's status"),
        ("wait", cmd_wait, "wait until a QuantizationJob finishes; exit 0 Succeeded, 1 Failed, 2 timeout"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
        p.add_argument("-n", "--namespace")
        if name == "status":
            p.add_argument("-o", "--output", choices=["text", "json"], default="text")
        else:
            p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds (default 24h)")
            p.add_argument("--interval", type=float, default=2.0, help="poll interval in seconds")
            p.add_argument("--quiet", "-q", action="store_true", help="print only the final status")
        p.set_defaults(func=func)

    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
