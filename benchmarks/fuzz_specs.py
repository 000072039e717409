"""Fuzz suite: generated invalid and extreme QuantizationJobs on the real control plane.

  python benchmarks/fuzz_specs.py [--examples 1000] [--kubeconfig PATH]

1. ``qjob_dev.spec_fuzz`` generates the specs (hypothesis strategies from the API's pydantic
   models) and applies each to the apiserver: refused ones must name a field; accepted ones must
   be runnable (the operator parses them and the apiserver accepts, in a server-side dry run,
   every Job the operator builds from them).
2. The real operator (its own process, watching the fuzz namespace only) then handles every
   accepted job; after it settles, each must carry a reason in its status, and none may be in an
   error loop (condition Reconciled=False, or reconcile errors still growing).

Goals: accepted_unrunnable 0, error_loops 0, refusals_naming_no_field 0, accepted_without_reason 0.
Figures are printed and written to benchmarks/results/fuzz_specs.json.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from kubernetes import client
from qjob_dev import spec_fuzz
from qjob_dev.bench import RESULTS_DIR, control_plane, report_results
from qjob_dev.operator_process import OperatorProcess, operator_config
from qjob_dev.qjobs import GROUP, PLURAL, VERSION, make_job_namespace
from qjob_operator.config import OperatorConfig

RESULTS = RESULTS_DIR / "fuzz_specs.json"
NAMESPACE = "fuzz"


def reconcile_errors(operator: OperatorProcess) -> float:
    match = re.search(r"^qjob_reconcile_errors_total (\S+)$", operator.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--kubeconfig", help="use this running cluster instead of starting one")
    parser.add_argument("--settle", type=float, default=120, help="seconds the operator gets to settle")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="qjob-fuzz-"))
    with control_plane(workdir, args.kubeconfig) as (cluster, api):
        custom = client.CustomObjectsApi(api)
        ns = make_job_namespace(api, f"{NAMESPACE}-{int(time.time())}")
        operator = OperatorProcess(
            kubeconfig=cluster.kubeconfig, workdir=workdir, config=operator_config(namespaces=[ns])
        )
        try:
            operator.start()
            t0 = time.monotonic()
            result = spec_fuzz.run(api, ns, args.examples, OperatorConfig())
            probe_s = time.monotonic() - t0
            accepted = {o.name for o in result.accepted}

            def statuses() -> dict[str, dict]:
                items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                return {
                    i["metadata"]["name"]: i.get("status") or {} for i in items if i["metadata"]["name"] in accepted
                }

            deadline = time.monotonic() + args.settle
            while time.monotonic() < deadline and not all(s.get("reason") for s in statuses().values()):
                time.sleep(2)
            errors_before = reconcile_errors(operator)
            time.sleep(30)  # an error loop keeps failing: errors grow over a quiet window
            errors_growth = reconcile_errors(operator) - errors_before
            final = statuses()
            looping = sorted(
                n
                for n, s in final.items()
                if any(c.get("type") == "Reconciled" and c.get("status") == "False" for c in s.get("conditions") or [])
            )
            without_reason = sorted(n for n, s in final.items() if not s.get("reason"))
            reasons: dict[str, int] = {}
            for s in final.values():
                reasons[s.get("reason") or "none"] = reasons.get(s.get("reason") or "none", 0) + 1

            figures = {
                **result.figures(),
                "error_loops": len(looping),
                "reconcile_errors_in_quiet_30s": errors_growth,
                "accepted_without_reason": len(without_reason),
                "operator_reasons": dict(sorted(reasons.items())),
                "probe_seconds": round(probe_s, 1),
                "examples": {
                    "accepted_unrunnable": [o.brief() for o in result.accepted_unrunnable[:20]],
                    "refusals_naming_no_field": [o.brief() for o in result.refusals_naming_no_field[:20]],
                    "error_loops": looping[:20],
                    "accepted_without_reason": without_reason[:20],
                    "refusals": [o.brief() for o in result.outcomes if not o.accepted][:10],
                },
            }
            report_results(RESULTS, figures, not_shown=("examples",))
        finally:
            operator.stop()


if __name__ == "__main__":
    main()
