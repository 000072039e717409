"""Pure helpers that wire S3 locations (spec.model.s3, spec.output.s3) into runner pods.

Credentials never enter the RunnerConfig: the kubelet resolves them from the job's Secret into
two environment variables per location (``env valueFrom``), and the runner's boto3 client reads
those. A CA bundle ConfigMap key is mounted as a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qjob_api.runner import RunnerS3
from qjob_api.v1alpha1 import S3Location

CA_ROOT = "/etc/qjob/ca"
#: Secret keys the credentials Secret must hold.
ACCESS_KEY_ID, SECRET_ACCESS_KEY = "accessKeyId", "secretAccessKey"


@dataclass(frozen=True)
class S3Use:
    """One S3 location a runner pod uses: ``role`` names its env vars and CA mount."""

    role: str  # "model" or "output"
    field: str  # the spec field, for error messages
    location: S3Location
    prefix: str  # the effective key prefix

    @property
    def env_prefix(self) -> str:
        return f"QJOB_S3_{self.role.upper()}"

    @property
    def ca_dir(self) -> str:
        return f"{CA_ROOT}/{self.role}"

    def runner(self) -> RunnerS3:
        loc = self.location
        return RunnerS3(
            field=self.field,
            endpoint=loc.endpoint,
            region=loc.region,
            bucket=loc.bucket,
            prefix=self.prefix,
            credentials_env=self.env_prefix if loc.credentials_secret_ref else None,
            insecure=loc.insecure,
            ca_bundle=f"{self.ca_dir}/{loc.ca_bundle.key}" if loc.ca_bundle else None,
        )

    def env(self) -> list[dict[str, Any]]:
        ref = self.location.credentials_secret_ref
        if ref is None:
            return []
        return [
            {"name": f"{self.env_prefix}_{name}", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}
            for name, key in (("ACCESS_KEY_ID", ACCESS_KEY_ID), ("SECRET_ACCESS_KEY", SECRET_ACCESS_KEY))
        ]

    def volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        ca = self.location.ca_bundle
        if ca is None:
            return [], []
        name = f"ca-{self.role}"
        volume = {"name": name, "configMap": {"name": ca.name, "items": [{"key": ca.key, "path": ca.key}]}}
        return [volume], [{"name": name, "mountPath": self.ca_dir, "readOnly": True}]
