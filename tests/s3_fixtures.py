"""pytest plugin: a real S3-compatible server (versitygw, ``qjob_dev.s3server``) on loopback.

Fixtures
  s3_server  session: versitygw's posix backend in a temp dir, fresh root credentials, stopped at
             session end. Attributes: .endpoint .region .access_key .secret_key .data_dir .client()
             .keys(bucket, prefix) .upload_folder(folder, bucket, prefix)
  s3_bucket  function: a fresh bucket on it (name); its objects stay for the test to inspect

The binary is built (once, into ~/.cache/qjob-operator/s3server) after collection when a
collected test uses the server, so the cold build does not count against a test's timeout.
"""

from __future__ import annotations

import uuid

import pytest
from qjob_dev.s3server import S3Server, locate_binary


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("s3_server" in getattr(i, "fixturenames", ()) for i in session.items):
        locate_binary()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    with S3Server(tmp_path_factory.mktemp("s3server")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
