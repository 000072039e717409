"""A real S3-compatible server on loopback for tests and benchmarks: versitygw's posix backend.

``hack/s3server/build.sh`` builds the binary from the Go module proxy (cached under
~/.cache/qjob-operator); ``S3Server(folder).start()`` runs it on 127.0.0.1 with a random port and
fresh root credentials, buckets as directories under ``folder/data`` and object versions under
``folder/versions``.

    python -m qjob_dev.s3server [FOLDER]     # run one in the foreground (prints endpoint, keys)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

#: build.sh and the Go module (go.mod, go.sum) that pins versitygw
DATA = Path(__file__).resolve().parents[1] / "s3server"
HEALTH_PATH = "/health"


def locate_binary() -> Path:
    """The versitygw binary, building it on first use (build.sh prints its folder last)."""
    out = subprocess.run(["bash", str(DATA / "build.sh")], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1]) / "versitygw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _supports_xattrs(folder: Path) -> bool:
    probe = folder / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.qjob", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@dataclass
class S3Server:
    folder: Path
    region: str = "us-east-1"
    access_key: str = field(default_factory=lambda: "qjob" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def start(self, binary: Path | None = None, timeout: float = 30) -> S3Server:
        binary = binary or locate_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.folder / "versions").mkdir(exist_ok=True)
        self.port = self.port or free_port()
        # Metadata (ETags, content types, checksums) lives in xattrs; a sidecar folder where the
        # filesystem has none (some overlay filesystems).
        meta = [] if _supports_xattrs(self.data_dir) else ["--sidecar", str(self.folder / "meta")]
        if meta:
            (self.folder / "meta").mkdir(exist_ok=True)
        cmd = [
            str(binary),
            "--access", self.access_key,
            "--secret", self.secret_key,
            "--region", self.region,
            "--port", f"127.0.0.1:{self.port}",
            "--health", HEALTH_PATH,
            "--quiet",
            "posix", "--versioning-dir", str(self.folder / "versions"), *meta, str(self.data_dir),
        ]  # fmt: skip
        log = (self.folder / "versitygw.log").open("ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"versitygw exited with {self.process.returncode}; see {self.folder}/versitygw.log")
            try:
                with urllib.request.urlopen(self.endpoint + HEALTH_PATH, timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"versitygw did not answer on {self.endpoint} within {timeout}s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def client(self, **config):
        """A boto3 S3 client with the root credentials (tests and benchmarks)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def keys(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        """Objects under a prefix (first 1000), by key: what a reader of the bucket sees."""
        listed = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"]: o for o in listed}

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        """Put a folder's files under a prefix with plain boto3 (how a user publishes a model)."""
        client = self.client()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import tempfile

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qjob-s3-"))
    with S3Server(root) as server:
        print(f"endpoint={server.endpoint} region={server.region}")
        print(f"AWS_ACCESS_KEY_ID={server.access_key} AWS_SECRET_ACCESS_KEY={server.secret_key}")
        print(f"data under {server.data_dir}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()
