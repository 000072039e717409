"""The runner: named, timed steps over one RunContext; failures mapped to exit codes.

``run(config) -> RunnerResult`` is the Python entry point (``qjob run --local`` calls it);
``qjob_runner.cli`` wraps it for the container.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qjob_api.runner import REUSE_STAGE, ExitCode, RunnerConfig, RunnerResult

from .artifacts import RESULT, Staging, atomic_write_text, clean_stale_staging
from .context import Paths, RunContext
from .errors import InvalidConfig, RunnerError, classify
from .ranks import Ranks, leave
from .reporting import Reporter, make_reporter
from .versions import library_versions

log = logging.getLogger("qjob_runner")


@dataclass(frozen=True)
class Step:
    name: str  # RunnerReport.step value
    run: Callable[[RunContext], None]
    weight: float  # share of the stage's progress bar


def _plans():
    from . import modelcache, ranks, reuse, storage
    from .steps import build, data, evaluate, export, inspect, load, quantize, report, resolve, serving

    def preflight(ctx: RunContext) -> None:
        storage.preflight(ctx)
        resolve.run(ctx)
        if not ctx.config.is_build:
            export.check_available(ctx)
            quantize.check_ranks(ctx)

    quantize_plan = [
        Step("rendezvous", lambda ctx: ranks.join(ctx.ranks), 1),
        Step("resolve", preflight, 2),
        Step("load", load.run, 8),
        Step("data", data.run, 3),
        Step("baseline", evaluate.run_baseline, 7),
        Step("quantize", quantize.run, 45),
        Step("evaluate", evaluate.run, 10),
        Step("export", export.run, 20),
        Step("serving", serving.run, 1),
        Step("report", report.run, 5),
    ]
    build_plan = [Step("resolve", preflight, 2), Step("build", build.run, 93), Step("report", report.run, 5)]
    fetch_plan = [Step(modelcache.FETCH_STAGE, modelcache.run, 100)]
    inspect_plan = [Step("inspect", inspect.run, 100)]
    reuse_plan = [Step(REUSE_STAGE, reuse.run, 100)]
    return quantize_plan, build_plan, fetch_plan, inspect_plan, reuse_plan


#: The step only a process among torchrun ranks runs (it joins the others first).
RANKS_ONLY_STEPS = frozenset({"rendezvous"})
#: Steps rank 0 alone runs: it checks the files it wrote and publishes them.
MAIN_RANK_STEPS = frozenset({"serving", "report"})


def plan_for(config: RunnerConfig, ranks: Ranks | None = None) -> list[Step]:
    quantize_plan, build_plan, fetch_plan, inspect_plan, reuse_plan = _plans()
    if config.stage == "fetch":
        return fetch_plan
    if config.stage == REUSE_STAGE:
        return reuse_plan
    if config.is_inspect:
        return inspect_plan
    if config.is_build:
        return build_plan
    ranks = ranks or Ranks()
    skip = (set() if ranks.distributed else RANKS_ONLY_STEPS) | (set() if ranks.is_main else MAIN_RANK_STEPS)
    return [s for s in quantize_plan if s.name not in skip]


def refuse_multi_rank(config: RunnerConfig, ranks: Ranks) -> None:
    """Only the quantize stage runs as several ranks (a multi-pod plan)."""
    if ranks.distributed and (config.stage != "quantize" or config.is_build):
        raise InvalidConfig(
            f"the {config.stage} stage runs in one process; it was started as {ranks.describe()}",
            "only the quantize stage of a multi-pod plan runs under torchrun",
        )


def staging_destination(config: RunnerConfig, paths: Paths) -> Path:
    if config.engine is not None:
        return paths.output_dir / "engines" / config.engine.architecture.value
    return paths.output_dir


def result_path(config: RunnerConfig, paths: Paths, ranks: Ranks | None = None) -> Path:
    if ranks is not None and not ranks.is_main:  # rank 0's result is the stage's
        return paths.work_dir / f"result-{config.stage}-rank{ranks.rank}.json"
    return paths.output_dir / (RESULT if config.stage == "quantize" else f"result-{config.stage}.json")


def stage_folder(config: RunnerConfig, paths: Paths, ranks: Ranks) -> Staging:
    """Rank 0 stages next to the output; the other ranks get a private folder that is never
    published (ModelOpt's export creates its folder on every rank, and writes only on rank 0)."""
    if not ranks.is_main:
        return Staging(Path(tempfile.gettempdir()) / f"qjob-rank{ranks.rank}")
    dest = staging_destination(config, paths)
    clean_stale_staging(dest)
    return Staging(dest)


PREBUILT_EXTENSIONS_ENV = "QJOB_PREBUILT_EXTENSIONS"


def prepare_extensions() -> None:
    """Make the image's prebuilt ModelOpt CUDA extensions usable under readOnlyRootFilesystem.

    torch's extension loader takes a lock file inside the build folder, so it must be writable;
    the operator's pods have a read-only root filesystem and a writable /tmp. The Dockerfile
    builds into ``$QJOB_PREBUILT_EXTENSIONS`` and points ``TORCH_EXTENSIONS_DIR`` under /tmp; we
    copy the builds there once (mtimes kept, so ninja finds them up to date: no recompile).
    """
    import shutil

    src, dst = os.environ.get(PREBUILT_EXTENSIONS_ENV), os.environ.get("TORCH_EXTENSIONS_DIR")
    if not src or not dst or not Path(src).is_dir() or Path(src).resolve() == Path(dst).resolve():
        return
    try:
        if not Path(dst).exists():
            shutil.copytree(src, dst, copy_function=shutil.copy2)
            log.info("copied prebuilt ModelOpt extensions %s -> %s", src, dst)
    except OSError as exc:
        log.warning("cannot copy prebuilt extensions to %s (%s); ModelOpt may compile them", dst, exc)


def _threads() -> None:
    """Share the machine politely: torch on CPU uses every core by default."""
    try:
        import torch

        n = int(os.environ.get("QJOB_TORCH_THREADS", "0"))
        if n > 0:
            torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass


def run(config: RunnerConfig, reporter: Reporter | None = None, result_file: str | Path | None = None) -> RunnerResult:
    """Run one stage of a QuantizationJob; never raises for a failure it understands."""
    _threads()
    prepare_extensions()
    paths = Paths.from_config(config)
    ranks = Ranks.from_env()
    if reporter is None:  # rank 0 reports for all ranks
        reporter = make_reporter(config.reporting, config.stage) if ranks.is_main else Reporter(config.stage)
    ctx = RunContext(config=config, paths=paths, reporter=reporter, ranks=ranks)
    steps = plan_for(config, ranks)
    total = sum(s.weight for s in steps)
    done = 0.0
    failed_step: str | None = None
    error: RunnerError | None = None
    started = time.monotonic()
    try:
        refuse_multi_rank(config, ranks)
        ctx.staging = stage_folder(config, paths, ranks)
        for step in steps:
            failed_step = step.name
            elapsed = time.monotonic() - started
            eta = elapsed / done * (total - done) if done else None
            reporter.update(step=step.name, percent=100 * done / total, message=f"{step.name} started", eta_seconds=eta)
            t0 = time.monotonic()
            step.run(ctx)
            ctx.step_seconds[step.name] = time.monotonic() - t0
            reporter.step_done(step.name, ctx.step_seconds[step.name])
            done += step.weight
            log.info("step %s done in %.2f s", step.name, ctx.step_seconds[step.name])
        failed_step = None
        reporter.update(step="report", percent=100, message="succeeded", eta_seconds=0)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a result
        error = classify(RuntimeError("interrupted") if isinstance(exc, KeyboardInterrupt) else exc)
        if not isinstance(exc, RunnerError):
            log.exception("step %s failed", failed_step)
        else:
            log.error("step %s failed: %s", failed_step, error)
        reporter.update(message=f"failed in {failed_step}: {error}")
        for t in ctx.background:  # a retry resumes from the calibrated state kept for this case
            if hasattr(t, "persist"):
                t.persist()
    finally:
        for t in ctx.background:
            t.join(timeout=600)
        if ctx.staging is not None:  # never publish a half-done stage
            ctx.staging.discard()
        _release(ctx)
        leave(ranks, succeeded=error is None)
    result = RunnerResult(
        outcome="Failed" if error else "Succeeded",
        stage=config.stage,
        exit_code=int(error.exit_code) if error else int(ExitCode.OK),
        reason=error.reason if error else None,
        message=str(error) if error else "; ".join(ctx.notes) or None,
        failed_step=failed_step if error else None,
        artifacts=ctx.artifacts if not error else [],
        quality=ctx.quality,
        step_seconds={k: round(v, 3) for k, v in ctx.step_seconds.items()},
        versions=library_versions(),
        model_size=ctx.model_size,
        work=ctx.work,
        reuse=ctx.reuse,
    )
    reporter.close()
    target = Path(result_file) if result_file else result_path(config, paths, ranks)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, result.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    except OSError as exc:
        log.warning("cannot write result file %s: %s", target, exc)
    return result


def _release(ctx: RunContext) -> None:
    if ctx.model_hashes is not None:
        ctx.model_hashes.close()
    ctx.model = None
    ctx.data.batches = []
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
