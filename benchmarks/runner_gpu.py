"""GPU benchmark of the jobrunner against plain ModelOpt (run on the lent H100).

Builds a TinyLlama-1.1B-shaped Llama from a config (random bf16 weights: nothing can be
downloaded there), a pydoc BPE tokenizer and 128 x 512-token calibration texts, then for FP8,
INT4 AWQ and NVFP4 runs (each in a fresh process, so peak memory is per run):
  * ``benchmarks/runner_plain_modelopt.py`` (ModelOpt called directly), and
  * the real runner (``qjob_runner.run``) with the same settings, evaluation off,
and records wall time per stage, the runner's overhead, calibration time against one bf16
forward pass over the same calibration set, peak GPU memory and checkpoint sizes into
``$OUT/runner_gpu_h100.json`` (copied to ``benchmarks/results/``).

It first checks the image-build trick of ``jobrunner/Dockerfile``: ModelOpt's CUDA extensions
compiled in a process that sees no GPU, then loaded (not recompiled) by a process that does.

    PYTHONPATH=api:jobrunner:hack python benchmarks/runner_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("QJOB_BENCH_DIR", "/tmp/qjob-bench"))
OUT = Path(os.environ.get("OUT", WORK))
FORMATS = os.environ.get("QJOB_BENCH_FORMATS", "fp8,int4_awq,nvfp4").split(",")
SAMPLES, SEQ, BATCH = 128, 512, 4
TINYLLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
PRECOMPILE = r"""
import os, time, torch
torch.cuda.is_available = lambda: True          # no GPU here, as in `docker build`
torch.cuda.get_device_capability = lambda *a: (9, 0)
t = time.time()
from modelopt.torch.quantization import extensions as e
assert e.get_cuda_ext(raise_if_failed=True) is not None
assert e.get_cuda_ext_fp8(raise_if_failed=True) is not None
assert e.get_cuda_ext_mx(raise_if_failed=True) is not None
print("QJOB_PRECOMPILE", time.time() - t)
"""
LOADCHECK = r"""
import time, torch
t = time.time()
from modelopt.torch.quantization import extensions as e
e.get_cuda_ext(raise_if_failed=True); e.get_cuda_ext_fp8(raise_if_failed=True); e.get_cuda_ext_mx(raise_if_failed=True)
x = torch.randn(1024, 1024, device="cuda")
print("QJOB_LOADCHECK", time.time() - t)
"""


def sh(args, env=None, tag="QJOB_BENCH ") -> tuple[dict | str | None, float, str]:
    t = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    line = next((ln for ln in p.stdout.splitlines()[::-1] if ln.startswith(tag)), None)
    log = p.stdout[-3000:] + p.stderr[-3000:]
    if p.returncode != 0 and line is None:
        print(log)
    val = None
    if line:
        raw = line[len(tag) :].strip()
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
    return val, wall, log


def prepare() -> tuple[Path, Path, float]:
    import torch
    from qjob_dev.tiny_models import pydoc_paragraphs, train_tokenizer, write_jsonl
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir, calib = WORK / "tinyllama-1.1b-random", WORK / "calib.jsonl"
    if not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        train_tokenizer(model_dir, vocab_size=4096)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).to(torch.bfloat16)
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(str(model_dir))
        del model
    paras = pydoc_paragraphs(40, 4000)
    texts, cur = [], ""
    for p in paras * 4:  # ~512-token chunks
        cur += " " + p
        if len(cur) > 2600:
            texts.append(cur.strip())
            cur = ""
        if len(texts) >= SAMPLES + 16:
            break
    write_jsonl(calib, texts)
    # One bf16 forward pass over the same calibration set: the floor calibration cannot beat.
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    batches = [
        tok(texts[i : i + BATCH], return_tensors="pt", padding=True, truncation=True, max_length=SEQ).to("cuda")
        for i in range(0, SAMPLES, BATCH)
    ]
    ntok = sum(int(b["attention_mask"].sum()) for b in batches)
    times = []
    with torch.no_grad():
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    print(f"bf16 forward over {SAMPLES}x{SEQ} ({ntok} tokens): {times}")
    del model
    torch.cuda.empty_cache()
    return model_dir, calib, sorted(times)[1]


def runner_once(model_dir: Path, calib: Path, fmt: str, out: Path, evaluate: bool = False) -> dict:
    import shutil

    import torch
    from qjob_api.runner import RunnerConfig
    from qjob_runner import run

    shutil.rmtree(out, ignore_errors=True)
    cfg = RunnerConfig.model_validate(
        {
            "job": f"bench-{fmt}",
            "model": {"path": str(model_dir), "dtype": "bfloat16"},
            "quantization": {"format": fmt},
            "targetArchitectures": [],
            "calibration": {
                "dataset": {"path": str(calib)},
                "samples": SAMPLES,
                "sequenceLength": SEQ,
                "batchSize": BATCH,
            },
            "evaluation": {"enabled": evaluate, "samples": 16},
            "outputDir": str(out),
        }
    )
    t = time.perf_counter()
    r = run(cfg)
    wall = time.perf_counter() - t
    size = sum(p.stat().st_size for p in (out / "hf").rglob("*") if p.is_file()) if (out / "hf").exists() else None
    man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    from qjob_runner.artifacts import describe

    t = time.perf_counter()
    if (out / "hf").exists():
        describe(out / "hf")  # what the report step spends on sha256 for the manifest (page cache warm)
    hash_s = time.perf_counter() - t
    return {
        "manifest_hash_seconds": hash_s,
        "outcome": r.outcome,
        "exit_code": r.exit_code,
        "message": r.message,
        "wall_run": wall,
        "step_seconds": r.step_seconds,
        "quality": r.quality.to_api() if r.quality else None,
        "calibration_seconds": man.get("metrics", {}).get("calibration_seconds"),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(),
        "checkpoint_bytes": size,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--runner":
        # Same imports as the plain script does before its clock starts: compare work, not imports.
        import modelopt.torch.export  # noqa: F401
        import modelopt.torch.quantization  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        res = runner_once(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5]), sys.argv[6] == "1")
        print("QJOB_BENCH " + json.dumps(res))
        return
    import torch

    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "settings": {
            "samples": SAMPLES,
            "sequence_length": SEQ,
            "batch_size": BATCH,
            "model": "TinyLlama-1.1B shape, random bf16",
        },
    }
    ext_dir = WORK / "torch_extensions"
    env = {"TORCH_EXTENSIONS_DIR": str(ext_dir), "TORCH_CUDA_ARCH_LIST": "9.0", "PYTHONUNBUFFERED": "1"}
    if os.environ.get("QJOB_BENCH_NO_WARMUP"):
        pass  # fp8/nvfp4 calibration and export load no ModelOpt CUDA extension (seen in run 2)
    elif os.environ.get("QJOB_BENCH_SKIP_PREBUILD"):
        # Compile on first use with the GPU (what a job pays without the image's prebuild).
        warm, warm_wall, wlog = sh(
            [
                sys.executable,
                "-c",
                LOADCHECK.replace(
                    "; e.get_cuda_ext_fp8(raise_if_failed=True); e.get_cuda_ext_mx(raise_if_failed=True)", ""
                ),
            ],
            env,
            tag="QJOB_LOADCHECK",
        )
        results["extension_first_use_compile_seconds"] = warm
        print("extension compile on first use:", warm, wlog[-300:])
    else:
        prebuild(results, env)
    main2(results, env)


def prebuild(results: dict, env: dict) -> None:
    # 1. the Dockerfile's trick: compile with no GPU visible, then load with the GPU.
    pre, pre_wall, log = sh(
        [sys.executable, "-c", PRECOMPILE], {**env, "CUDA_VISIBLE_DEVICES": ""}, tag="QJOB_PRECOMPILE"
    )
    chk, chk_wall, log2 = sh([sys.executable, "-c", LOADCHECK], env, tag="QJOB_LOADCHECK")
    results["extension_prebuild"] = {
        "compile_without_gpu_seconds": pre,
        "process_wall": pre_wall,
        "load_with_gpu_seconds": chk,
        "load_process_wall": chk_wall,
        "recompiled_at_load": ("Building extension" in log2)
        or ("ninja" in log2.lower() and "no work" not in log2.lower()),
        "log_tail": log2[-600:],
    }
    print("extension prebuild:", json.dumps(results["extension_prebuild"])[:800])


def main2(results: dict, env: dict) -> None:
    model_dir, calib, fwd = prepare()
    results["bf16_forward_pass_seconds"] = fwd
    runs = []
    py = sys.executable
    for fmt in FORMATS:
        for rep in range(int(os.environ.get("QJOB_BENCH_REPEATS", "1"))):

            def plain_run(fmt: str):
                return sh(
                    [
                        py,
                        str(ROOT / "benchmarks/runner_plain_modelopt.py"),
                        str(model_dir),
                        str(calib),
                        fmt,
                        str(WORK / f"plain-{fmt}"),
                        str(SAMPLES),
                        str(SEQ),
                        str(BATCH),
                    ],
                    env,
                )

            def runner_run(fmt: str):
                return sh(
                    [py, __file__, "--runner", str(model_dir), str(calib), fmt, str(WORK / f"runner-{fmt}"), "0"], env
                )

            runner_first = os.environ.get("QJOB_BENCH_ORDER") == "alternate" and rep % 2 == 1
            if runner_first:
                runner, rw, rlog = runner_run(fmt)
                plain, pw, plog = plain_run(fmt)
            else:
                plain, pw, plog = plain_run(fmt)
                runner, rw, rlog = runner_run(fmt)
            if not isinstance(plain, dict) or not isinstance(runner, dict):
                print("FAILED", fmt, plog[-1500:], rlog[-1500:])
                runs.append({"format": fmt, "failed": True, "plain_log": plog[-1500:], "runner_log": rlog[-1500:]})
                continue
            plain_work = plain["times"]["total_after_import"]
            runner_work = runner["wall_run"]
            hashing = runner.get("manifest_hash_seconds") or 0.0
            entry = {
                "format": fmt,
                "repeat": rep,
                "runner_first": runner_first,
                "plain": {**plain, "process_wall": pw},
                "runner": {**runner, "process_wall": rw},
                "runner_overhead": runner_work / plain_work - 1,
                "runner_overhead_excluding_manifest_sha256": (runner_work - hashing) / plain_work - 1,
                "process_wall_overhead": rw / pw - 1,
                "calibration_vs_bf16_forward": (runner["calibration_seconds"] or 0) / fwd,
                "plain_quantize_vs_bf16_forward": plain["times"]["quantize"] / fwd,
            }
            entry["extension_loaded_during_timed_runs"] = [
                ln for ln in (plog + rlog).splitlines() if "Loaded extension" in ln
            ]
            runs.append(entry)
            print(
                f"{fmt}: plain {plain_work:.2f}s runner {runner_work:.2f}s overhead {entry['runner_overhead']:+.1%} "
                f"(w/o sha256 {entry['runner_overhead_excluding_manifest_sha256']:+.1%}; "
                f"process wall {entry['process_wall_overhead']:+.1%}) "
                f"steps {runner['step_seconds']} calib/fwd {entry['calibration_vs_bf16_forward']:.1f}x "
                f"peak {runner['peak_gpu_memory_bytes'] / 2**30:.2f} GiB "
                f"ckpt {(runner['checkpoint_bytes'] or 0) / 2**20:.0f} MiB"
            )
            (OUT / "runner_gpu_h100.json").write_text(json.dumps({**results, "runs": runs}, indent=2))
    if os.environ.get("QJOB_BENCH_ONLY_RUNS"):
        results["runs"] = runs
        (OUT / "runner_gpu_h100.json").write_text(json.dumps(results, indent=2))
        return
    # Evaluation cost, and the build stage's answer on an image without TensorRT-LLM.
    ev, ew, _ = sh(
        [py, __file__, "--runner", str(model_dir), str(calib), "fp8", str(WORK / "runner-fp8-eval"), "1"], env
    )
    results["fp8_with_evaluation"] = ev
    from qjob_api.runner import RunnerConfig
    from qjob_runner import run

    b = run(
        RunnerConfig.model_validate(
            {
                "job": "bench",
                "stage": "build-hopper",
                "model": {"path": str(model_dir)},
                "quantization": {"format": "fp8"},
                "calibration": {"dataset": {"path": str(calib)}},
                "engine": {"architecture": "hopper"},
                "outputDir": str(WORK / "runner-fp8-eval"),
            }
        )
    )
    results["build_hopper_without_trtllm"] = {"exit_code": b.exit_code, "reason": b.reason, "message": b.message}
    results["runs"] = runs
    (OUT / "runner_gpu_h100.json").write_text(json.dumps(results, indent=2))
    print("SUMMARY")
    for r in runs:
        if not r.get("failed"):
            print(
                f"  {r['format']:9s} overhead {r['runner_overhead']:+.1%} "
                f"(w/o sha256 {r['runner_overhead_excluding_manifest_sha256']:+.1%})  "
                f"calib {r['runner']['calibration_seconds']:.2f}s "
                f"({r['calibration_vs_bf16_forward']:.1f}x fwd {fwd:.2f}s)  "
                f"peak {r['runner']['peak_gpu_memory_bytes'] / 2**30:.2f} GiB  "
                f"ckpt {(r['runner']['checkpoint_bytes'] or 0) / 2**20:.0f} MiB"
            )
    print("  build-hopper:", results["build_hopper_without_trtllm"])


if __name__ == "__main__":
    main()
