"""The host's platform identity on disk: owner CA, PDH key and certificate, TLS host certificate.

This module creates and stores the identity (``migd keys init``) and loads the host's own PDH
from its state directory; checking certificates (the PDH chain, trust anchors) and using the
keys (ECDH, TLS contexts) live in :mod:`migd.platform.pki_verify`, whose public names are re-exported
here. Layout:

* CA directory: ``ca.pem`` (self-signed, P-384) and ``ca.key``;
* host state directory: ``pdh.key``/``pdh.pem`` (ECDH on secp384r1, as SEND_START needs),
  ``host.key``/``host.pem`` (TLS, P-256) and ``owner-ca.pem`` (the trust anchor copy).

Real SEV platforms certify their PDH through AMD's ARK → ASK → CEK → PEK → PDH chain (SEV API
55766, "Certificates"); migd uses X.509 under the owner CA, which also issues each host's TLS
certificate for mutual TLS between daemons. The PDH certificate carries
:data:`~migd.platform.pki_verify.PDH_MARKER_OID` (critical ExtendedKeyUsage) and KeyUsage keyAgreement
only, so it is never mistaken for a TLS certificate.

Keys are written 0600 by "write a temporary file, then rename", under an exclusive
``flock`` of the directory so two concurrent ``migd keys init`` never interleave; an
existing key is never replaced. Renewing means deleting the files and running init again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migd.errors import CertificateError, ConfigError
from migd.fileio import atomic_write
from migd.platform.pki_verify import (
    MAX_PDH_CERT_PEM,
    MAX_PEM_FILE,
    PDH_CURVE,
    PDH_MARKER_OID,
    certificate_extension,
    certificate_pem,
    check_is_ca,
    check_key_matches,
    check_pdh_profile,
    ecdh_shared_secret,
    load_certificate_bundle,
    load_certificate_file,
    load_private_key_file,
    load_trust_anchors,
    tls_client_context,
    tls_server_context,
    verify_pdh_certificate,
)

__all__ = [
    "BACKDATE",
    "CA_CERT",
    "CA_CURVE",
    "CA_KEY",
    "CA_VALIDITY",
    "MAX_PDH_CERT_PEM",
    "MAX_PEM_FILE",
    "PDH_CERT",
    "PDH_CURVE",
    "PDH_KEY",
    "PDH_MARKER_OID",
    "PDH_VALIDITY",
    "TLS_CERT",
    "TLS_CURVE",
    "TLS_KEY",
    "TLS_VALIDITY",
    "TRUST_DIR_CA_COPY",
    "certificate_pem",
    "ecdh_shared_secret",
    "ensure_ca",
    "init_host",
    "load_pdh",
    "load_trust_anchors",
    "tls_client_context",
    "tls_server_context",
    "verify_pdh_certificate",
]

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
PDH_KEY = "pdh.key"
PDH_CERT = "pdh.pem"
TLS_KEY = "host.key"
TLS_CERT = "host.pem"
TRUST_DIR_CA_COPY = "owner-ca.pem"

CA_VALIDITY = dt.timedelta(days=3652)  # ~10 years
PDH_VALIDITY = dt.timedelta(days=1826)  # ~5 years
TLS_VALIDITY = dt.timedelta(days=1826)  # same lifetime as the PDH: one renewal for the host
#: Certificates start a little in the past so a peer whose clock lags still accepts them.
BACKDATE = dt.timedelta(minutes=5)

CA_CURVE = ec.SECP384R1
TLS_CURVE = ec.SECP256R1  # cheaper handshakes; both ends are migd, no interop constraint

_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
#: X.509 ub-common-name is 64; the PDH subject is "<host> PDH".
_MAX_HOST_NAME = 64 - len(" PDH")


def ensure_ca(
    ca_dir: str | os.PathLike[str], *, common_name: str = "migd owner CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the owner CA from ``ca_dir``, creating it (P-384, self-signed, ~10 years) if missing.

    ``common_name`` is used only when the CA is created. A CA directory holding a
    certificate without its key is an error (the key is never re-created under an
    existing certificate).
    """
    if not 1 <= len(common_name) <= 64:
        raise ConfigError(f"CA common name must be 1-64 characters, got {len(common_name)}")
    directory = _make_private_dir(ca_dir)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    with _locked_dir(directory):
        key = _load_or_create_key(key_path, cert_path, CA_CURVE, "owner CA key")
        if cert_path.exists():
            cert = load_certificate_file(cert_path, "owner CA certificate")
            check_key_matches(cert, key, cert_path, key_path)
            check_is_ca(cert, f"owner CA certificate {cert_path}")
        else:
            cert = _sign(_ca_builder(common_name, key.public_key()), key)
            _write_new(cert_path, certificate_pem(cert), 0o644)
            log.info("created owner CA path=%s subject=%s", cert_path, cert.subject.rfc4514_string())
    return cert, key


def init_host(
    state_dir: str | os.PathLike[str],
    ca_dir: str | os.PathLike[str],
    *,
    common_name: str | None = None,
) -> dict[str, Path]:
    """Create the host identity in ``state_dir`` under the owner CA in ``ca_dir``; idempotent.

    Missing pieces are created (the CA too); existing keys are never overwritten, and an
    existing certificate must belong to its key and to this CA. ``common_name`` is the host
    name in the certificates (default: :func:`socket.gethostname`). Returns label → path.
    """
    host = common_name if common_name is not None else socket.gethostname()
    _check_host_name(host)
    ca_cert, ca_key = ensure_ca(ca_dir)  # takes and releases the CA directory's lock first:
    # the locks are never nested, so state_dir == ca_dir cannot self-deadlock on flock.
    directory = _make_private_dir(state_dir)
    with _locked_dir(directory):
        for key_name, cert_name, curve, build in (
            (PDH_KEY, PDH_CERT, PDH_CURVE, _pdh_builder(host)),
            (TLS_KEY, TLS_CERT, TLS_CURVE, _tls_builder(host)),
        ):
            _ensure_leaf(directory / key_name, directory / cert_name, curve, build, ca_cert, ca_key)
        _ensure_trust_anchor_copy(directory / TRUST_DIR_CA_COPY, ca_cert)
    ca_path = Path(ca_dir).absolute()
    state_path = directory.absolute()
    return {
        "ca_cert": ca_path / CA_CERT,
        "pdh_cert": state_path / PDH_CERT,
        "pdh_key": state_path / PDH_KEY,
        "tls_cert": state_path / TLS_CERT,
        "tls_key": state_path / TLS_KEY,
        "trust_anchor": state_path / TRUST_DIR_CA_COPY,
    }


def load_pdh(state_dir: str | os.PathLike[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load this platform's PDH key and certificate; ``CertificateError`` if either is unusable."""
    directory = Path(state_dir)
    key_path, cert_path = directory / PDH_KEY, directory / PDH_CERT
    key = load_private_key_file(key_path, PDH_CURVE, "PDH key")
    cert = load_certificate_file(cert_path, "PDH certificate")
    check_pdh_profile(cert, f"PDH certificate {cert_path}")
    check_key_matches(cert, key, cert_path, key_path)
    return key, cert


_CertBuilderFactory = Callable[[ec.EllipticCurvePublicKey, x509.Certificate], x509.CertificateBuilder]


def _ca_builder(common_name: str, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _utc_now() - BACKDATE
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CA_VALIDITY)
        # path_length=0: the owner CA issues host certificates only, never sub-CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _pdh_builder(host: str) -> _CertBuilderFactory:
    def build(public_key: ec.EllipticCurvePublicKey, ca_cert: x509.Certificate) -> x509.CertificateBuilder:
        return (
            _leaf_builder(f"{host} PDH", public_key, ca_cert, PDH_VALIDITY)
            .add_extension(_key_usage(key_agreement=True), critical=True)
            # Critical: the key is for SEV key agreement and nothing else (RFC 5280 §4.2.1.12).
            .add_extension(x509.ExtendedKeyUsage([PDH_MARKER_OID]), critical=True)
        )

    return build


def _tls_builder(host: str) -> _CertBuilderFactory:
    names: list[x509.GeneralName] = []
    for entry in (host, "localhost", "127.0.0.1"):
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(entry))
        except ValueError:
            general = x509.DNSName(entry)
        if general not in names:
            names.append(general)

    def build(public_key: ec.EllipticCurvePublicKey, ca_cert: x509.Certificate) -> x509.CertificateBuilder:
        return (
            _leaf_builder(host, public_key, ca_cert, TLS_VALIDITY)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
        )

    return build


def _leaf_builder(
    common_name: str, public_key: ec.EllipticCurvePublicKey, ca_cert: x509.Certificate, validity: dt.timedelta
) -> x509.CertificateBuilder:
    start = _utc_now() - BACKDATE
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= start + BACKDATE:
        raise CertificateError(
            f"owner CA expired on {ca_end.isoformat()}; renew it before issuing host certificates"
        )
    # The AKI must repeat the CA's own SKI (OpenSSL matches issuers by it); derive it only if absent.
    ca_ski = certificate_extension(ca_cert, x509.SubjectKeyIdentifier)
    if ca_ski is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    else:
        ca_public = ca_cert.public_key()
        if not isinstance(ca_public, ec.EllipticCurvePublicKey):
            raise CertificateError(f"owner CA: expected an EC key, got {type(ca_public).__name__}")
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        # RFC 5280 path validation fails past the issuer's end anyway: do not promise more.
        .not_valid_after(min(start + validity, ca_end))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(builder: x509.CertificateBuilder, ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return builder.sign(ca_key, hashes.SHA384())


def _check_host_name(host: str) -> None:
    if not 1 <= len(host) <= _MAX_HOST_NAME:
        raise ConfigError(f"host name must be 1-{_MAX_HOST_NAME} characters, got {len(host)}: {host!r}")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return
    if not all(_HOST_LABEL.match(label) for label in host.split(".")):
        raise ConfigError(f"host name must be a DNS name or an IP address, got {host!r}")


def _make_private_dir(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create directory {directory}: {exc.strerror}") from exc
    return directory


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on the directory itself (no lock file left behind)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise CertificateError(f"cannot open directory {directory}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Atomically create ``path`` (temp file + rename, fsynced); the caller holds the dir lock."""
    try:
        _write_new_unchecked(path, data, mode)
    except OSError as exc:
        raise CertificateError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_new_unchecked(path: Path, data: bytes, mode: int) -> None:
    if path.exists():  # callers check under the lock; this keeps "never overwrite" local
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path))
    atomic_write(path, data, mode)  # mkstemp makes 0600; certificates are public


def _load_or_create_key(
    key_path: Path, cert_path: Path, curve: type[ec.EllipticCurve], what: str
) -> ec.EllipticCurvePrivateKey:
    if key_path.exists():
        return load_private_key_file(key_path, curve, what)
    if cert_path.exists():
        raise CertificateError(
            f"{cert_path} exists but its key {key_path} is missing; restore the key or remove the certificate"
        )
    key = ec.generate_private_key(curve())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(key_path, pem, 0o600)
    log.info("created key path=%s curve=%s", key_path, curve.name)
    return key


def _ensure_leaf(
    key_path: Path,
    cert_path: Path,
    curve: type[ec.EllipticCurve],
    build: _CertBuilderFactory,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> None:
    key = _load_or_create_key(key_path, cert_path, curve, f"key {key_path.name}")
    if cert_path.exists():  # idempotent: keep it, but only if it is ours and from this CA
        cert = load_certificate_file(cert_path, "certificate")
        check_key_matches(cert, key, cert_path, key_path)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise CertificateError(
                f"{cert_path} was not issued by the owner CA {ca_cert.subject.rfc4514_string()!r} "
                f"(issuer {cert.issuer.rfc4514_string()!r}); remove it to re-issue"
            ) from exc
        return
    cert = _sign(build(key.public_key(), ca_cert), ca_key)
    _write_new(cert_path, certificate_pem(cert), 0o644)
    log.info("issued certificate path=%s subject=%s", cert_path, cert.subject.rfc4514_string())


def _ensure_trust_anchor_copy(path: Path, ca_cert: x509.Certificate) -> None:
    if not path.exists():
        _write_new(path, certificate_pem(ca_cert), 0o644)
        return
    if ca_cert not in load_certificate_bundle(path, "trust-anchor file"):
        raise CertificateError(
            f"trust-anchor file {path} does not contain the owner CA {ca_cert.subject.rfc4514_string()!r}; "
            "remove it or add the CA certificate"
        )


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
