"""The serving table: every cell, the refusals, the CRD rules generated from it, the README copy,
and the runner's judgement of written checkpoint metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from qjob_api import crd
from qjob_api.capabilities import (
    HF_KV_CACHE,
    HF_QUANTIZATION,
    MODELOPT_DEPLOYMENT,
    RUNTIMES,
    VERSION_PATTERN,
    GPUArchitecture,
    KVCacheFormat,
    QuantFormat,
    ServingRuntime,
    serving_problems,
    serving_table,
    version_key,
)
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_runner.steps.serving import disagreement, judge, read_metadata

from .conftest import SPEC

ROOT = Path(__file__).resolve().parents[2]
CELLS = [(rt, fmt) for rt in RUNTIMES.values() for fmt in QuantFormat]
KV_CELLS = [(rt, kv) for rt in RUNTIMES.values() for kv in KVCacheFormat if kv != KVCacheFormat.NONE]


def ids(value):
    return getattr(value, "value", None) or getattr(value, "title", None)


def problems(fmt=None, kv=KVCacheFormat.NONE, runtimes=(), archs=(), auto=()):
    return serving_problems(fmt, list(auto), kv, list(runtimes), list(archs))


# ------------------------------------------------------------------------------------ the table


def test_issue_example_message():
    assert problems(QuantFormat.INT4_AWQ, runtimes=[(ServingRuntime.VLLM, None)]) == [
        "vLLM cannot load int4_awq checkpoints from ModelOpt: choose fp8, fp8_blockwise or nvfp4, "
        "or remove vllm from spec.serving.runtimes"
    ]


def test_what_the_sources_say():
    """The facts the issue checked, as the table encodes them (a table edit must change this on purpose)."""
    loads = {name: sorted(f.value for f in rt.formats) for name, rt in RUNTIMES.items()}
    assert loads == {
        ServingRuntime.TENSORRT_LLM: ["fp8", "fp8_blockwise", "int4_awq", "nvfp4", "w4a8_awq"],
        ServingRuntime.VLLM: ["fp8", "fp8_blockwise", "nvfp4"],
        ServingRuntime.SGLANG: ["fp8", "nvfp4"],
    }
    trt = RUNTIMES[ServingRuntime.TENSORRT_LLM].formats
    assert GPUArchitecture.BLACKWELL_RTX not in trt[QuantFormat.FP8_BLOCKWISE].architectures  # sm120: no block FP8
    assert GPUArchitecture.BLACKWELL in trt[QuantFormat.FP8_BLOCKWISE].architectures
    assert KVCacheFormat.NVFP4 not in RUNTIMES[ServingRuntime.SGLANG].kv_caches
    assert not RUNTIMES[ServingRuntime.SGLANG].mixed_precision


@pytest.mark.parametrize(("rt", "fmt"), CELLS, ids=ids)
def test_format_cell(rt, fmt):
    cell = rt.formats.get(fmt)
    got = problems(fmt, runtimes=[(rt.name, None)])
    if cell is None:
        alternatives = [f.value for f in QuantFormat if f in rt.formats]
        assert got == [
            f"{rt.title} cannot load {fmt.value} checkpoints from ModelOpt: choose {', '.join(alternatives[:-1])} "
            f"or {alternatives[-1]}, or remove {rt.name.value} from spec.serving.runtimes"
        ]
        return
    assert got == []
    assert problems(fmt, runtimes=[(rt.name, cell.min_version)]) == []
    major, minor, *_ = (int(p) for p in cell.min_version.split("."))
    older = f"{major}.{minor - 1}" if minor else f"{major - 1}.99"
    [old] = problems(fmt, runtimes=[(rt.name, older)])
    assert old.startswith(f"{rt.title} loads {fmt.value} checkpoints from version {cell.min_version} on: ")
    assert f"raise the minVersion of {rt.name.value} in spec.serving.runtimes to {cell.min_version}" in old
    for arch in GPUArchitecture:
        refused = problems(fmt, runtimes=[(rt.name, None)], archs=[arch])
        assert bool(refused) == (arch not in cell.architectures), arch
        if refused:
            assert refused[0].startswith(f"{rt.title} runs {fmt.value} checkpoints on ")
            assert "remove the other architectures from spec.engines" in refused[0]
    assert cell.source.commit and cell.source.what


@pytest.mark.parametrize(("rt", "kv"), KV_CELLS, ids=ids)
def test_kv_cache_cell(rt, kv):
    cell = rt.kv_caches.get(kv)
    fmt = next(iter(rt.formats))
    got = problems(fmt, kv, runtimes=[(rt.name, None)])
    if cell is None:
        assert got == [
            f"{rt.title} cannot load the {kv.value} KV cache of ModelOpt checkpoints: set "
            f"spec.quantization.kvCache to none or fp8, or remove {rt.name.value} from spec.serving.runtimes"
        ]
        return
    assert got == []
    for arch in GPUArchitecture:
        if arch in rt.formats[fmt].architectures:
            refused = problems(fmt, kv, runtimes=[(rt.name, None)], archs=[arch])
            assert bool(refused) == (arch not in cell.architectures), arch


@pytest.mark.parametrize("rt", RUNTIMES.values(), ids=ids)
def test_auto_quantize(rt):
    loadable = list(rt.formats)
    got = problems(runtimes=[(rt.name, None)], auto=loadable)
    assert (got == []) == rt.mixed_precision
    if rt.mixed_precision:
        [bad] = problems(runtimes=[(rt.name, None)], auto=[*loadable, QuantFormat.INT8_SMOOTHQUANT])
        assert bad.startswith(f"{rt.title} cannot load int8_smoothquant layers from ModelOpt: keep only ")
    else:
        assert got[0].startswith(f"{rt.title} cannot load mixed-precision (autoQuantize) checkpoints")


def test_several_runtimes_each_speak():
    got = problems(QuantFormat.W4A8_AWQ, runtimes=[(r, None) for r in ServingRuntime])
    assert [m.split(" ")[0] for m in got] == ["vLLM", "SGLang"]


def test_every_format_has_its_metadata():
    assert set(HF_QUANTIZATION) == set(QuantFormat)
    assert set(HF_KV_CACHE) == set(KVCacheFormat)


def test_base_versions_are_modelopts():
    """The oldest version in each runtime's row is the one ModelOpt's deployment page gives."""
    for rt in RUNTIMES.values():
        oldest = min((c.min_version for c in rt.formats.values()), key=version_key)
        assert f"{rt.title} v{oldest}" in MODELOPT_DEPLOYMENT.what


def test_versions():
    assert version_key("0.10.1") < version_key("0.14") < version_key("1.2.0") < version_key("1.10")
    assert version_key("1.2") == version_key("1.2.0")
    for good in ("0.10.1", "1.2", "2026.1.15"):
        assert re.fullmatch(VERSION_PATTERN, good)
    for bad in ("v1.2", "1", "1.2.3.4", "1.2-rc1", "latest"):
        assert not re.fullmatch(VERSION_PATTERN, bad)


def test_bad_version_names_the_field():
    spec = {**SPEC, "serving": {"runtimes": [{"name": "vllm", "minVersion": "v0.10"}]}}
    with pytest.raises(ValidationError) as e:
        QuantizationJobSpec.model_validate(spec)
    assert "spec.serving.runtimes[].minVersion must be a version like 0.10.1" in str(e.value)


def test_serve_commands():
    vllm, sglang, trt = (RUNTIMES[r] for r in (ServingRuntime.VLLM, ServingRuntime.SGLANG, ServingRuntime.TENSORRT_LLM))
    assert vllm.serve_command("/m/hf", QuantFormat.NVFP4) == "vllm serve /m/hf --quantization modelopt_fp4"
    assert vllm.serve_command("/m/hf", QuantFormat.FP8) == "vllm serve /m/hf --quantization modelopt"
    assert vllm.serve_command("/m/hf", None) == "vllm serve /m/hf"
    assert sglang.serve_command("/m/hf", QuantFormat.FP8) == (
        "python -m sglang.launch_server --model-path /m/hf --quantization modelopt"
    )
    assert trt.serve_command("/m/hf", QuantFormat.INT4_AWQ) == "trtllm-serve /m/hf"


# ------------------------------------------------------------------------------- the CRD rules


def _spec_rules():
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"
    ]


def _message(rule: dict, **values: str) -> str:
    """Evaluate a messageExpression made of string literals, ``+``, map literals and lookups (the
    subset our generator writes, which Python reads the same way) with the fields given."""
    expr = rule["messageExpression"]
    for field, value in values.items():
        expr = expr.replace(f"self.quantization.{field}", repr(value))
    assert "self." not in expr, expr
    return eval(expr, {"__builtins__": {}})  # noqa: S307 - generated text, literals only


def _rule(words: str, field: str) -> dict:
    """The spec rule whose message starts with ``words`` followed by the field's value."""
    start = f"'{words} ' + self.quantization.{field}"
    [rule] = [r for r in _spec_rules() if r.get("messageExpression", "").startswith(start)]
    return rule


@pytest.mark.parametrize(("rt", "fmt"), CELLS, ids=ids)
def test_crd_format_messages_are_the_tables(rt, fmt):
    """The apiserver's words for every cell are the operator's and the runner's words."""
    refuse = _rule(f"{rt.title} cannot load", "format")
    cell = rt.formats.get(fmt)
    if cell is None:
        [expected] = problems(fmt, runtimes=[(rt.name, None)])
        assert _message(refuse, format=fmt.value) == expected
        assert f"'{fmt.value}'" not in refuse["rule"]
        return
    assert f"'{fmt.value}'" in refuse["rule"]
    [too_old] = problems(fmt, runtimes=[(rt.name, "0.0")])
    assert _message(_rule(f"{rt.title} loads", "format"), format=fmt.value) == too_old
    outside = [a for a in GPUArchitecture if a not in cell.architectures]
    if outside:
        [wrong_gpu] = problems(fmt, runtimes=[(rt.name, None)], archs=outside[:1])
        assert _message(_rule(f"{rt.title} runs", "format"), format=fmt.value) == wrong_gpu


@pytest.mark.parametrize(("rt", "kv"), KV_CELLS, ids=ids)
def test_crd_kv_messages_are_the_tables(rt, kv):
    fmt = next(iter(rt.formats))
    if kv not in rt.kv_caches:
        [expected] = problems(fmt, kv, runtimes=[(rt.name, None)])
        assert _message(_rule(f"{rt.title} cannot load the", "kvCache"), kvCache=kv.value) == expected
    else:
        [too_old] = problems(fmt, kv, runtimes=[(rt.name, "0.0")])[1:]  # the format's own refusal comes first
        assert _message(_rule(f"{rt.title} loads the", "kvCache"), kvCache=kv.value) == too_old


def test_crd_rules_carry_messages_and_field_paths():
    serving = [r for r in _spec_rules() if "self.serving.runtimes" in r["rule"]]
    assert len(serving) >= 1 + 6 * len(RUNTIMES)
    for rule in serving:
        assert rule["message"] and rule.get("fieldPath", "").startswith("."), rule
    field = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    runtimes = field["serving"]["properties"]["runtimes"]
    assert runtimes["x-kubernetes-list-map-keys"] == ["name"] and runtimes["maxItems"] == 3
    assert runtimes["items"]["properties"]["name"]["enum"] == [r.value for r in ServingRuntime]
    assert runtimes["items"]["properties"]["minVersion"]["x-kubernetes-validations"][0]["message"].startswith(
        "spec.serving.runtimes[].minVersion must be"
    )


def test_readme_table_is_generated():
    readme = (ROOT / "README.md").read_text()
    copy = readme.split("<!-- serving-table:begin -->\n", 1)[1].split("<!-- serving-table:end -->", 1)[0]
    assert copy == serving_table(), "README's serving table drifted: paste `python -m qjob_api.capabilities`"


def test_wrong_loader_claim_is_gone():
    for path in [ROOT / "README.md", ROOT / "crds" / crd.CRD_FILENAME, *(ROOT / "docs").glob("*.md")]:
        assert "TensorRT-LLM, vLLM and SGLang load it" not in path.read_text(), path


# ------------------------------------------------------------------- judging written metadata


def checkpoint(tmp_path: Path, **quantization) -> Path:
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": quantization}))
    return tmp_path


def verdicts(folder: Path) -> dict[str, list[str]]:
    meta = read_metadata(folder)
    return {rt.name.value: judge(meta, rt).refusals for rt in RUNTIMES.values()}


def test_lower_case_algo_is_matched_like_the_loaders_do(tmp_path):
    got = verdicts(checkpoint(tmp_path, quant_algo="fp8_pb_wo", kv_cache_quant_algo=None, exclude_modules=[]))
    assert got["tensorrt-llm"] == [] and got["vllm"] == []
    assert got["sglang"] == ["SGLang does not load quant_algo fp8_pb_wo"]


def test_group_size_and_required_fields(tmp_path):
    folder = checkpoint(tmp_path, quant_algo="NVFP4", group_size=32, exclude_modules=[])
    got = verdicts(folder)
    assert "TensorRT-LLM loads NVFP4 with group_size 16, the checkpoint has 32" in got["tensorrt-llm"]
    assert "vLLM needs kv_cache_quant_algo in hf_quant_config.json for NVFP4" in got["vllm"]
    assert "SGLang refuses an empty exclude_modules for NVFP4" in got["sglang"]


def test_kv_cache_and_mixed_precision(tmp_path):
    layers = {
        "model.layers.0.mlp": {"quant_algo": "FP8"},
        "model.layers.1.mlp": {"quant_algo": "W4A16_AWQ", "group_size": 128},
    }
    folder = checkpoint(tmp_path, quant_algo="MIXED_PRECISION", kv_cache_quant_algo="NVFP4", quantized_layers=layers)
    got = verdicts(folder)
    assert got["tensorrt-llm"] == []
    assert got["vllm"] == ["vLLM does not load quant_algo W4A16_AWQ (layer model.layers.1.mlp)"]
    assert "SGLang does not load quant_algo MIXED_PRECISION" in got["sglang"]
    assert "SGLang does not load kv_cache_quant_algo NVFP4" in got["sglang"]


def test_config_json_metadata_is_read_when_hf_quant_config_is_absent(tmp_path):
    config = {"quantization_config": {"quant_method": "modelopt", "quant_algo": "W8A16", "ignore": ["lm_head"],
                                      "kv_cache_scheme": {"type": "float", "num_bits": 8}}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    meta = read_metadata(tmp_path)
    assert (meta.quant_algo, meta.kv_cache_quant_algo, meta.exclude_modules) == ("W8A16", "FP8", ["lm_head"])
    assert all(refusals for refusals in verdicts(tmp_path).values())  # INT8 weight-only: nobody loads it


def test_hf_quant_config_and_config_json_must_agree(tmp_path):
    folder = checkpoint(tmp_path, quant_algo="FP8", kv_cache_quant_algo=None, exclude_modules=["lm_head"])
    config = {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert disagreement(folder) is None
    config["quantization_config"]["quant_algo"] = "NVFP4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert disagreement(folder) == "hf_quant_config.json says quant_algo FP8 but config.json says NVFP4"
