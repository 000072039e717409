"""Build ModelOpt's CUDA extensions at image build time (no GPU there), so no job pays for it.

ModelOpt compiles ``modelopt_cuda_ext`` (INT4/INT8 fake-quant kernels), ``modelopt_cuda_ext_fp8``
and ``modelopt_cuda_ext_mx`` with ``torch.utils.cpp_extension.load`` on first use: 87 s for the
first on the lent H100, and a first FP8 fake-quant forward (evaluation) waited ~60 s for the
second. ModelOpt skips the build when ``torch.cuda.is_available()`` is False, which it is during
``docker build``; we make it True for this process only. TORCH_CUDA_ARCH_LIST and
TORCH_EXTENSIONS_DIR must be the same at run time (the Dockerfile sets both as ENV): the runtime
``load`` then finds the ninja build up to date and only imports the .so. Checked on the H100:
compiled in a process that saw no GPU, then "Loaded extension modelopt_cuda_ext in 0.0 seconds"
in a process that did (benchmarks/results/runner_gpu_h100.json, extension_prebuild_check); the
runtime copy from a read-only prebuilt folder was checked on the H200 (docs/jobrunner.md).
"""

import os
import time

import torch

assert os.environ.get("TORCH_CUDA_ARCH_LIST"), "set TORCH_CUDA_ARCH_LIST (e.g. '8.9;9.0;10.0')"
torch.cuda.is_available = lambda: True  # build-time only: no GPU in `docker build`

from modelopt.torch.quantization import extensions  # noqa: E402

for name in ("get_cuda_ext", "get_cuda_ext_fp8", "get_cuda_ext_mx"):
    t = time.time()
    assert getattr(extensions, name)(raise_if_failed=True) is not None, name
    print(f"{name}: built in {time.time() - t:.0f} s", flush=True)
