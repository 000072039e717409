"""Tenancy suite, with figures: runs tests/integration/test_tenancy.py on the real control plane
and counts the attempts an editor of one namespace makes on another namespace or the operator
through QuantizationJobs, and how many achieved anything (goal 0).

  python benchmarks/tenancy_suite.py [--kubeconfig PATH]

Each test case is one attempt (a parametrized case counts once); a failing case is an attempt
that achieved something. Figures are printed and written to benchmarks/results/tenancy_suite.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from qjob_dev.bench import RESULTS_DIR, report_results
from qjob_dev.localcluster import REPO_ROOT as ROOT

RESULTS = RESULTS_DIR / "tenancy_suite.json"
SUITE = "tests/integration/test_tenancy.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", help="use this running cluster (QJOB_KUBECONFIG) instead of starting one")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.kubeconfig:
        env["QJOB_KUBECONFIG"] = args.kubeconfig
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE, f"--junitxml={report}"],
            cwd=ROOT,
            env=env,
            check=False,
        )
        cases = ET.parse(report).getroot().iter("testcase")
        attempts = {c.get("name"): not any(child.tag in ("failure", "error") for child in c) for c in cases}
    figures = {
        "attempts": len(attempts),
        "achieved_something": sorted(name for name, held in attempts.items() if not held),
        "held": sum(attempts.values()),
        "cases": sorted(attempts),
    }
    report_results(RESULTS, figures, not_shown=("cases",))


if __name__ == "__main__":
    main()
