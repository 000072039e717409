"""Reuse of identical finished work: the work key (qjob_api.work) and the operator's pure decisions."""

from __future__ import annotations

import copy

import pytest
from qjob_api.reasons import Reason
from qjob_api.runner import ReuseOutcome, RunnerConfig, RunnerResult
from qjob_api.v1alpha1 import JobReference, QuantizationJobSpec, WorkInputs
from qjob_api.work import recipe_key, recipe_of, work_key
from qjob_operator import reuse
from qjob_operator.builders import QuantizationJobRef, build_job
from qjob_operator.plan import plan_stages

from .conftest import SPEC, cr_body

INPUTS = WorkInputs(
    model_revision="hf:meta-llama/Llama-3.1-8B@" + "a" * 40,
    calibration_data="sha256:" + "b" * 64,
    versions={"nvidia-modelopt": "0.47.0", "torch": "2.9.0", "python": "3.11.9", "numpy": "2.1.0"},
)


def spec_of(**changes) -> QuantizationJobSpec:
    d = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return QuantizationJobSpec.model_validate(d)


def key_of(spec: QuantizationJobSpec, inputs: WorkInputs = INPUTS) -> str:
    return work_key(recipe_of(spec), inputs)


# ---------------------------------------------------------------------------------- the work key


@pytest.mark.parametrize(
    "change",
    [
        {"resources__gpus": 4},
        {"resources__memory": "64Gi"},
        {"scheduling__nodeSelector": {"pool": "a"}},
        {"scheduling__priorityClassName": "batch"},
        {"output": {"s3": {"bucket": "elsewhere"}}},
        {"runPolicy__backoffLimit": 7},
        {"reuse": "Never"},
        {"model__huggingFace__revision": "v2"},  # the resolved commit is an input, not the recipe
        {"model__huggingFace__tokenSecretRef": {"name": "other-token"}},
        {"calibration__dataset": {"configMap": {"name": "same-text-elsewhere", "key": "t.jsonl"}}},
        # Engines are matched one by one (runner reuse.chosen_manifests), not through the key.
        {"engines": [{"architecture": "blackwell"}]},
        {"engines": []},
    ],
)
def test_where_and_how_it_runs_is_not_part_of_the_work(change):
    assert recipe_key(recipe_of(spec_of(**change))) == recipe_key(recipe_of(spec_of()))
    assert key_of(spec_of(**change)) == key_of(spec_of())


@pytest.mark.parametrize(
    "change",
    [
        {"model__huggingFace__repo": "meta-llama/Llama-3.1-70B"},
        {"model__dtype": "bfloat16"},
        {"quantization__format": "int4_awq"},
        {"quantization__kvCache": "fp8"},
        {"quantization__excludeModules": ["lm_head"]},
        {"calibration__samples": 256},
        {"calibration__sequenceLength": 1024},
        {"calibration__batchSize": 8},
        {"export__formats": ["hf", "tensorrt_llm"]},
        {"serving": {"runtimes": [{"name": "vllm"}]}},
        {"evaluation__gate": {"maxPerplexityIncrease": 0.01}},
        {"evaluation__samples": 32},
    ],
)
def test_what_shapes_the_artifacts_changes_the_key(change):
    assert recipe_key(recipe_of(spec_of(**change))) != recipe_key(recipe_of(spec_of()))
    assert key_of(spec_of(**change)) != key_of(spec_of())


@pytest.mark.parametrize(
    "inputs",
    [
        INPUTS.model_copy(update={"model_revision": "hf:meta-llama/Llama-3.1-8B@" + "c" * 40}),
        INPUTS.model_copy(update={"calibration_data": "sha256:" + "d" * 64}),
        INPUTS.model_copy(update={"versions": {**INPUTS.versions, "nvidia-modelopt": "0.48.0"}}),
        INPUTS.model_copy(update={"versions": {**INPUTS.versions, "tensorrt": "10.13"}}),
    ],
)
def test_each_input_changes_the_key_but_not_the_recipe(inputs):
    spec = spec_of()
    assert key_of(spec, inputs) != key_of(spec)


def test_versions_that_do_not_shape_artifacts_leave_the_key_alone():
    other = INPUTS.model_copy(update={"versions": {**INPUTS.versions, "python": "3.12.1", "numpy": "2.2.0"}})
    assert key_of(spec_of(), other) == key_of(spec_of())


def test_defaults_spelled_out_give_the_same_key():
    explicit = spec_of(quantization__kvCache="none", calibration__batchSize=0, evaluation__enabled=True)
    assert key_of(explicit) == key_of(spec_of())
    assert key_of(spec_of()).startswith("sha256:") and len(key_of(spec_of())) == 7 + 64


# ---------------------------------------------------------------------------------- the decision


def finished(name: str, uid: str, recipe: str, completed: str, **status) -> dict:
    body = cr_body(SPEC)
    body["metadata"].update(name=name, uid=uid)
    work = {"key": "sha256:k-" + name, "recipeKey": recipe, "inputs": INPUTS.to_api()}
    body["status"] = {
        "phase": "Succeeded",
        "completionTime": completed,
        "work": work,
        "artifacts": [
            {"kind": "checkpoint", "format": "hf", "uri": f"pvc://artifacts/ml/{name}/hf", "sha256": "e" * 64},
            {"kind": "manifest", "format": "json", "uri": f"pvc://artifacts/ml/{name}/manifest.json"},
        ],
        **status,
    }
    return body


def candidate(name="a", uid="uid-a", completed="2026-11-22T10:00:00Z") -> reuse.Candidate:
    entry = reuse.indexed(finished(name, uid, "sha256:r", completed))
    assert entry is not None
    return entry["candidate"]


def test_only_succeeded_jobs_with_a_work_record_are_indexed():
    entry = reuse.indexed(finished("a", "uid-a", "sha256:r", "2026-11-22T10:00:00Z"))
    assert entry["recipe_key"] == "sha256:r"
    c = entry["candidate"]
    assert c.ref == JobReference(namespace="ml", name="a", uid="uid-a")
    assert c.output_uri == "pvc://artifacts/ml/a"  # the default output path filled in
    assert reuse.indexed(finished("a", "uid-a", "r", "t", phase="Failed")) is None
    no_work = finished("a", "uid-a", "r", "t")
    del no_work["status"]["work"]
    assert reuse.indexed(no_work) is None


def test_pick_skips_the_job_itself_and_keeps_the_newest_three():
    found = [candidate(n, f"uid-{n}", f"2026-11-22T1{i}:00:00Z") for i, n in enumerate("abcde")]
    assert [c.ref.name for c in reuse.pick(found, "uid-e")] == ["d", "c", "b"]


def test_never_means_no_reuse_stage(spec_dict):
    spec = QuantizationJobSpec.model_validate({**spec_dict, "reuse": "Never"})
    assert reuse.decide_reuse(spec, {}, True, False, [candidate()], []).mode is None


def test_a_fresh_job_with_a_candidate_checks_it_first(spec, config):
    state = reuse.decide_reuse(spec, {}, True, False, [candidate()], [])
    assert state.mode == "check"
    assert state.status_fields()["reuse"] == {
        "candidates": [{"namespace": "ml", "name": "a", "uid": "uid-a"}],
        "outcome": "Checking",
    }
    stages = plan_stages(spec, config, reuse=state)
    assert [(s.name, s.after, s.requirement.gpus) for s in stages] == [
        ("reuse", (), 0),
        ("quantize", ("reuse",), 1),
        ("build-hopper", ("quantize",), 1),
    ]


def test_the_decision_is_taken_once_before_anything_exists(spec):
    assert reuse.decide_reuse(spec, {}, False, False, [candidate()], []).mode is None  # already running
    assert reuse.decide_reuse(spec, {}, True, False, [], []).mode is None  # nothing to reuse
    # A reuse Job exists but the status write was lost: the plan keeps the stage.
    assert reuse.decide_reuse(spec, {}, False, True, [], []).mode == "check"


def test_with_a_model_stage_the_reuse_stage_comes_before_the_download(spec, config):
    cached = config.model_copy(update={"model_cache": config.model_cache.model_copy(update={"claim_name": "cache"})})
    state = reuse.decide_reuse(spec, {}, True, False, [candidate()], [])
    names = [(s.name, s.after) for s in plan_stages(spec, cached, reuse=state)]
    assert names[:3] == [("reuse", ()), ("fetch", ("reuse",)), ("quantize", ("fetch",))]


def reused(spec, engines: list[str]) -> reuse.ReuseState:
    checking = reuse.decide_reuse(spec, {}, True, False, [candidate()], []).status_fields()
    outcome = ReuseOutcome(reused_from=candidate().ref, reason=Reason.REUSED, message="checked", engines=engines)
    result = RunnerResult(outcome="Succeeded", stage="reuse", reuse=outcome, work=INPUTS)
    return reuse.decide_reuse(spec, checking, False, True, [], [result])


def test_reused_with_its_engines_leaves_the_reuse_stage_alone(spec, config):
    state = reused(spec, ["hopper"])
    assert state.mode == "reused" and state.reused_from.name == "a"
    assert [s.name for s in plan_stages(spec, config, reuse=state)] == ["reuse"]
    fields = state.status_fields()
    assert fields["reusedFrom"] == {"namespace": "ml", "name": "a", "uid": "uid-a"}
    assert fields["reuse"]["outcome"] == "Reused" and fields["reuse"]["engines"] == ["hopper"]
    # Later reconciles (the reuse Job gone after its TTL) keep it.
    again = reuse.decide_reuse(spec, fields, False, False, [], [])
    assert again.mode == "reused" and again.reused_from == state.reused_from
    assert [s.name for s in plan_stages(spec, config, reuse=again)] == ["reuse"]


def test_engines_the_earlier_job_lacked_are_built_after_the_reuse(spec_dict, config):
    spec_dict["engines"] = [{"architecture": "hopper"}, {"architecture": "ada"}]
    spec = QuantizationJobSpec.model_validate(spec_dict)
    stages = plan_stages(spec, config, reuse=reused(spec, ["hopper"]))
    assert [(s.name, s.after, s.requirement.gpus) for s in stages] == [("reuse", (), 0), ("build-ada", ("reuse",), 1)]
    assert [s.name for s in plan_stages(spec, config, reuse=reused(spec, []))] == ["reuse", "build-hopper", "build-ada"]


def test_not_reused_runs_the_normal_stages_with_the_reason(spec, config):
    checking = reuse.decide_reuse(spec, {}, True, False, [candidate()], []).status_fields()
    result = RunnerResult(
        outcome="Succeeded",
        stage="reuse",
        reuse=ReuseOutcome(reason=Reason.REUSE_ARTIFACT_CHANGED, message="ml/a: hf/model.safetensors changed"),
    )
    state = reuse.decide_reuse(spec, checking, False, True, [], [result])
    assert state.mode == "check"
    assert state.status.outcome == "NotReused" and state.status.reason == "ReuseArtifactChanged"
    assert "hf/model.safetensors" in state.status.message
    assert [s.name for s in plan_stages(spec, config, reuse=state)][:2] == ["reuse", "quantize"]


def test_work_record_keys_the_reported_inputs_like_the_runner(spec):
    recipe = recipe_of(spec)
    results = [RunnerResult(outcome="Succeeded", stage="quantize", work=INPUTS)]
    record = reuse.work_record(recipe, recipe_key(recipe), results)
    assert record.key == work_key(recipe, INPUTS) and record.recipe_key == recipe_key(recipe)
    assert reuse.work_record(recipe, "r", [RunnerResult(outcome="Succeeded", stage="quantize")]) is None


# --------------------------------------------------------------------------------- the reuse Job


def _reuse_job(spec_dict, config, found):
    spec = QuantizationJobSpec.model_validate(spec_dict)
    state = reuse.decide_reuse(spec, {}, True, False, found, [])
    stage = plan_stages(spec, config, reuse=state)[0]
    return build_job(QuantizationJobRef("llama", "ml", "uid-1"), spec, stage, config)


def test_the_reuse_job_has_no_gpu_and_reads_the_earlier_output_read_only(spec_dict, config):
    spec_dict["output"] = {"pvc": {"claimName": "mine"}}
    job = _reuse_job(spec_dict, config, [candidate()])
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["nodeAffinity"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {"mine": False, "artifacts": True}
    env = {e["name"]: e for e in container["env"]}
    cfg = RunnerConfig.model_validate_json(env["QJOB_RUNNER_CONFIG"]["value"])
    assert cfg.stage == "reuse" and cfg.work_recipe == recipe_of(QuantizationJobSpec.model_validate(spec_dict))
    assert [e.architecture.value for e in cfg.reuse.engines] == ["hopper"]  # the engines this job asks for
    [c] = cfg.reuse.candidates
    assert (c.job.name, c.work_key, c.output_dir) == ("a", "sha256:k-a", "/mnt/pvc/artifacts/ml/a")
    assert c.artifacts[0].sha256 == "e" * 64


def test_an_s3_candidate_brings_its_own_credentials_env(spec_dict, config):
    body = finished("a", "uid-a", "r", "t")
    body["spec"]["output"] = {"s3": {"bucket": "old", "credentialsSecretRef": {"name": "old-writer"}}}
    c = reuse.indexed(body)["candidate"]
    job = _reuse_job(spec_dict, config, [c])
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QJOB_S3_REUSE0_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "old-writer"
    cfg = RunnerConfig.model_validate_json(env["QJOB_RUNNER_CONFIG"]["value"])
    assert cfg.reuse.candidates[0].output_s3.prefix == "ml/a"
    assert cfg.reuse.candidates[0].output_s3.credentials_env == "QJOB_S3_REUSE0"


def test_every_stage_carries_the_recipe(spec, config):
    for stage in plan_stages(spec, config):
        job = build_job(QuantizationJobRef("llama", "ml", "uid-1"), spec, stage, config)
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert RunnerConfig.model_validate_json(env["QJOB_RUNNER_CONFIG"]["value"]).work_recipe == recipe_of(spec)
