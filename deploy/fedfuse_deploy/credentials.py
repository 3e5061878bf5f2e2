"""TLS certificates and SuperNode key pairs for a deployment, made with ``cryptography``.

* ``make_certificates``: a private CA and a server certificate for the SuperLink's host(s),
  with subject alternative names (IP addresses and DNS names), as Flower's TLS guide asks.
* ``make_node_keys``: an EC (NIST P-384) key pair per SuperNode in OpenSSH format, the form
  ``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key`` read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfuse"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certificates(out: str | os.PathLike, hosts: list[str], days: int = 365) -> Certificates:
    """A CA (``ca.crt``) and a server certificate (``server.pem``, ``server.key``) valid for
    every name in ``hosts`` (e.g. ``["127.0.0.1", "localhost", "superlink"]``)."""
    if not hosts:
        raise ValueError("name at least one host (IP address or DNS name) for the certificate")
    out = Path(out)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedfuse CA")).issuer_name(_name("fedfuse CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), private=True)
    return Certificates(
        ca_cert=_write(out / "ca.crt", ca.public_bytes(pem)),
        server_cert=_write(out / "server.pem", cert.public_bytes(pem)),
        server_key=_write(out / "server.key", key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()),
            private=True),
    )


def make_node_keys(out: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``<name>`` (private) and ``<name>.pub`` (public) EC P-384 keys in OpenSSH format."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write(out / name, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), private=True)
    public = _write(out / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public
