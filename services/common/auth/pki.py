"""Service identity: a private CA, one certificate per service, and the gRPC credentials built from
them, so that services prove who they are to each other over mutual TLS.

`make run` creates the CA and the certificates under `<data dir>/pki/` (`ensure_pki`); in
Kubernetes they come from Secrets (cert-manager or made once with `python -m services.launcher
pki DIR`). A service reads only `ca.crt` and its own `<service>.crt` / `<service>.key`; the CA's key
stays with whoever issues certificates. A certificate's common name is the service it belongs to."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_NAME = "Corral service CA"
CA_DAYS = 3650
CERT_DAYS = 365
# A certificate this close to its end is issued again by ensure_pki.
RENEW_BEFORE = datetime.timedelta(days=30)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class PkiError(RuntimeError):
    """A certificate or key is missing or unusable; the message says which file and what to do."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(part, mode)
    part.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    service: str, hosts: Sequence[str], ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate naming `service`, good for both ends of a connection (it serves and calls)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san([service, *hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _current(path: Path, ca: x509.Certificate) -> bool:
    """Whether the certificate at `path` was issued by `ca` and is not about to end."""
    if not path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        issued_by(cert, ca)
    except (ValueError, PkiError):
        return False
    return cert.not_valid_after_utc - RENEW_BEFORE > _now()


def ensure_pki(directory: Path, services: Iterable[str], hosts: Sequence[str] = LOCAL_HOSTS) -> list[str]:
    """Creates the CA in `directory` if it has none, and a certificate for each of `services` that
    has none (or one about to end, or from another CA). Returns the services issued one now."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_crt, ca_key_file = directory / "ca.crt", directory / "ca.key"
    if ca_crt.exists() and ca_key_file.exists():
        ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{ca_key_file} is not an EC private key")
        ca_key = loaded
    else:
        ca_key, ca = _issue_ca()
        _write(ca_key_file, _key_pem(ca_key), 0o600)
        _write(ca_crt, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    issued = []
    for service in services:
        crt = directory / f"{service}.crt"
        if _current(crt, ca):
            continue
        key, cert = _issue(service, hosts, ca_key, ca)
        _write(directory / f"{service}.key", _key_pem(key), 0o600)
        _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        issued.append(service)
    return issued


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Raises PkiError unless `ca` signed `cert` and `cert` is within its validity period."""
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        raise PkiError("the CA is not an EC key")
    try:
        public.verify(cert.signature, cert.tbs_certificate_bytes,
                      ec.ECDSA(cert.signature_hash_algorithm))
    except InvalidSignature:
        raise PkiError("the certificate was not issued by the Corral service CA") from None
    if cert.issuer != ca.subject:
        raise PkiError("the certificate names another issuer")
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError("the certificate is outside its validity period")


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()


@dataclass(frozen=True)
class ServiceIdentity:
    """One service's certificate and key, and the CA it trusts: what it serves internal calls
    with, calls other services with, and signs principal assertions with."""

    service: str
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)

    @functools.cached_property
    def ca(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_pem)

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @functools.cached_property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"the key of {self.service} is not an EC private key")
        return key

    def server_credentials(self) -> grpc.ServerCredentials:
        """For the internal listener: TLS, and a client certificate from the CA required."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


@functools.cache
def load_identity(directory: Path, service: str) -> ServiceIdentity:
    """`service`'s identity from `directory`, checked: the certificate names the service, the CA
    issued it, and the key belongs to it."""
    files = {name: directory / name for name in ("ca.crt", f"{service}.crt", f"{service}.key")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise PkiError(
            f"{service} has no service certificate ({', '.join(missing)} missing): `make run` "
            "creates them, or `python -m services.launcher pki DIR` for a deployment; "
            "CORRAL_PKI_DIR says where they are"
        )
    identity = ServiceIdentity(
        service=service, ca_pem=files["ca.crt"].read_bytes(),
        cert_pem=files[f"{service}.crt"].read_bytes(), key_pem=files[f"{service}.key"].read_bytes(),
    )
    try:
        issued_by(identity.certificate, identity.ca)
        if common_name(identity.certificate) != service:
            raise PkiError(f"{files[f'{service}.crt']} names {common_name(identity.certificate)!r}")
        if identity.private_key.public_key() != identity.certificate.public_key():
            raise PkiError(f"{files[f'{service}.key']} is not the key of {files[f'{service}.crt']}")
    except ValueError as exc:
        raise PkiError(f"the certificate files of {service} in {directory} are unreadable: {exc}") from None
    return identity
