"""guards: children by owner uid, output folders never shared."""

from __future__ import annotations

import copy

from qjob_operator.guards import output_conflict, owned_by

from .conftest import cr_body


def _job(spec_dict, name, created, path="", uid=None, status=None):
    spec = copy.deepcopy(spec_dict)
    spec["output"] = {"pvc": {"claimName": "artifacts", "path": path}}
    body = cr_body(spec, status, created)
    body["metadata"].update(name=name, uid=uid or f"uid-{name}")
    return body


def test_the_older_job_keeps_its_folder_unless_the_newer_already_started(spec_dict):
    old = _job(spec_dict, "a", "2026-11-22T11:00:00Z")
    new = _job(spec_dict, "b", "2026-11-22T12:00:00Z", path="ml/a/sub")
    assert "overlaps the output of QuantizationJob a" in output_conflict(new, [old, new])
    assert output_conflict(old, [old, new]) is None
    assert "QuantizationJob b" in output_conflict(old, [old, new], started={"uid-b"})
    sibling = _job(spec_dict, "c", "2026-11-22T12:00:00Z", path="ml/ab")  # a prefix of the name, not of the path
    assert output_conflict(sibling, [old]) is None
    elsewhere = _job(spec_dict, "a", "2026-11-22T12:00:00Z", uid="uid-x")
    elsewhere["metadata"]["namespace"] = "other"
    assert output_conflict(elsewhere, [old]) is None  # a claim of another namespace is another volume


def test_buckets_are_shared_across_namespaces(spec_dict):
    def s3_job(name, namespace, created, prefix):
        body = _job(spec_dict, name, created)
        body["spec"]["output"] = {
            "s3": {"bucket": "artifacts", "prefix": prefix, "credentialsSecretRef": {"name": "s"}}
        }
        body["metadata"]["namespace"] = namespace
        return body

    theirs = s3_job("a", "team-a", "2026-11-22T11:00:00Z", "models/llama")
    mine = s3_job("b", "team-b", "2026-11-22T12:00:00Z", "models")
    message = output_conflict(mine, [theirs])
    assert "a QuantizationJob of another namespace" in message and "team-a" not in message


def test_children_are_owned_by_uid_only():
    child = {"metadata": {"ownerReferences": [{"uid": "u1", "controller": True}]}}
    assert owned_by(child, "u1") and not owned_by(child, "u2")
    assert not owned_by({"metadata": {"labels": {"qjob.dev/job-name": "x"}}}, "u1")
