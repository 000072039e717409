"""``qjob-runner --config FILE [--result FILE]``: one stage of a QuantizationJob.

Exit codes are ``qjob_api.runner.ExitCode``. The termination message (a compact RunnerResult)
goes to ``$QJOB_TERMINATION_LOG`` (default ``/dev/termination-log`` when writable), where the
operator reads it from the pod status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qjob_api.runner import ExitCode, RunnerResult

TERMINATION_LOG_ENV = "QJOB_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
#: Set by ``qjob_runner.launch`` for its workers: each rank leaves its result there, as
#: ``<RANK>.json``, and the launcher writes the pod's one termination message.
RANK_RESULTS_ENV = "QJOB_RANK_RESULTS"


def write_termination_message(result: RunnerResult) -> None:
    if folder := os.environ.get(RANK_RESULTS_ENV):
        (Path(folder) / f"{os.environ.get('RANK', '0')}.json").write_text(result.termination_message())
        return
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one message per pod: rank 0's
    path = os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG
    p = Path(path)
    if not os.environ.get(TERMINATION_LOG_ENV) and not (p.exists() and os.access(p, os.W_OK)):
        return
    try:
        p.write_text(result.termination_message())
    except OSError as exc:
        logging.getLogger("qjob_runner").warning("cannot write termination message to %s: %s", p, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qjob-runner", description="Run one stage of a QuantizationJob.")
    parser.add_argument(
        "--config", help="RunnerConfig JSON/YAML file (default: $QJOB_RUNNER_CONFIG or /etc/qjob/runner.json)"
    )
    parser.add_argument("--result", help="where to write the result JSON (default: <output_dir>/result.json)")
    parser.add_argument("--log-level", default=os.environ.get("QJOB_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    from .context import load_config
    from .errors import RunnerError
    from .pipeline import run

    try:
        config = load_config(args.config)
    except RunnerError as exc:
        logging.getLogger("qjob_runner").error("%s", exc)
        result = RunnerResult(
            outcome="Failed",
            stage="unknown",
            exit_code=int(exc.exit_code),
            reason=exc.reason,
            message=str(exc),
            failed_step="config",
        )
        write_termination_message(result)
        if args.result:
            Path(args.result).write_text(result.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        print(result.model_dump_json(by_alias=True, exclude_none=True))
        return int(exc.exit_code)
    result = run(config, result_file=args.result)
    write_termination_message(result)
    print(result.termination_message())
    return int(result.exit_code) if result.exit_code else int(ExitCode.OK)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
