"""The runner's half of the work key (``qjob_api.work``): resolving the inputs.

``inputs_after_run`` reads them from what the quantize stage already resolved (the cache entry
or snapshot commit, the calibration texts it used, its own library versions);
``resolve_inputs`` finds them without downloading the model, for the reuse stage. Both name the
model the same way: ``hf:<repo>@<commit>``, ``s3:<cache key of the objects' keys, sizes and
ETags>`` (the model cache's entry name) or ``files:<sha256 over the folder's files>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from qjob_api.v1alpha1 import WorkInputs
from qjob_api.work import recipe_key, work_key, work_versions

from .artifacts import FileHashes, describe
from .context import RunContext
from .errors import InvalidInput
from .versions import library_versions

#: A full git commit id: a revision that names itself needs no lookup.
COMMIT = re.compile(r"[0-9a-f]{40}")


def start_hashing_model(ctx: RunContext, folder: Path) -> None:
    """A PVC model has no published revision: its files' sha256s are its identity. They are hashed
    in background threads while the GPU stage loads and calibrates (see ``FileHashes``)."""
    if ctx.config.work_recipe is None:
        return
    ctx.model_hashes = FileHashes(workers=2)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ctx.model_hashes.submit(path)


def folder_revision(folder: Path, hashes: FileHashes | None = None) -> str:
    if not folder.is_dir():
        raise InvalidInput(f"model folder {folder} does not exist", "check spec.model.pvc (claimName and path)")
    return "files:" + describe(folder, hashes)[1]


def model_revision(ctx: RunContext) -> str:
    """The model revision this stage ran on (after the resolve step)."""
    m = ctx.config.model
    if m.path:
        try:
            return folder_revision(Path(m.path), ctx.model_hashes)
        finally:
            if ctx.model_hashes:
                ctx.model_hashes.close()
    entry = str(ctx.metrics.get("modelCacheEntry", ""))
    if m.s3:
        return f"s3:{entry.rsplit('/', 1)[-1]}"
    commit = ctx.metrics.get("modelRevision") or entry.rsplit("--", 1)[-1]
    return f"hf:{m.hf_repo}@{commit}"


def resolve_model_revision(ctx: RunContext) -> str:
    """The model revision a job would run on now, without downloading the model."""
    from . import modelcache
    from .storage import ObjectStore

    m = ctx.config.model
    if m.path:
        return folder_revision(Path(m.path))
    if m.s3:
        return f"s3:{modelcache.cache_key(m.s3, ObjectStore(m.s3).list(m.s3.prefix))}"
    if COMMIT.fullmatch(m.revision):
        return f"hf:{m.hf_repo}@{m.revision}"
    from huggingface_hub import HfApi

    from .steps.resolve import hub_errors

    with hub_errors(m):
        info = HfApi().model_info(m.hf_repo, revision=m.revision, token=os.environ.get("HF_TOKEN") or None)
    return f"hf:{m.hf_repo}@{info.sha}"


def own_versions() -> dict[str, str]:
    return work_versions(library_versions())


def inputs_after_run(ctx: RunContext) -> WorkInputs:
    return WorkInputs(model_revision=model_revision(ctx), calibration_data=ctx.data.digest, versions=own_versions())


def record(ctx: RunContext) -> dict[str, Any] | None:
    """The work entry of manifest.json (None without a recipe: a config from an older operator)."""
    recipe = ctx.config.work_recipe
    if recipe is None or ctx.work is None:
        return None
    return {"key": work_key(recipe, ctx.work), "recipeKey": recipe_key(recipe), "inputs": ctx.work.to_api()}
