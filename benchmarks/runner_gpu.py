"""The jobrunner against plain ModelOpt at the size people quantize (run on a lent GPU).

    PYTHONPATH=api:jobrunner:hack python benchmarks/runner_gpu.py [--shape 8b|1.1b|tiny]
        [--formats fp8,nvfp4,int4_awq] [--repeats 3] [--runner after=. --runner before=PATH]
        [--phases setup,overhead,calibration,batch0,warmstart] [--out DIR]

Builds a Llama of the chosen shape from its config (random bf16 weights: nothing can be
downloaded there; saved once under --work as 5 GB safetensors shards and loaded from disk by
every run), a BPE tokenizer trained on pydoc text and 512-token calibration texts. Phases:

* ``setup``: the model and data; ModelOpt's CUDA extension built the image's way (no GPU
  visible, ``jobrunner/precompile_extensions.py``), then loaded from a read-only copy by an
  unprivileged process through the runner's copy path (the pod's readOnlyRootFilesystem);
  one bf16 forward pass over the calibration sets (the floor calibration is compared with);
  the machine's sha256 rate.
* ``overhead``: per format, alternating runs of plain ModelOpt
  (``benchmarks/runner_plain_modelopt.py``) and each runner variant (``--runner NAME=ROOT``: a
  checkout whose ``api/`` and ``jobrunner/`` are imported), each run in its own process: forked
  from one that imported torch, transformers and ModelOpt, or, where an import initialises CUDA
  (ModelOpt 0.47 on the H200 did), a fresh interpreter that imports them before its clock
  starts. Per run: wall time per step, a profile of the calls that matter (quantizer insertion,
  each calibration pass, ModelOpt's export, shard writes, hashing), peak GPU memory, checkpoint
  size.
* ``calibration``: FP8/NVFP4 calibration at several batch sizes, with and without the full
  logits, each against a bf16 forward pass over the same batches.
* ``batch0``: the runner with ``batchSize: 0`` (its own choice of batch).
* ``--resume-check FORMATS``: a run whose export fails, then its retry, which must resume from
  the saved calibration state and export the same files (sha256) as the uninterrupted runs.
* ``warmstart``: a fresh process per runner variant from pod start to the first calibration
  batch, page cache dropped first (imports, extension copy, model load from disk).

Results: ``$OUT/runner_gpu.json`` (rewritten after every run, so a cut-off call keeps what it
measured) and a summary table at the end of the output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {
    # Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json; RoPE scaling left out: no effect on cost).
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    # TinyLlama-1.1B, the previous benchmark's shape (quick).
    "1.1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    # CPU dry run of the whole script.
    "tiny": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
}
#: Calibration samples per format (the issue's settings: 512 for FP8, 128 for the others).
SAMPLES = {"fp8": 512, "nvfp4": 128, "int4_awq": 128}
CUDA_ONLY = {"nvfp4"}
CHILD_LIMIT_S = 300  # a hung child must not eat the device call

# ------------------------------------------------------------------------------ profiling
# Wall time and call count of named functions, wrapped by module attribute (the functions
# are looked up by name at their call sites). Installed the same way in plain and runner runs.
PROFILE_TARGETS = {
    "modelopt.torch.quantization:quantize": "mtq.quantize",
    "modelopt.torch.quantization:calibrate": "mtq.calibrate",  # called directly
    "modelopt.torch.quantization.model_quant:calibrate": "mtq.calibrate",  # called by quantize
    "modelopt.torch.export:export_hf_checkpoint": "export_hf_checkpoint",
    "modelopt.torch.export.unified_export_hf:_export_transformers_checkpoint": "export.prepare_state_dict",
    "transformers.modeling_utils:safe_save_file": "export.write_shard",
    "transformers.tokenization_utils_base:PreTrainedTokenizerBase.save_pretrained": "tokenizer.save",
    "transformers.modeling_utils:PreTrainedModel.from_pretrained": "from_pretrained",
    "qjob_runner.artifacts:describe": "runner.describe",
    "qjob_runner.artifacts:sha256_file": "runner.sha256_file",
    "qjob_runner.artifacts:FileHashes.map": "runner.wait_for_hashes",
    "qjob_runner.stages.quantize:save_state": "runner.save_state",  # main before the steps/ rename
    "qjob_runner.steps.quantize:save_state": "runner.save_state",
    "qjob_runner.steps.quantize:_to_host": "runner.state_to_host",
    "qjob_runner.steps.data:probe_batch_size": "runner.probe_batch_size",
}


class Profile:
    def __init__(self):
        self.lock = threading.Lock()
        self.totals: dict[str, list[float]] = {}
        self.passes: list[float] = []  # each forward_loop call (calibration passes)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            entry = self.totals.setdefault(name, [0.0, 0])
            entry[0] += seconds
            entry[1] += 1

    def wrap(self, fn, name):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if name == "mtq.calibrate":
                loop = kwargs.get("forward_loop") or (args[2] if len(args) > 2 else None)
                if loop is not None:
                    kwargs.pop("forward_loop", None)
                    args = args[:2]
                    kwargs["forward_loop"] = self.timed_loop(loop)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t)

        return timed

    def timed_loop(self, loop):
        def forward_loop(model):
            sync()
            t = time.perf_counter()
            out = loop(model)
            sync()
            self.passes.append(time.perf_counter() - t)
            return out

        return forward_loop

    def install(self) -> list[str]:
        import importlib

        missing = []
        for target, name in PROFILE_TARGETS.items():
            mod_name, attr = target.split(":")
            try:
                owner = importlib.import_module(mod_name)
            except ImportError:
                missing.append(target)
                continue
            *path, leaf = attr.split(".")
            for p in path:
                owner = getattr(owner, p, None)
            if owner is None or not hasattr(owner, leaf):
                missing.append(target)
                continue
            raw = owner.__dict__.get(leaf) if isinstance(owner, type) else None
            if isinstance(raw, classmethod):
                setattr(owner, leaf, classmethod(self.wrap(raw.__func__, name)))
            elif isinstance(raw, staticmethod):
                setattr(owner, leaf, staticmethod(self.wrap(raw.__func__, name)))
            else:
                setattr(owner, leaf, self.wrap(getattr(owner, leaf), name))
        return missing

    def report(self) -> dict:
        return {
            "calls": {k: {"seconds": round(v[0], 4), "count": v[1]} for k, v in sorted(self.totals.items())},
            "calibration_passes": [round(p, 4) for p in self.passes],
        }


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def peak_memory() -> dict:
    import torch

    out = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ------------------------------------------------------------------------------ child processes


CHILDREN = {}


def child(fn):
    CHILDREN[fn.__name__] = fn
    return fn


class Runs:
    """Each measurement in its own process: forked from this one (imports already done, CUDA
    not yet initialised here) or, if forking cannot start CUDA, a fresh interpreter."""

    def __init__(self, log_dir: Path, mode: str):
        self.log_dir = log_dir
        self.mode = mode
        self.count = 0

    def __call__(self, name: str, **kwargs) -> dict:
        self.count += 1
        log = self.log_dir / f"{self.count:03d}-{name}-{kwargs.get('tag', '')}.log"
        res = self.fork(name, kwargs, log) if self.mode == "fork" else self.spawn(name, kwargs, log)
        if (
            self.mode == "fork"
            and not res.get("ok")
            and "CUDA" in res.get("error", "")
            and "init" in res.get("error", "")
        ):
            print(f"  forked child could not start CUDA ({res['error'][:200]}); fresh processes from now on")
            self.mode = "spawn"
            res = self.spawn(name, kwargs, log)
        if not res.get("ok"):
            res["log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            print(f"  {name} FAILED: {res.get('error')}\n{res['log_tail'][-1500:]}")
        return res

    def fork(self, name: str, kwargs: dict, log: Path) -> dict:
        r, w = os.pipe()
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            signal.alarm(CHILD_LIMIT_S)
            try:
                res = {"ok": True, "result": CHILDREN[name](**kwargs)}
            except BaseException as exc:  # noqa: BLE001
                res = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
                traceback.print_exc()
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(res, default=str).encode())
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        wall = time.perf_counter() - t
        if not data:
            return {"ok": False, "error": f"child died (status {status})", "process_wall": wall}
        res = json.loads(data)
        res["process_wall"] = wall
        return res

    def spawn(self, name: str, kwargs: dict, log: Path) -> dict:
        t = time.perf_counter()
        with log.open("w") as f:
            p = subprocess.run(
                [sys.executable, __file__, "--child", name, json.dumps(kwargs)],
                stdout=subprocess.PIPE,
                stderr=f,
                text=True,
                timeout=CHILD_LIMIT_S,
            )
        wall = time.perf_counter() - t
        line = next((ln for ln in p.stdout.splitlines()[::-1] if ln.startswith("QJOB_CHILD ")), None)
        if line is None:
            return {"ok": False, "error": f"exit {p.returncode}, no result", "process_wall": wall}
        res = json.loads(line[len("QJOB_CHILD ") :])
        res["process_wall"] = wall
        return res


def heavy_imports() -> float:
    """What every measured process has imported before its clock starts (torch, transformers,
    ModelOpt), done once in the parent; CUDA stays uninitialised so that children can fork."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    t = time.perf_counter()
    import modelopt.torch.export  # noqa: F401
    import modelopt.torch.opt  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if torch.cuda.is_initialized():  # an import started CUDA: forked children could not use it
        return -(time.perf_counter() - t)
    return time.perf_counter() - t


def use_variant(root: str) -> None:
    """Import qjob_api and qjob_runner from the checkout at ``root``."""
    for sub in ("jobrunner", "api"):
        sys.path.insert(0, str(Path(root) / sub))


# ------------------------------------------------------------------------------ setup


def calibration_texts(n: int) -> list[str]:
    from qjob_dev.tiny_models import pydoc_paragraphs

    paras = pydoc_paragraphs(40, 4000)
    texts, cur, i = [], "", 0
    while len(texts) < n:  # ~2,600 characters: more than 512 tokens of the pydoc tokenizer
        cur += " " + paras[i % len(paras)]
        i += 1
        if len(cur) > 2600:
            texts.append(cur.strip())
            cur = ""
    return texts


@child
def build_model(shape: str, folder: str, calib: str, samples: int) -> dict:
    import torch
    from qjob_dev.tiny_models import train_tokenizer, write_jsonl
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    out = Path(folder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train_tokenizer(tmp, vocab_size=4096)
    t_tok = time.perf_counter() - t0
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16 if dev == "cuda" else torch.float32)  # no float32 copy of 8B first
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    t = time.perf_counter()
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    sync()
    t_init = time.perf_counter() - t
    model.config.architectures = ["LlamaForCausalLM"]
    t = time.perf_counter()
    model.save_pretrained(str(tmp), max_shard_size="5GB")  # the shard size of the published Llama-3.1-8B
    t_save = time.perf_counter() - t
    os.replace(tmp, out)
    write_jsonl(Path(calib), calibration_texts(samples))
    files = sorted(out.glob("*.safetensors"))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "files": [(f.name, f.stat().st_size) for f in files],
        "tokenizer_s": t_tok,
        "init_s": t_init,
        "save_s": t_save,
    }


PRECOMPILE = r"""
import os, sys, time, torch
torch.cuda.is_available = lambda: True          # no GPU visible, as in `docker build`
t = time.time()
from modelopt.torch.quantization import extensions as e
assert e.get_cuda_ext(raise_if_failed=True) is not None
print("QJOB_PRECOMPILE", time.time() - t)
"""
LOADCHECK = r"""
import json, os, sys, time
from pathlib import Path
sys.path[:0] = [os.environ["QJOB_VARIANT"] + "/jobrunner", os.environ["QJOB_VARIANT"] + "/api"]
dst = Path(os.environ["TORCH_EXTENSIONS_DIR"])
t0 = time.time()
from qjob_runner.pipeline import prepare_extensions
prepare_extensions()
t1 = time.time()
built = {str(f): f.stat().st_mtime_ns for f in dst.rglob("*.so")}
import torch
from modelopt.torch.quantization import extensions as e
t2 = time.time()
assert e.get_cuda_ext(raise_if_failed=True) is not None
t3 = time.time()
x = torch.randn(1024, 1024, device="cuda")
after = {str(f): f.stat().st_mtime_ns for f in dst.rglob("*.so")}
print("QJOB_LOADCHECK " + json.dumps({"uid": os.getuid(), "copy_s": t1 - t0, "import_s": t2 - t1, "load_s": t3 - t2,
      "copied_bytes": sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()),
      "libraries": sorted(after), "recompiled": built != after or not after}))
"""


def start_prebuild(work: Path) -> subprocess.Popen | None:
    """ModelOpt's INT4 kernels, built the Dockerfile's way (the only extension these formats load)."""
    pre = work / "ext-prebuilt"
    if (pre / ".done").exists():
        return None
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(pre), "CUDA_VISIBLE_DEVICES": "", "TORCH_CUDA_ARCH_LIST": "9.0"}
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    log = (work / "prebuild.log").open("w")
    return subprocess.Popen([sys.executable, "-c", PRECOMPILE], env=env, stdout=log, stderr=subprocess.STDOUT)


def finish_prebuild(work: Path, proc: subprocess.Popen | None, t_started: float, variant: str) -> dict:
    pre = work / "ext-prebuilt"
    out: dict = {}
    if proc is not None:
        proc.wait()
        text = (work / "prebuild.log").read_text(errors="replace")
        out["compile_without_gpu_s"] = next(
            (float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("QJOB_PRECOMPILE")), None
        )
        out["prebuild_wall_s"] = time.perf_counter() - t_started
        if proc.returncode == 0:
            (pre / ".done").touch()
        else:
            out["prebuild_log_tail"] = text[-1500:]
    if not (pre / ".done").exists():
        return out
    # The pod: prebuilt folder read-only, an unprivileged user, only /tmp writable.
    ro, dst = work / "ext-ro", Path("/tmp/qjob-bench-pod-ext")
    shutil.rmtree(dst, ignore_errors=True)
    ro.mkdir(exist_ok=True)
    mounted = (
        subprocess.run(["mount", "--bind", str(pre), str(ro)], capture_output=True).returncode == 0
        and subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode == 0
    )
    subprocess.run(["chmod", "-R", "a+rX", str(pre)], check=False)
    src = ro if mounted else pre
    readable = Path("/tmp/qjob-bench-variant")
    shutil.rmtree(readable, ignore_errors=True)
    for sub in ("api", "jobrunner"):
        shutil.copytree(Path(variant) / sub, readable / sub)
    subprocess.run(["chmod", "-R", "a+rX", str(readable)], check=False)
    env = {
        **os.environ,
        "QJOB_VARIANT": str(readable),
        "QJOB_PREBUILT_EXTENSIONS": str(src),
        "TORCH_EXTENSIONS_DIR": str(dst),
        "TORCH_CUDA_ARCH_LIST": "9.0",
        "HOME": "/tmp",
    }
    kw = {"user": 65534, "group": 65534, "extra_groups": []} if os.getuid() == 0 else {}
    p = subprocess.run([sys.executable, "-c", LOADCHECK], env=env, capture_output=True, text=True, **kw)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("QJOB_LOADCHECK ")), None)
    out["pod_check"] = {
        "read_only_bind_mount": mounted,
        "unprivileged": bool(kw),
        "exit_code": p.returncode,
        "result": json.loads(line.split(" ", 1)[1]) if line else None,
        "log_tail": (p.stdout + p.stderr)[-800:],
    }
    if mounted:
        subprocess.run(["umount", str(ro)], check=False)
    return out


def hash_rate() -> dict:
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    buf = os.urandom(1 << 20) * 256  # 256 MiB
    t = time.perf_counter()
    hashlib.sha256(buf).hexdigest()
    one = len(buf) / (time.perf_counter() - t)
    n = min(8, os.cpu_count() or 1)
    t = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda _: hashlib.sha256(buf).hexdigest(), range(n)))
    many = n * len(buf) / (time.perf_counter() - t)
    return {"one_thread_GBps": one / 1e9, f"{n}_threads_GBps": many / 1e9}


def batches_for(tok, texts, batch, seq, dev):
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=seq)
        out.append({k: v.to(dev) for k, v in enc.items() if k in {"input_ids", "attention_mask"}})
    return out


def load_for_child(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=dev).eval()
    return tok, model, dev


def time_forward(model, batches, extra, reps: int) -> list[float]:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            for b in batches:
                model(**b, **extra)
            sync()
            times.append(time.perf_counter() - t)
    return times


@child
def forward_baseline(model_dir: str, calib: str, samples: list[int], batch: int, seq: int) -> dict:
    """One bf16 forward pass over each calibration set, as the plain script's loop does it."""
    tok, model, dev = load_for_child(model_dir)
    texts = [json.loads(ln)["text"] for ln in Path(calib).read_text().splitlines()]
    out = {}
    for n in samples:
        b = batches_for(tok, texts[:n], batch, seq, dev)
        time_forward(model, b[:1], {}, 1)  # warm-up
        reps = 2 if n <= 128 else 1
        out[str(n)] = {
            "full_logits": time_forward(model, b, {}, reps),
            "last_logits": time_forward(model, b, {"logits_to_keep": 1}, reps),
            "tokens": sum(int(x["attention_mask"].sum()) for x in b),
        }
    return out


# ------------------------------------------------------------------------------ measured runs


@child
def plain(model_dir: str, calib: str, fmt: str, out: str, samples: int, seq: int, batch: int, tag: str = "") -> dict:
    import runner_plain_modelopt

    prof = Profile()
    missing = prof.install()
    res = runner_plain_modelopt.main(model_dir, calib, fmt, out, samples, seq, batch)
    res.update(profile=prof.report(), profile_missing=missing, **peak_memory())
    return res


@child
def runner(
    variant: str,
    model_dir: str,
    calib: str,
    fmt: str,
    out: str,
    samples: int,
    seq: int,
    batch: int,
    tag: str = "",
    fail_export: bool = False,
) -> dict:
    import torch

    use_variant(variant)
    from qjob_api.runner import RunnerConfig
    from qjob_runner import run

    if fail_export:  # the pod "dies" in the export, after calibration
        from qjob_runner.steps import export

        def fail(*a, **k):
            raise ConnectionResetError("node drained (benchmark)")

        export.export_hf = fail

    prof = Profile()
    missing = prof.install()
    cfg = RunnerConfig.model_validate(
        {
            "job": f"bench-{fmt}",
            "model": {"path": model_dir, "dtype": "bfloat16" if torch.cuda.is_available() else "float32"},
            "quantization": {"format": fmt},
            "targetArchitectures": [],
            "calibration": {
                "dataset": {"path": calib},
                "samples": samples,
                "sequenceLength": seq,
                "batchSize": batch,
            },
            "evaluation": {"enabled": False},
            "outputDir": out,
        }
    )
    t = time.perf_counter()
    r = run(cfg)
    wall = time.perf_counter() - t
    man = json.loads((Path(out) / "manifest.json").read_text()) if (Path(out) / "manifest.json").exists() else {}
    hf = Path(out) / "hf"
    states = list((Path(out) / ".qjob-work").glob("calibrated-*.safetensors"))
    return {
        "resumed": man.get("resumedFromCalibrationState"),
        "state_file_bytes": states[0].stat().st_size if states else None,
        "file_sha256": {f["path"]: f["sha256"] for a in man.get("artifacts", []) for f in a.get("files", [])},
        "outcome": r.outcome,
        "message": r.message,
        "wall_run": wall,
        "step_seconds": r.step_seconds,
        "calibration_seconds": man.get("metrics", {}).get("calibration_seconds"),
        "batch_size": man.get("metrics", {}).get("calibration", {}).get("batch_size"),
        "checkpoint_bytes": sum(p.stat().st_size for p in hf.rglob("*") if p.is_file()) if hf.exists() else None,
        "shards": len(list(hf.glob("*.safetensors"))) if hf.exists() else None,
        "profile": prof.report(),
        "profile_missing": missing,
        **peak_memory(),
    }


def work_seconds(entry: dict) -> float:
    return entry["times"]["total_after_import"] if "times" in entry else entry["wall_run"]


def hash_wait(entry: dict) -> float:
    calls = entry.get("profile", {}).get("calls", {})
    # before: describe() hashes everything after the export; after: report waits for hashes under way
    return (calls.get("runner.wait_for_hashes") or calls.get("runner.describe") or {"seconds": 0.0})["seconds"]


def overhead(args, runs: Runs, results: dict, save) -> None:
    w = Path(args.work)
    model_dir, calib = str(w / "model"), str(w / "calib.jsonl")
    variants = dict(args.runner)
    table = results.setdefault("overhead", {})
    for fmt in args.formats:
        if fmt in CUDA_ONLY and not cuda():
            continue
        n = SAMPLES[fmt] if args.shape != "tiny" else 16
        rows = table.setdefault(fmt, [])
        for rep in range(args.first_rep, args.first_rep + args.repeats):
            order = ["plain", *variants]  # alternate: the other order on odd repeats
            order = [x for x in order if x in ("plain", "after") or rep < args.other_repeats]
            for who in order if rep % 2 == 0 else order[::-1]:
                if time.monotonic() > args.deadline:
                    print("  deadline reached: stopping the overhead runs")
                    return
                out = str(w / f"out-{who}-{fmt}")
                shutil.rmtree(out, ignore_errors=True)
                common = dict(model_dir=model_dir, calib=calib, fmt=fmt, out=out, samples=n, seq=args.seq)
                if who == "plain":
                    res = runs("plain", **common, batch=args.batch, tag=f"{fmt}-{rep}")
                else:
                    res = runs("runner", variant=variants[who], **common, batch=args.batch, tag=f"{who}-{fmt}-{rep}")
                shutil.rmtree(out, ignore_errors=True)
                rows.append({"who": who, "rep": rep, **res})
                if res.get("ok"):
                    r = res["result"]
                    print(
                        f"  {fmt:8s} {who:7s} rep {rep}: {work_seconds(r):7.2f} s  hash wait {hash_wait(r):5.2f} s  "
                        f"peak {r.get('peak_gpu_bytes', 0) / 2**30:6.1f} GiB  process {res['process_wall']:.1f} s"
                    )
                save()


def resume_check(args, runs: Runs, results: dict) -> None:
    """A run whose export fails must leave the calibration state (for AWQ the GPU snapshot of the
    rescaled weights, written on the failure) from which a retry exports, without calibrating
    again, the same checkpoint file by file as the uninterrupted 'after' runs."""
    w = Path(args.work)
    checks = results.setdefault("resume_check", {})
    for fmt in args.resume_check:
        rows = results.get("overhead", {}).get(fmt, [])
        first = next((r for r in rows[::-1] if r["who"] == "after" and r.get("ok")), None)
        if first is None or time.monotonic() > args.deadline:
            continue
        out = w / f"out-resume-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        n = SAMPLES[fmt] if args.shape != "tiny" else 16
        common = dict(model_dir=str(w / "model"), calib=str(w / "calib.jsonl"), fmt=fmt, out=str(out), samples=n)
        variant = dict(args.runner)["after"]
        failed = runs("runner", variant=variant, **common, seq=args.seq, batch=args.batch, tag="fail", fail_export=True)
        res = runs("runner", variant=variant, **common, seq=args.seq, batch=args.batch, tag="resume")
        shutil.rmtree(out, ignore_errors=True)
        if not (failed.get("ok") and res.get("ok")):
            checks[fmt] = {"failed_run": failed, "resumed_run": res}
            continue
        a, b = first["result"]["file_sha256"], res["result"]["file_sha256"]
        checks[fmt] = {
            "failed_run": {k: failed["result"][k] for k in ("outcome", "message", "state_file_bytes", "wall_run")},
            "resumed": res["result"]["resumed"],
            "files": len(a),
            "same_sha256": a == b,
            "differing": sorted(k for k in a if a[k] != b.get(k))[:10],
            "resumed_run_s": res["result"]["wall_run"],
        }
        print(f"  resume check {fmt}: {checks[fmt]}")


def summarize_overhead(results: dict) -> dict:
    summary = {}
    for fmt, rows in results.get("overhead", {}).items():
        ok = [r for r in rows if r.get("ok")]
        by = {}
        for r in (r for r in ok if not r.get("first_in_call")):
            by.setdefault(r["who"], []).append(r["result"])
        if "plain" not in by:
            continue
        plain_med = statistics.median(work_seconds(x) for x in by["plain"])
        s = {"plain_median_s": plain_med, "plain_runs_s": [work_seconds(x) for x in by["plain"]]}
        s["left_out_first_in_call"] = [(r["who"], work_seconds(r["result"])) for r in ok if r.get("first_in_call")]
        for who, xs in by.items():
            if who == "plain":
                continue
            med = statistics.median(work_seconds(x) for x in xs)
            med_nohash = statistics.median(work_seconds(x) - hash_wait(x) for x in xs)
            steps = {k: statistics.median(x["step_seconds"].get(k, 0) for x in xs) for k in xs[0]["step_seconds"]}
            s[who] = {
                "runs_s": [work_seconds(x) for x in xs],
                "median_s": med,
                "overhead": med / plain_med - 1,
                "overhead_without_hash_wait": med_nohash / plain_med - 1,
                "hash_wait_median_s": statistics.median(hash_wait(x) for x in xs),
                "step_median_s": steps,
                "calibration_median_s": statistics.median(x.get("calibration_seconds") or 0 for x in xs),
                "peak_gpu_GiB": max(x.get("peak_gpu_bytes", 0) for x in xs) / 2**30,
                "shards": xs[0].get("shards"),
                "checkpoint_bytes": xs[0].get("checkpoint_bytes"),
            }
        s["plain_step_median_s"] = {
            k: statistics.median(x["times"][k] for x in by["plain"]) for k in by["plain"][0]["times"]
        }
        s["plain_peak_gpu_GiB"] = max(x.get("peak_gpu_bytes", 0) for x in by["plain"]) / 2**30
        summary[fmt] = s
    return summary


# ------------------------------------------------------------------------------ calibration


@child
def calibration_candidates(model_dir: str, calib: str, fmt: str, samples: int, seq: int, batches: list[int]) -> dict:
    """Calibration time per batch size (full logits and last position only) against a bf16
    forward pass over the same batches; quantizer insertion timed once."""
    import modelopt.torch.quantization as mtq
    import runner_plain_modelopt
    import torch

    tok, model, dev = load_for_child(model_dir)
    texts = [json.loads(ln)["text"] for ln in Path(calib).read_text().splitlines()][:samples]
    sets = {bs: batches_for(tok, texts, bs, seq, dev) for bs in batches}
    kinds = {"full_logits": {}, "last_logits": {"logits_to_keep": 1}}
    fwd = {}
    for bs, b in sets.items():
        time_forward(model, b[:1], {}, 1)
        for kind, extra in kinds.items():
            fwd[f"{bs}/{kind}"] = time_forward(model, b, extra, 1)[0]
    cfg = getattr(mtq, runner_plain_modelopt.PRESETS[fmt])
    prof = Profile()
    prof.install()

    def loop_for(b, extra):
        def forward_loop(m):
            with torch.no_grad():
                for x in b:
                    m(**x, **extra)

        return forward_loop

    first = batches[0]
    t = time.perf_counter()
    mtq.quantize(model, cfg, loop_for(sets[first], {}))
    sync()
    quantize_s = time.perf_counter() - t
    calib_first = prof.totals["mtq.calibrate"][0]
    cal = {}
    for bs, b in sets.items():
        for kind, extra in kinds.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            mtq.calibrate(model, cfg["algorithm"], forward_loop=loop_for(b, extra))
            sync()
            s = time.perf_counter() - t
            cal[f"{bs}/{kind}"] = {
                "calibrate_s": s,
                "forward_s": fwd[f"{bs}/{kind}"],
                "ratio": s / fwd[f"{bs}/{kind}"],
                "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0,
            }
    return {
        "quantize_first_s": quantize_s,
        "quantizer_insertion_s": quantize_s - calib_first,
        "calibrate_in_quantize_s": calib_first,
        "first_batch": first,
        "candidates": cal,
    }


# ------------------------------------------------------------------------------ warm start


def warm_child(variant: str, model_dir: str, calib: str, out: str, timeline: str) -> None:
    """Pod start to the first calibration batch; writes the timeline and exits there."""
    t_main = time.time()
    t_spawn = float(os.environ["QJOB_T_SPAWN"])
    use_variant(variant)
    from qjob_api.runner import RunnerConfig
    from qjob_runner.pipeline import run
    from qjob_runner.reporting import Reporter

    t_ours = time.time()
    marks: dict = {"interpreter_start_s": t_main - t_spawn, "runner_imports_s": t_ours - t_main}

    class Timeline(Reporter):
        def step_done(self, step, seconds):
            marks[f"step.{step}"] = seconds
            super().step_done(step, seconds)

        def update(self, *a, **kw):
            if "calibration batch 1/" in (kw.get("message") or ""):
                marks["first_batch_since_spawn_s"] = time.time() - t_spawn
                marks["modules"] = sorted(m for m in sys.modules if "." not in m)
                Path(timeline).write_text(json.dumps(marks))
                sys.stderr.flush()
                os._exit(0)
            super().update(*a, **kw)

    cfg = RunnerConfig.model_validate(
        {
            "job": "warm",
            "model": {"path": model_dir, "dtype": "bfloat16"},
            "quantization": {"format": "fp8"},
            "targetArchitectures": [],
            "calibration": {"dataset": {"path": calib}, "samples": 128, "sequenceLength": 512, "batchSize": 16},
            "evaluation": {"enabled": False},
            "outputDir": out,
        }
    )
    run(cfg, reporter=Timeline("quantize", []))


def drop_caches() -> bool:
    if not cuda():  # only on the lent GPU machine, never on a shared development VM
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def import_times(stderr: str) -> dict:
    """Seconds per top-level package from ``python -X importtime`` (imports made at top level)."""
    out: dict = {}
    for ln in stderr.splitlines():
        parts = ln.split("|")
        if not ln.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        if len(name) - len(name.lstrip()) == 1:  # not nested under another import
            root = name.strip().split(".")[0]
            out[root] = out.get(root, 0) + int(parts[1]) / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:12])


def warmstart(args, results: dict, save) -> None:
    w = Path(args.work)
    model_dir = w / "model"
    ws = results.setdefault("warmstart", {})
    dropped = drop_caches()
    t = time.perf_counter()
    size = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb", buffering=0) as fh:
            buf = bytearray(16 << 20)
            while n := fh.readinto(buf):
                size += n
    raw = time.perf_counter() - t
    ws["raw_read"] = {"page_cache_dropped": dropped, "bytes": size, "seconds": raw, "GBps": size / raw / 1e9}
    print(f"  raw read of the weights (cache dropped: {dropped}): {size / raw / 1e9:.2f} GB/s")
    pre = w / "ext-prebuilt"
    for who, variant in args.runner:
        if time.monotonic() > args.deadline:
            return
        out, timeline = w / f"warm-{who}", w / f"warm-{who}.json"
        shutil.rmtree(out, ignore_errors=True)
        timeline.unlink(missing_ok=True)
        dst = Path(f"/tmp/qjob-bench-warm-ext-{who}")
        shutil.rmtree(dst, ignore_errors=True)
        env = {**os.environ, "QJOB_T_SPAWN": "", "TORCH_EXTENSIONS_DIR": str(dst), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        if (pre / ".done").exists():
            env["QJOB_PREBUILT_EXTENSIONS"] = str(pre)
        drop_caches()
        env["QJOB_T_SPAWN"] = repr(time.time())
        spec = json.dumps([variant, str(model_dir), str(w / "calib.jsonl"), str(out), str(timeline)])
        p = subprocess.run(
            [sys.executable, "-X", "importtime", __file__, "--warm", spec],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        marks = json.loads(timeline.read_text()) if timeline.exists() else {"error": p.stderr[-1500:]}
        marks["imports"] = import_times(p.stderr)
        marks["extension_copy_bytes"] = (
            sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) if dst.exists() else 0
        )
        marks.pop("modules", None)
        ws[who] = marks
        shutil.rmtree(out, ignore_errors=True)
        print(f"  warm start {who}: {json.dumps(marks)[:600]}")
        save()


# ------------------------------------------------------------------------------ main


def forward_seconds(results: dict, fmt: str, kind: str) -> float | None:
    """Median bf16 forward over the format's calibration set (``full_logits`` or ``last_logits``)."""
    n = SAMPLES.get(fmt) if results.get("settings", {}).get("shape") != "tiny" else 16
    times = results.get("forward_baseline", {}).get(str(n), {}).get(kind)
    return statistics.median(times) if times else None


def print_summary(results: dict) -> None:
    print("\nSUMMARY (seconds of work after identical imports; medians; calib = mtq.quantize incl. insertion)")
    for fmt, x in results.get("summary", {}).items():
        full, last = forward_seconds(results, fmt, "full_logits"), forward_seconds(results, fmt, "last_logits")
        plain_q = x["plain_step_median_s"].get("quantize", 0)
        ratio = f"calib/fwd {plain_q / full:.2f}x" if full else ""
        print(f"  {fmt}: bf16 forward {full or 0:.2f} s (last-position logits {last or 0:.2f} s)")
        print(f"    plain   {x['plain_median_s']:7.2f} s  {ratio}  peak {x['plain_peak_gpu_GiB']:.1f} GiB")
        print(f"            steps {fmt_steps(x['plain_step_median_s'])}")
        for who, y in x.items():
            if not isinstance(y, dict) or "median_s" not in y:
                continue
            cal = y["calibration_median_s"]
            ratio = f"calib/fwd {cal / full:.2f}x (vs last-logits fwd {cal / last:.2f}x)" if full and last else ""
            print(
                f"    {who:7s} {y['median_s']:7.2f} s  overhead {y['overhead']:+.1%}, without hash wait "
                f"{y['overhead_without_hash_wait']:+.1%} (wait {y['hash_wait_median_s']:.2f} s)  {ratio}  "
                f"peak {y['peak_gpu_GiB']:.1f} GiB  {y['shards']} shards"
            )
            print(f"            steps {fmt_steps(y['step_median_s'])}")
    for fmt, c in results.get("calibration", {}).items():
        if not c.get("ok"):
            continue
        r = c["result"]
        print(
            f"  calibration candidates {fmt}: quantizer insertion {r['quantizer_insertion_s']:.2f} s; "
            f"calibration inside mtq.quantize {r['calibrate_in_quantize_s']:.2f} s at batch {r['first_batch']}"
        )
        for k, v in r["candidates"].items():
            print(
                f"    batch/logits {k:18s} calibrate {v['calibrate_s']:6.2f} s  forward {v['forward_s']:6.2f} s  "
                f"ratio {v['ratio']:.2f}  peak {v['peak_gpu_GiB']:.1f} GiB"
            )
    for fmt, c in results.get("batch0", {}).items():
        if c.get("ok"):
            r = c["result"]
            full = forward_seconds(results, fmt, "full_logits")
            print(
                f"  batchSize 0 {fmt}: batch {r['batch_size']}, calibration {r['calibration_seconds']:.2f} s "
                f"({r['calibration_seconds'] / full:.2f}x the batch-16 bf16 forward), run {r['wall_run']:.2f} s, "
                f"peak {r.get('peak_gpu_bytes', 0) / 2**30:.1f} GiB"
                if full
                else f"  batchSize 0 {fmt}: batch {r['batch_size']}"
            )
    for who, m in results.get("warmstart", {}).items():
        if who != "raw_read" and "first_batch_since_spawn_s" in m:
            steps = {k[5:]: v for k, v in m.items() if k.startswith("step.")}
            print(
                f"  warm start {who}: first calibration batch {m['first_batch_since_spawn_s']:.1f} s after spawn; "
                f"ours {m['runner_imports_s']:.2f} s imports; steps {fmt_steps(steps)}; imports {m['imports']}"
            )


def merge(target: Path, parts: list[Path], drop_first_run: bool = False) -> None:
    """``--merge [--drop-first-run] OUT.json CALL1.json CALL2.json ...``: one results file from
    several device calls. ``--drop-first-run`` leaves each call's first measured run out of the
    medians (listed apart): on the lent H200 the first INT4 AWQ run of every call, plain or runner,
    spent ~2.5x as long in ModelOpt's search pass."""
    results: dict = {"calls": [], "overhead": {}}
    for part in parts:
        r = json.loads(part.read_text())
        results["calls"] += r.get("calls", [])
        first = next((rows[0] for rows in r.get("overhead", {}).values() if rows), None)
        if drop_first_run and first is not None:
            first["first_in_call"] = True
        for fmt, rows in r.get("overhead", {}).items():
            results["overhead"].setdefault(fmt, []).extend(rows)
        for key in ("calibration", "batch0", "warmstart"):
            results.setdefault(key, {}).update(r.get(key, {}))
        for key, value in r.items():
            results.setdefault(key, value)
    results["summary"] = summarize_overhead(results)
    target.write_text(json.dumps(results, indent=1, default=str))
    print_summary(results)


def fmt_steps(steps: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in steps.items() if v >= 0.005)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        res = {"ok": True, "result": CHILDREN[sys.argv[2]](**json.loads(sys.argv[3]))}
        print("QJOB_CHILD " + json.dumps(res, default=str))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--warm":
        warm_child(*json.loads(sys.argv[2]))
        return
    if len(sys.argv) > 3 and sys.argv[1] == "--merge":
        drop = sys.argv[2] == "--drop-first-run"
        merge(Path(sys.argv[2 + drop]), [Path(p) for p in sys.argv[3 + drop :]], drop_first_run=drop)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 8b on a GPU, tiny on CPU")
    ap.add_argument("--formats", default="fp8,nvfp4,int4_awq")
    ap.add_argument("--repeats", type=int, default=3, help="runs of plain and of the 'after' runner per format")
    ap.add_argument("--other-repeats", type=int, default=1, help="runs of the other runner variants per format")
    ap.add_argument("--first-rep", type=int, default=0, help="number of the first repeat (a later call goes on)")
    ap.add_argument(
        "--resume-check",
        default="",
        help="formats (comma-separated) run once more with a failing export, then retried: the retry must resume "
        "from the saved calibration state and export the checkpoint of the 'after' runs, sha256 for sha256",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--runner",
        action="append",
        default=None,
        help="NAME=CHECKOUT of a runner variant (default after=this checkout)",
    )
    ap.add_argument("--phases", default="setup,overhead,calibration,batch0,warmstart")
    ap.add_argument("--work", default=None, help="default /tmp/qjob-bench/<shape>")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks/results"))
    ap.add_argument("--name", default="runner_gpu.json")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which no new measured run starts")
    ap.add_argument("--mode", choices=["fork", "spawn"], default="fork")
    args = ap.parse_args()
    started = time.monotonic()
    args.deadline = started + args.budget
    args.formats = [f for f in args.formats.split(",") if f]
    args.resume_check = [f for f in args.resume_check.split(",") if f]
    args.runner = [tuple(x.split("=", 1)) for x in (args.runner or [f"after={ROOT}"])]
    args.runner = [(k, str(Path(v).resolve())) for k, v in args.runner]
    phases = set(args.phases.split(","))

    imports_s = heavy_imports()
    if imports_s < 0:
        print("CUDA initialised by an import: fresh processes instead of forks")
        args.mode, imports_s = "spawn", -imports_s
    import torch

    args.shape = args.shape or ("8b" if torch.cuda.is_available() else "tiny")
    args.work = args.work or f"/tmp/qjob-bench/{args.shape}"
    w = Path(args.work)
    w.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) / args.name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    results.setdefault("calls", []).append(
        {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )
    results["settings"] = {
        "shape": args.shape,
        "model": SHAPES[args.shape],
        "samples": SAMPLES,
        "sequence_length": args.seq,
        "batch_size": args.batch,
        "runners": dict(args.runner),
        "heavy_imports_s": imports_s,
    }

    def save():
        results["summary"] = summarize_overhead(results)
        out_path.write_text(json.dumps(results, indent=1, default=str))
        shutil.copy(out_path, w / args.name)

    runs = Runs(w, args.mode)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')",
        ],
        capture_output=True,
        text=True,
    )
    results["device"] = probe.stdout.strip()
    print(f"device {results['device']}; shape {args.shape}; heavy imports {imports_s:.1f} s; work {w}")

    setup_file = w / "setup.json"  # a later call on the same machine reuses the setup
    if "setup" in phases and setup_file.exists():
        results.update(json.loads(setup_file.read_text()))
        print("  setup from an earlier call on this machine")
    elif "setup" in phases:
        t = time.perf_counter()
        proc = start_prebuild(w) if torch.cuda.is_available() else None
        if not (w / "model" / "config.json").exists() or not (w / "calib.jsonl").exists():
            res = runs(
                "build_model",
                shape=args.shape,
                folder=str(w / "model"),
                calib=str(w / "calib.jsonl"),
                samples=max(SAMPLES.values()),
            )
            results["model_build"] = res
            print(f"  model built: {json.dumps(res.get('result'))[:300]}")
        results["sha256_rate"] = hash_rate()
        print(f"  sha256: {results['sha256_rate']}")
        res = runs(
            "forward_baseline",
            model_dir=str(w / "model"),
            calib=str(w / "calib.jsonl"),
            samples=sorted({SAMPLES[f] if args.shape != "tiny" else 16 for f in args.formats}),
            batch=args.batch,
            seq=args.seq,
        )
        if res.get("ok"):
            results["forward_baseline"] = res["result"]
            print(f"  bf16 forward: {json.dumps(res['result'])[:400]}")
        if torch.cuda.is_available():
            results["extensions"] = finish_prebuild(w, proc, t, args.runner[0][1])
            print(f"  extensions: {json.dumps(results['extensions'])[:900]}")
        keys = ("model_build", "sha256_rate", "forward_baseline", "extensions")
        setup_file.write_text(json.dumps({k: results[k] for k in keys if k in results}, default=str))
        save()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(w / "ext-prebuilt")  # measured runs load, never compile
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # the flags the prebuild used (the image sets both)
    if "overhead" in phases:
        overhead(args, runs, results, save)
        save()
    if args.resume_check:
        resume_check(args, runs, results)
        save()
    if "calibration" in phases:
        cal = results.setdefault("calibration", {})
        for fmt in [f for f in args.formats if f in {"fp8", "nvfp4"}]:
            if time.monotonic() > args.deadline or (fmt in CUDA_ONLY and not torch.cuda.is_available()):
                continue
            bss = [16, 32, 64, 128] if args.shape != "tiny" else [4, 8, 16]
            cal[fmt] = runs(
                "calibration_candidates",
                model_dir=str(w / "model"),
                calib=str(w / "calib.jsonl"),
                fmt=fmt,
                samples=128 if args.shape != "tiny" else 16,
                seq=args.seq,
                batches=bss,
            )
            save()
    if "batch0" in phases:
        b0 = results.setdefault("batch0", {})
        for fmt in [f for f in args.formats if f in {"fp8", "nvfp4"}]:
            if time.monotonic() > args.deadline or (fmt in CUDA_ONLY and not torch.cuda.is_available()):
                continue
            out = str(w / f"out-batch0-{fmt}")
            n = SAMPLES[fmt] if args.shape != "tiny" else 16
            b0[fmt] = runs(
                "runner",
                variant=args.runner[0][1],
                model_dir=str(w / "model"),
                calib=str(w / "calib.jsonl"),
                fmt=fmt,
                out=out,
                samples=n,
                seq=args.seq,
                batch=0,
                tag=f"batch0-{fmt}",
            )
            shutil.rmtree(out, ignore_errors=True)
            if b0[fmt].get("ok"):
                r = b0[fmt]["result"]
                print(f"  batch0 {fmt}: batch {r['batch_size']}, calibration {r['calibration_seconds']:.2f} s")
            save()
    if "warmstart" in phases:
        warmstart(args, results, save)
    results["calls"][-1]["seconds"] = time.monotonic() - started
    save()
    print_summary(results)
    print(f"\nresults: {out_path}")


if __name__ == "__main__":
    main()
