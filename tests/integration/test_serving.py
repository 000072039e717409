"""spec.serving on the real apiserver: every cell of the serving table applied (server-side dry
run) and its refusal read back, in the same words as the operator's and the runner's; version
strings, unknown runtimes; the artifact status keeps the runtimes; blackwell-rtx placement."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException
from qjob_api.capabilities import (
    FORMAT_ARCHITECTURES,
    RUNTIMES,
    GPUArchitecture,
    KVCacheFormat,
    QuantFormat,
    ServingRuntime,
)
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_dev.localcluster import REPO_ROOT
from qjob_dev.qjobs import (
    GROUP,
    PLURAL,
    VERSION,
    create_qjob,
    custom_api,
    make_artifacts_pvc,
    make_calibration_configmap,
    qjob_manifest,
    wait_qjob,
)

from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster


def serving_spec(fmt: str, runtimes: list[dict], kv: str = "none", engines: list[str] = ()) -> dict:
    return basic_spec(
        quantization={"format": fmt, "kvCache": kv},
        engines=[{"architecture": a} for a in engines],
        serving={"runtimes": runtimes},
    )


def dry_run(kube_api, namespace: str, spec: dict) -> str | None:
    """None when the apiserver accepts the object (server-side dry run), else its message."""
    try:
        custom_api(kube_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, qjob_manifest("serving", spec), dry_run="All"
        )
    except ApiException as refused:
        assert refused.status == 422, refused.body
        return json.loads(refused.body)["message"]
    return None


def test_every_cell_of_the_table_is_applied(kube_api, namespace, crds):
    """Accepted where the table has a cell; refused with the table's words where it has none."""
    checked = 0
    for rt in RUNTIMES.values():
        for fmt in QuantFormat:
            cell = rt.formats.get(fmt)
            # an engine target where both the runtime and the engine matrix run the format
            engines = [a.value for a in GPUArchitecture if cell and a in cell.architectures & FORMAT_ARCHITECTURES[fmt]]
            spec = serving_spec(fmt.value, [{"name": rt.name.value}], engines=engines)
            expected = QuantizationJobSpec.model_validate(spec).serving_problems()
            message = dry_run(kube_api, namespace, spec)
            if fmt in rt.formats:
                assert expected == [] and message is None, (rt.name, fmt, message)
            else:
                assert expected and message and expected[0] in message, (rt.name, fmt, message)
            checked += 1
    assert checked == len(RUNTIMES) * len(QuantFormat)


def test_issue_example_is_refused_with_the_fix(kube_api, namespace, crds):
    message = dry_run(kube_api, namespace, serving_spec("int4_awq", [{"name": "vllm"}]))
    assert (
        "vLLM cannot load int4_awq checkpoints from ModelOpt: choose fp8, fp8_blockwise or nvfp4, "
        "or remove vllm from spec.serving.runtimes"
    ) in message
    assert "spec.serving.runtimes" in message.split(":")[1], message  # the field path the apiserver names


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (
            serving_spec("fp8_blockwise", [{"name": "vllm", "minVersion": "0.12"}], engines=["hopper"]),
            "vLLM loads fp8_blockwise checkpoints from version 0.14.0 on: raise the minVersion of vllm",
        ),
        (
            serving_spec("nvfp4", [{"name": "sglang"}], kv="nvfp4", engines=["blackwell"]),
            "SGLang cannot load the nvfp4 KV cache of ModelOpt checkpoints: set spec.quantization.kvCache to none",
        ),
        (
            serving_spec("fp8", [{"name": "tensorrt-llm", "minVersion": "1.1.0"}]),
            "TensorRT-LLM loads fp8 checkpoints from version 1.2.0 on",
        ),
        (
            serving_spec("nvfp4", [{"name": "sglang"}], engines=["hopper"]),
            "SGLang runs nvfp4 checkpoints on blackwell or blackwell-rtx GPUs only",
        ),
        (
            {
                **serving_spec("fp8", [{"name": "sglang"}]),
                "quantization": {"autoQuantize": {"effectiveBits": 6, "formats": ["fp8"]}},
            },
            "SGLang cannot load mixed-precision (autoQuantize) checkpoints from ModelOpt",
        ),
        (
            {
                **serving_spec("fp8", [{"name": "vllm"}]),
                "quantization": {"autoQuantize": {"effectiveBits": 5, "formats": ["fp8", "w4a8_awq"]}},
            },
            "vLLM cannot load w4a8_awq layers from ModelOpt: keep only fp8, fp8_blockwise or nvfp4",
        ),
        (
            {**serving_spec("fp8", [{"name": "vllm"}]), "export": {"formats": ["tensorrt_llm"]}},
            "serving runtimes load the hf checkpoint of a causal LM",
        ),
        (
            serving_spec("fp8", [{"name": "vllm", "minVersion": "v0.10"}]),
            "spec.serving.runtimes[].minVersion must be a version like 0.10.1 or 1.2",
        ),
        (serving_spec("fp8", [{"name": "tgi"}]), 'Unsupported value: "tgi"'),
        (serving_spec("fp8", [{"name": "vllm"}, {"name": "vllm", "minVersion": "0.11"}]), "Duplicate value"),
        (serving_spec("fp8_blockwise", [], engines=["blackwell-rtx"]), "FP8 block scaling needs Hopper or datacenter"),
    ],
    ids=[
        "version",
        "kv",
        "trt-version",
        "gpu",
        "sglang-mixed",
        "vllm-auto",
        "no-hf",
        "bad-version",
        "unknown",
        "duplicate",
        "fp8-block-rtx",
    ],  # fmt: skip
)
def test_refusals_name_the_field_and_the_fix(kube_api, namespace, crds, spec, words):
    message = dry_run(kube_api, namespace, spec)
    assert message and words in message, message


def test_accepted_combinations(kube_api, namespace, crds):
    everyone = [{"name": r.value} for r in ServingRuntime]
    for spec in (
        serving_spec("fp8", everyone, kv="fp8", engines=["ada", "hopper", "blackwell", "blackwell-rtx"]),
        serving_spec("nvfp4", [{"name": "vllm", "minVersion": "0.10.1"}, {"name": "sglang"}], engines=["blackwell"]),
        serving_spec("w4a8_awq", [{"name": "tensorrt-llm", "minVersion": "1.2"}], kv="fp8", engines=["hopper"]),
        serving_spec("int8_smoothquant", [], engines=["ampere"]),  # no runtime asked for: today's behaviour
    ):
        assert dry_run(kube_api, namespace, spec) is None, spec


def test_refused_example_says_what_the_readme_says(cluster, crds, namespace):
    path = REPO_ROOT / "examples" / "invalid-int4-awq-for-vllm.yaml"
    proc = cluster.run_kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    readme = (REPO_ROOT / "README.md").read_text()
    assert first.split(": Invalid value")[0] in readme, first
    assert "vLLM cannot load int4_awq checkpoints from ModelOpt" in proc.stderr


def test_status_keeps_the_runtimes_of_an_artifact(kube_api, namespace, crds):
    """Undeclared status fields are pruned: the schema must declare artifact runtimes."""
    name = create_qjob(kube_api, namespace, serving_spec("fp8", [{"name": "vllm"}]))
    runtimes = [
        {"name": "vllm", "minVersion": "0.10.1", "architectures": ["ada", "hopper"],
         "command": "vllm serve /mnt/artifacts/x/hf --quantization modelopt"},
    ]  # fmt: skip
    artifact = {"kind": "checkpoint", "format": "hf", "uri": "pvc://artifacts/x/hf", "runtimes": runtimes}
    status = {"artifacts": [artifact]}  # (runner reports carry no artifacts: progress only)
    custom_api(kube_api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}
    )
    got = custom_api(kube_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["status"]
    assert got["artifacts"][0]["runtimes"] == runtimes


def test_blackwell_rtx_is_placed_on_12x_nodes_only(kube_api, namespace, operator):
    """The local cluster has a B200 (10.0) and no 12.x node: a blackwell-rtx build has nowhere to run,
    and the operator says so at once, naming the compute capabilities it looked for."""
    make_artifacts_pvc(kube_api, namespace)
    make_calibration_configmap(kube_api, namespace)
    name = create_qjob(kube_api, namespace, serving_spec("nvfp4", [{"name": "vllm"}], engines=["blackwell-rtx"]))
    obj = wait_qjob(kube_api, namespace, name, lambda s: s.get("reason") == "NoMatchingNodes", operator=operator)
    message = obj["status"]["message"]
    assert "stage build-blackwell-rtx" in message and "blackwell-rtx GPUs (compute capability 12.0 or 12.1)" in message
    assert "build-blackwell:" not in message


def test_kv_cells_are_applied(kube_api, namespace, crds):
    for rt in RUNTIMES.values():
        for kv in (KVCacheFormat.FP8, KVCacheFormat.NVFP4):
            spec = serving_spec("fp8", [{"name": rt.name.value}], kv=kv.value, engines=["blackwell"])
            message = dry_run(kube_api, namespace, spec)
            if kv in rt.kv_caches:
                assert message is None, (rt.name, kv, message)
            else:
                [expected] = QuantizationJobSpec.model_validate(spec).serving_problems()
                assert message and expected in message, (rt.name, kv, message)
