"""qjob-runner: calibrate, quantize, export, build engines and measure quality from one config."""

from __future__ import annotations

__all__ = ["run", "RunContext"]


def run(config, **kwargs):
    """``run(RunnerConfig) -> RunnerResult`` (imported lazily: torch loads only when a job runs)."""
    from .pipeline import run as _run

    return _run(config, **kwargs)


def __getattr__(name):
    if name == "RunContext":
        from .context import RunContext

        return RunContext
    raise AttributeError(name)
