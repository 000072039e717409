"""``python -m qjob_runner.launch``: torchrun for one pod of a multi-pod stage, with the runner's
exit codes and termination message.

torchrun itself exits 1 whatever its workers exited with, and each of its workers would write the
pod's one termination message. Here torchrun's own launcher (``torch.distributed.run``, static
rendezvous at rank 0's address, no restarts: a rank that fails fails the gang) runs one runner
per GPU from the operator's environment (``NNODES``, ``NPROC_PER_NODE``, ``NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); each runner leaves its result in a private folder, and the
pod ends with the exit code and message of the rank that failed first (or of this pod's first
rank when all succeeded), so the operator's podFailurePolicy (OOM -> re-plan, bad config -> no
retry) works as for one pod. A rendezvous that cannot complete is RendezvousFailed (exit 77).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from qjob_api.runner import ExitCode, RunnerResult

from .cli import RANK_RESULTS_ENV, write_termination_message
from .errors import RendezvousFailed, RunnerError
from .ranks import rendezvous_timeout

log = logging.getLogger("qjob_runner.launch")


def torchrun_args(env: os._Environ | dict[str, str], argv: list[str]) -> list[str]:
    return [
        f"--nnodes={env.get('NNODES', '1')}",
        f"--nproc-per-node={env.get('NPROC_PER_NODE', '1')}",
        f"--node-rank={env.get('NODE_RANK', '0')}",
        f"--master-addr={env.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master-port={env.get('MASTER_PORT', '29500')}",
        f"--rdzv-conf=timeout={int(rendezvous_timeout().total_seconds())}",
        "--max-restarts=0",
        "--monitor-interval=1",
        "-m",
        "qjob_runner",
        *argv,
    ]


def rank_result(folder: Path, rank: int) -> RunnerResult | None:
    path = folder / f"{rank}.json"
    try:
        return RunnerResult.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def failed(code: int, reason_error: RunnerError | None, message: str) -> RunnerResult:
    return RunnerResult(
        outcome="Failed",
        stage="quantize",
        exit_code=code,
        reason=reason_error.reason if reason_error else None,
        message=message,
        failed_step="rendezvous" if isinstance(reason_error, RendezvousFailed) else None,
    )


def launch(argv: list[str], env: os._Environ | dict[str, str] = os.environ) -> tuple[int, RunnerResult]:
    results = Path(tempfile.mkdtemp(prefix="qjob-ranks-"))
    os.environ[RANK_RESULTS_ENV] = str(results)  # the workers inherit it
    try:
        return _launch(argv, env, results)
    finally:
        os.environ.pop(RANK_RESULTS_ENV, None)
        shutil.rmtree(results, ignore_errors=True)


def _launch(argv: list[str], env: os._Environ | dict[str, str], results: Path) -> tuple[int, RunnerResult]:
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args(torchrun_args(env, argv))
    config, cmd, cmd_args = config_from_args(args)
    first_rank = int(env.get("NODE_RANK", "0")) * int(env.get("NPROC_PER_NODE", "1"))
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 + -failure.exitcode
        result = rank_result(results, rank)
        if result is None:  # killed before it could say (a signal, the kernel's OOM killer)
            how = f"signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else f"code {code}"
            result = failed(code, None, f"rank {rank} of this stage ended with {how} and left no result")
        return code, result
    except (RendezvousError, dist.DistError) as exc:
        error = RendezvousFailed(
            f"this pod's torchrun could not meet rank 0 at {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} "
            f"(node rank {env.get('NODE_RANK', '0')} of {env.get('NNODES', '1')}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "the stage is retried; if it keeps failing, check that every pod of the stage was scheduled and "
            "that rank 0's headless Service name resolves",
        )
        return int(error.exit_code), failed(int(error.exit_code), error, str(error))
    result = rank_result(results, first_rank) or RunnerResult(
        outcome="Succeeded", stage="quantize", exit_code=int(ExitCode.OK)
    )
    return int(ExitCode.OK), result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code, result = launch(sys.argv[1:] if argv is None else argv)
    write_termination_message(result)
    print(result.termination_message())
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
