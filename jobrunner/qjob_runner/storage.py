"""Object stores (Amazon S3 and S3-compatible servers) through boto3/s3transfer.

Uploads are complete-or-absent from a reader's view: the old ``manifest.json`` under the prefix is
deleted first, every other file is uploaded (large files in parallel multipart parts, all files
through one transfer manager), and ``manifest.json`` is uploaded last, so its presence means
complete. Transient failures (5xx, throttling, connection errors) are retried with exponential
backoff by botocore's ``standard`` retry mode; permanent ones (no such bucket, refused
credentials, denied access, TLS verification) fail at once with the spec field and the fix.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from qjob_api.runner import RunnerS3

from .artifacts import MANIFEST
from .errors import InvalidConfig, InvalidInput, RunnerError, TransientError

log = logging.getLogger("qjob_runner.storage")

MiB = 1 << 20
#: botocore's retry budget per request (exponential backoff with jitter); AWS_MAX_ATTEMPTS overrides.
DEFAULT_MAX_ATTEMPTS = 8
#: Error codes some stores return for an unknown access key or a bad signature (all HTTP 403).
CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationHeaderMalformed",
    "InvalidToken",
    "ExpiredToken",
    "XAdminUserNotFound",  # versitygw
}
#: Bytes (done, total) -> None, called from transfer threads.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TransferSettings:
    """Multipart part size and parallel requests; env ``QJOB_S3_PART_SIZE_MIB`` / ``QJOB_S3_CONCURRENCY``."""

    part_size: int = 64 * MiB
    concurrency: int = 16

    @classmethod
    def from_env(cls) -> TransferSettings:
        return cls(
            part_size=int(os.environ.get("QJOB_S3_PART_SIZE_MIB", cls.part_size // MiB)) * MiB,
            concurrency=int(os.environ.get("QJOB_S3_CONCURRENCY", cls.concurrency)),
        )


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class _Counter:
    """Thread-safe byte counter feeding a Progress callback (s3transfer subscriber protocol)."""

    def __init__(self, total: int, progress: Progress | None):
        import threading

        self.total, self.done, self.progress = total, 0, progress
        self._lock = threading.Lock()

    def subscriber(self):
        from s3transfer.subscribers import BaseSubscriber

        counter = self

        class _Sub(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):
                with counter._lock:
                    counter.done += bytes_transferred
                    done = counter.done
                if counter.progress:
                    counter.progress(done, counter.total)

        return _Sub()


class ObjectStore:
    """One S3 location (bucket + prefix) and the client that reaches it."""

    def __init__(self, location: RunnerS3, transfer: TransferSettings | None = None):
        self.location = location
        self.transfer = transfer or TransferSettings.from_env()

    # ------------------------------------------------------------------------------ client

    @property
    def where(self) -> str:
        return f"{self.location.endpoint or 'Amazon S3'} ({self.location.field})"

    def _credentials(self) -> dict[str, str]:
        env = self.location.credentials_env
        if not env:
            return {}  # boto3's default chain: IRSA, instance profile, AWS_* variables
        key, secret = os.environ.get(f"{env}_ACCESS_KEY_ID"), os.environ.get(f"{env}_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise InvalidConfig(
                f"the credentials for {self.location.field} are missing ({env}_ACCESS_KEY_ID/_SECRET_ACCESS_KEY unset)",
                f"point {self.location.field}.credentialsSecretRef at a Secret with keys accessKeyId and "
                "secretAccessKey",
            )
        return {"aws_access_key_id": key, "aws_secret_access_key": secret}

    @cached_property
    def client(self):
        import boto3
        from botocore.config import Config

        loc = self.location
        config = Config(
            region_name=loc.region,
            retries={"mode": "standard", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=self.transfer.concurrency + 4,
            # Self-hosted stores rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path"} if loc.endpoint else {},
            user_agent_extra="qjob-runner",
        )
        verify: bool | str | None = False if loc.insecure else (loc.ca_bundle or None)
        return boto3.session.Session().client(
            "s3", endpoint_url=loc.endpoint, config=config, verify=verify, **self._credentials()
        )

    def transfer_manager(self):
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = TransferConfig(
            multipart_threshold=self.transfer.part_size,
            multipart_chunksize=self.transfer.part_size,
            max_concurrency=self.transfer.concurrency,
            use_threads=True,
        )
        return create_transfer_manager(self.client, config)

    # ------------------------------------------------------------------------------ errors

    def error(self, exc: BaseException, action: str, key: str = "") -> RunnerError:
        """A boto3/botocore exception as a RunnerError naming the spec field and the fix."""
        from botocore import exceptions as bx

        loc, field = self.location, self.location.field
        target = f"s3://{loc.bucket}/{key}" if key else f"s3://{loc.bucket}"
        if isinstance(exc, RunnerError):
            return exc
        if isinstance(exc, bx.SSLError):
            return InvalidConfig(
                f"TLS verification of {field}.endpoint {loc.endpoint} failed: {exc}",
                f"set {field}.caBundle to a ConfigMap key with the CA that signed the store's certificate "
                f"(or {field}.insecure: true for a test store)",
            )
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return InvalidConfig(
                f"no credentials for {self.where}",
                f"set {field}.credentialsSecretRef to a Secret with keys accessKeyId and secretAccessKey",
            )
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            detail = f"{code}: {err.get('Message', '')}".strip(": ")
            if code == "NoSuchBucket":
                return InvalidInput(
                    f"bucket {loc.bucket!r} does not exist at {self.where}",
                    f"create the bucket or fix {field}.bucket (and {field}.endpoint)",
                )
            if code in CREDENTIAL_CODES:
                return InvalidInput(
                    f"{self.where} refused the credentials while trying to {action} {target} ({detail})",
                    f"check the Secret named in {field}.credentialsSecretRef: accessKeyId and secretAccessKey "
                    "must be a valid key pair for this store",
                )
            if code == "AccessDenied" or status == 403:
                return InvalidInput(
                    f"{self.where} denied {action} {target} ({detail})",
                    f"grant the credentials in {field}.credentialsSecretRef read/write access to "
                    f"s3://{loc.bucket}/{loc.prefix}",
                )
            if code in {"NoSuchKey", "404", "NotFound"} or status == 404:
                return InvalidInput(f"{target} does not exist at {self.where}", f"fix {field}.prefix")
            if code == "InvalidBucketName":
                return InvalidConfig(f"{loc.bucket!r} is not a valid bucket name ({detail})", f"fix {field}.bucket")
            if status >= 500 or code in {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}:
                return TransientError(
                    f"{self.where} failed to {action} {target} after retries ({detail})", "the pod is retried"
                )
            return InvalidInput(f"{self.where} refused to {action} {target} ({detail})", f"check {field}")
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError):
            return TransientError(
                f"cannot reach {field}.endpoint {loc.endpoint or 'Amazon S3'} to {action} {target} after retries "
                f"({exc})",
                f"check {field}.endpoint and that the pod's network (NetworkPolicy, egress, proxy) reaches it; "
                "the pod is retried",
            )
        if isinstance(exc, bx.BotoCoreError | ConnectionError | TimeoutError):
            return TransientError(f"{self.where}: {action} {target} failed ({exc})", "the pod is retried")
        if isinstance(exc, OSError):
            return TransientError(f"local file error while trying to {action} {target}: {exc}", "the pod is retried")
        return TransientError(f"unexpected {type(exc).__name__} while trying to {action} {target}: {exc}")

    def _call(self, action: str, key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every store failure is classified
            raise self.error(exc, action, key) from exc

    # ---------------------------------------------------------------------------- operations

    def check_writable(self, prefix: str) -> None:
        """Write and delete a probe object: bad bucket, credentials or endpoint fail before GPU work."""
        key = join_key(prefix, ".qjob-write-check")
        self._call("write", key, lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=b""))
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def head(self, key: str) -> dict[str, Any]:
        """An object's metadata, with its stored checksum (ChecksumMode ENABLED)."""
        bucket = self.location.bucket
        return self._call("read", key, lambda: self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))

    def list(self, prefix: str) -> list[dict[str, Any]]:
        """Objects under ``prefix/`` (Key, Size, ETag), sorted by key."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=join_key(prefix) + "/" if prefix.strip("/") else ""
        )
        return self._call("list", prefix, lambda: sorted((o for p in pages for o in p.get("Contents", [])), key=_key))

    def upload_folder(self, folder: Path, prefix: str, last: str = MANIFEST, progress: Progress | None = None) -> int:
        """Upload every file under ``folder`` to ``prefix/``, ``last`` after all others. Returns bytes sent."""
        bucket = self.location.bucket
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        final = [p for p in files if p.relative_to(folder).as_posix() == last]
        # Manifests of sub-folders (engines/<arch>/ in a reused job's output) vouch for their folder: after it.
        nested = [p for p in files if p.name == last and p not in final]
        rest = [p for p in files if p not in final and p not in nested]
        counter = _Counter(sum(p.stat().st_size for p in files), progress)
        # A manifest from an earlier attempt would vouch for files being overwritten now.
        last_key = join_key(prefix, last)
        self._call("delete", last_key, lambda: self.client.delete_object(Bucket=bucket, Key=last_key))
        for batch in (rest, nested, final):
            self._transfer(
                "upload",
                [(p, join_key(prefix, p.relative_to(folder).as_posix())) for p in batch],
                counter,
                lambda tm, path, key, subs: tm.upload(str(path), bucket, key, subscribers=subs),
            )
        return counter.done

    def download(self, objects: Iterable[dict[str, Any]], prefix: str, folder: Path, progress: Progress | None = None):
        """Download ``objects`` (from ``list``) into ``folder``, keys taken relative to ``prefix``."""
        bucket = self.location.bucket
        objects = list(objects)
        base = join_key(prefix)
        pairs = [(folder / relative_key(o["Key"], base), o["Key"]) for o in objects]
        for path, _ in pairs:
            path.parent.mkdir(parents=True, exist_ok=True)
        counter = _Counter(sum(int(o["Size"]) for o in objects), progress)

        def fetch(tm, path, key, subs):
            return tm.download(bucket, key, str(path), subscribers=subs)

        self._transfer("download", pairs, counter, fetch)
        return counter.done

    def _transfer(self, action: str, pairs: list[tuple[Path, str]], counter: _Counter, submit) -> None:
        if not pairs:
            return
        # Leaving the manager with an exception cancels the transfers still queued or running.
        with self.transfer_manager() as tm:
            futures = [(submit(tm, path, key, [counter.subscriber()]), key) for path, key in pairs]
            for future, key in futures:
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001 - classified for the status
                    raise self.error(exc, action, key) from exc


def _key(obj: dict[str, Any]) -> str:
    return obj["Key"]


def relative_key(key: str, base: str) -> str:
    rel = key[len(base) :].lstrip("/") if base else key
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise InvalidInput(f"object key {key!r} cannot be a file under {base!r}", "rename the object")
    return rel


class RateMeter:
    """Progress callback: ``report(message, fraction done, seconds left)`` at most every ``interval`` s."""

    def __init__(self, report: Callable[[str, float, float], None], what: str, interval: float = 2.0):
        self.report, self.what, self.interval = report, what, interval
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and done < total:
            return
        self._last = now
        rate = done / max(now - self.started, 1e-6)
        eta = (total - done) / rate if rate > 0 else 0.0
        self.report(
            f"{self.what}: {done / MiB:.0f}/{total / MiB:.0f} MiB at {rate / MiB:.1f} MiB/s, {eta:.0f} s left",
            done / total if total else 1.0,
            eta,
        )


def message_only(ctx) -> Callable[[str, float, float], None]:
    """A RateMeter sink that reports the message and leaves the stage's percent alone."""
    return lambda message, fraction, eta: ctx.reporter.update(message=message)


# ------------------------------------------------------------------------------ runner steps


def preflight(ctx) -> None:
    """Before any GPU work: the output bucket takes writes; a build stage gets the quantize
    stage's finished artifacts (everything but engines/ and results) into its local output_dir."""
    out = ctx.config.output_s3
    if out is None:
        return
    store = ObjectStore(out)
    store.check_writable(out.prefix)
    if not ctx.config.is_build:
        return
    base = join_key(out.prefix)
    objects = [o for o in store.list(out.prefix) if not relative_key(o["Key"], base).startswith(("engines/", "result"))]
    if not any(relative_key(o["Key"], base) == MANIFEST for o in objects):
        return  # the build step explains that no finished quantize stage exists
    meter = RateMeter(message_only(ctx), f"downloading the quantize stage's output {out.uri}")
    store.download(objects, out.prefix, ctx.paths.output_dir, progress=meter)


def upload_stage(ctx, folder: Path, relative: str) -> int:
    """Upload a finished stage's staged folder to ``output_s3.prefix/relative`` (manifest last)."""
    out = ctx.config.output_s3
    prefix = join_key(out.prefix, relative)
    meter = RateMeter(message_only(ctx), f"uploading to s3://{out.bucket}/{prefix}")
    started = time.monotonic()
    sent = ObjectStore(out).upload_folder(folder, prefix, last=MANIFEST, progress=meter)
    log.info("uploaded %.1f MiB to s3://%s/%s in %.1f s", sent / MiB, out.bucket, prefix, time.monotonic() - started)
    return sent
