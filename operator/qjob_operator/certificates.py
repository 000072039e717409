"""The report endpoint's serving certificate, shared by every replica through one Secret.

The Secret has the keys cert-manager writes (``ca.crt``, ``tls.crt``, ``tls.key``), so a cluster
that issues its own certificates provides it; otherwise the first replica to start makes a
private CA and a certificate for the endpoint's host name and stores them there, and the others
read them. Runner pods trust ``ca.crt``: the operator puts it in each RunnerConfig. The operator
needs only get/update on that one Secret (no create, no other Secret).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .kube import Kube

VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class ServingCertificate:
    ca_pem: str
    cert_pem: str
    key_pem: str

    def to_secret_data(self) -> dict[str, str]:
        return {
            k: base64.b64encode(v.encode()).decode()
            for k, v in (("ca.crt", self.ca_pem), ("tls.crt", self.cert_pem), ("tls.key", self.key_pem))
        }

    @classmethod
    def from_secret_data(cls, data: dict[str, str]) -> ServingCertificate:
        missing = [k for k in ("ca.crt", "tls.crt", "tls.key") if not data.get(k)]
        if missing:
            raise ValueError(f"the report endpoint's TLS Secret lacks {', '.join(missing)}")
        text = {k: base64.b64decode(v).decode() for k, v in data.items()}
        return cls(text["ca.crt"], text["tls.crt"], text["tls.key"])

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # ssl loads a key pair from files only; they live just long enough to be read.
        with tempfile.TemporaryDirectory(prefix="qjob-tls-") as folder:
            cert, key = os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key")
            with open(cert, "w") as f:
                f.write(self.cert_pem + self.ca_pem)
            with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(self.key_pem)
            ctx.load_cert_chain(cert, key)
        return ctx


def _names(url: str) -> list[x509.GeneralName]:
    host = urlparse(url).hostname or "localhost"
    try:
        return [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        names: list[x509.GeneralName] = [x509.DNSName(host)]
        # A Service is reached by several names (svc, svc.ns, svc.ns.svc, ...cluster.local).
        parts = host.split(".")
        if len(parts) >= 3 and parts[2] == "svc":
            names += [x509.DNSName(n) for n in (".".join(parts[:2]), ".".join(parts[:3]) + ".cluster.local")]
        return list(dict.fromkeys(names))


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def generate(url: str, now: datetime.datetime | None = None) -> ServingCertificate:
    """A private CA and a certificate for the host of ``url``, both valid for ten years."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qjob-operator report CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    host = urlparse(url).hostname or "localhost"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))  # names: the SAN
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_names(url)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    encode = serialization.Encoding.PEM
    return ServingCertificate(ca.public_bytes(encode).decode(), cert.public_bytes(encode).decode(), _pem(key))


async def shared_certificate(kube: Kube, namespace: str, name: str, url: str) -> ServingCertificate:
    """The certificate in Secret ``namespace/name``. The chart creates that Secret empty; the
    first replica to find it empty fills it (an update with the resourceVersion it read, so of two
    replicas starting together one wins and the other reads the winner's)."""
    for _ in range(3):
        secret = await kube.read_secret(namespace, name)
        if secret is None:
            raise RuntimeError(
                f"the report endpoint's TLS Secret {namespace}/{name} does not exist: the chart creates it "
                "(reports.tlsSecret); create it empty, or with ca.crt, tls.crt and tls.key"
            )
        if secret.get("data"):
            return ServingCertificate.from_secret_data(secret["data"])
        made = generate(url)
        secret["data"] = made.to_secret_data()
        if await kube.replace_secret(namespace, name, secret):
            return made
    raise RuntimeError(f"cannot fill the report endpoint's TLS Secret {namespace}/{name}")
