"""A quick fuzz round (the long one, whose accepted specs the operator also runs, is
benchmarks/fuzz_specs.py, `make soak`): generated invalid and extreme specs on the real apiserver.
Every refusal names a field; nothing accepted is unrunnable."""

from __future__ import annotations

import pytest
from qjob_dev import spec_fuzz
from qjob_operator.config import OperatorConfig

pytestmark = pytest.mark.cluster

SPECS = 60


def test_generated_specs_are_refused_naming_a_field_or_runnable(kube_api, namespace, crds):
    # Accepted specs are deleted at once: the session's operator has other tests to serve.
    result = spec_fuzz.run(kube_api, namespace, examples=SPECS, config=OperatorConfig(), keep=False)
    figures = result.figures()
    assert figures["specs"] == SPECS and figures["accepted"] and figures["refused"], figures
    assert [o.brief() for o in result.accepted_unrunnable] == []
    assert [o.brief() for o in result.refusals_naming_no_field] == []
