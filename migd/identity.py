"""The host's platform identity: owner CA, PDH key and certificate, TLS host certificate.

Real SEV platforms certify their Platform Diffie-Hellman key (PDH) through AMD's
ARK → ASK → CEK → PEK → PDH chain (SEV API 55766, "Certificates"); migd's emulated firmware
uses X.509 under an *owner CA* instead. The same CA issues each host's TLS certificate for
mutual TLS between daemons. Layout:

* CA directory: ``ca.pem`` (self-signed, P-384) and ``ca.key``;
* host state directory: ``pdh.key``/``pdh.pem`` (ECDH on secp384r1, as SEND_START needs),
  ``host.key``/``host.pem`` (TLS, P-256) and ``owner-ca.pem`` (the trust anchor copy).

A PDH certificate is told apart from every other certificate of the CA by its
ExtendedKeyUsage: it carries only :data:`PDH_MARKER_OID`, migd's own "SEV PDH" purpose
(together with KeyUsage keyAgreement only). That also keeps a PDH certificate from being
accepted as a TLS certificate: OpenSSL's purpose check wants serverAuth/clientAuth.

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
import ssl
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migd.errors import CertificateError, ConfigError

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
PDH_KEY = "pdh.key"
PDH_CERT = "pdh.pem"
TLS_KEY = "host.key"
TLS_CERT = "host.pem"
TRUST_DIR_CA_COPY = "owner-ca.pem"

#: migd's own "SEV PDH" key purpose (ExtendedKeyUsage). It lives in the UUID-derived arc
#: 2.25 (ITU-T X.667 | ISO/IEC 9834-8), which needs no registration, instead of borrowing a
#: private enterprise number we do not own: 2.25.<UUID 6620b2a6-b576-43b5-aea6-931d1d39a3eb>.
PDH_MARKER_OID = x509.ObjectIdentifier("2.25.135751032546478720659894720421600797675")

#: Largest PDH certificate accepted from a peer; ours are about 700 bytes of PEM.
MAX_PDH_CERT_PEM = 16 * 1024
#: Largest local PEM file (keys, certificates, trust-anchor bundles) read from disk.
MAX_PEM_FILE = 1024 * 1024

CA_VALIDITY = dt.timedelta(days=3652)  # ~10 years
PDH_VALIDITY = dt.timedelta(days=1826)  # ~5 years
TLS_VALIDITY = dt.timedelta(days=1826)  # same lifetime as the PDH: one renewal for the host
#: Certificates start a little in the past so a peer whose clock lags still accepts them.
BACKDATE = dt.timedelta(minutes=5)

PDH_CURVE = ec.SECP384R1  # SEV API 55766: PDH keys are ECDH on P-384
CA_CURVE = ec.SECP384R1
TLS_CURVE = ec.SECP256R1  # cheaper handshakes; both ends are migd, no interop constraint

_MALFORMED = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    Warning,
)
_ALLOWED_SIGNATURE_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
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
            cert = _load_cert_file(cert_path, "owner CA certificate")
            _check_key_matches(cert, key, cert_path, key_path)
            _check_is_ca(cert, f"owner CA certificate {cert_path}")
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
    key = _load_key_file(key_path, PDH_CURVE, "PDH key")
    cert = _load_cert_file(cert_path, "PDH certificate")
    _check_pdh_profile(cert, f"PDH certificate {cert_path}")
    _check_key_matches(cert, key, cert_path, key_path)
    return key, cert


def load_trust_anchors(paths: Iterable[str | os.PathLike[str]]) -> list[x509.Certificate]:
    """Load CA certificates from PEM files (each may hold several); every one must be a CA."""
    anchors: list[x509.Certificate] = []
    files = [Path(p) for p in paths]
    if not files:
        raise CertificateError("no trust-anchor files given; expected at least one PEM file")
    for path in files:
        data = _read_limited(path, MAX_PEM_FILE, "trust-anchor file")
        try:
            certs = x509.load_pem_x509_certificates(data)
        except _MALFORMED as exc:
            raise CertificateError(f"trust-anchor file {path}: expected PEM certificates: {exc}") from exc
        for index, cert in enumerate(certs):
            _check_is_ca(cert, f"trust anchor #{index} in {path}")
        anchors.extend(certs)
    return anchors


def verify_pdh_certificate(
    cert_pem: bytes,
    anchors: Sequence[x509.Certificate],
    *,
    now: dt.datetime | None = None,
) -> ec.EllipticCurvePublicKey:
    """Validate a peer's PDH certificate against ``anchors``; return its P-384 public key.

    The input is untrusted: it must be one PEM certificate of at most
    :data:`MAX_PDH_CERT_PEM` bytes, directly issued (name and signature) by one of the
    anchors, which must be a CA; both must be valid at ``now`` (default: the current UTC
    time). The certificate must have the PDH profile: EC secp384r1 key, KeyUsage
    keyAgreement, ExtendedKeyUsage :data:`PDH_MARKER_OID`, not a CA. ``now`` must be
    timezone-aware. Raises ``CertificateError`` saying what was expected and what came.
    """
    if not isinstance(cert_pem, (bytes, bytearray, memoryview)):
        raise CertificateError(f"PDH certificate: expected PEM bytes, got {type(cert_pem).__name__}")
    data = bytes(cert_pem)
    if len(data) > MAX_PDH_CERT_PEM:
        raise CertificateError(f"PDH certificate: expected at most {MAX_PDH_CERT_PEM} bytes, got {len(data)}")
    if not anchors:
        raise CertificateError("no trust anchors configured; a PDH certificate cannot be validated")
    at = _utc_now() if now is None else _as_utc(now)
    cert = _parse_one_pem(data, "PDH certificate")
    _check_issued_by_anchor(cert, anchors, at)
    _check_validity(cert, at, "PDH certificate")
    return _check_pdh_profile(cert, "PDH certificate")


def ecdh_shared_secret(
    private_key: ec.EllipticCurvePrivateKey, peer_public: ec.EllipticCurvePublicKey
) -> bytes:
    """The ECDH shared secret Z (48 bytes on P-384) between our PDH and the peer's PDH."""
    for what, key in (("own PDH key", private_key), ("peer PDH key", peer_public)):
        if not isinstance(key.curve, PDH_CURVE):
            raise CertificateError(f"{what}: expected curve secp384r1, got {key.curve.name}")
    return private_key.exchange(ec.ECDH(), peer_public)


def certificate_pem(cert: x509.Certificate) -> bytes:
    """The PEM encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def tls_server_context(
    ca: str | os.PathLike[str], cert: str | os.PathLike[str], key: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A TLS 1.3 server context for the migration listener that requires a client certificate from ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    return _configure_tls(context, ca, cert, key)


def tls_client_context(
    ca: str | os.PathLike[str], cert: str | os.PathLike[str], key: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A TLS 1.3 client context that presents our certificate and checks the server's name and chain."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname by default
    return _configure_tls(context, ca, cert, key)


_Ext = TypeVar("_Ext", bound=x509.ExtensionType)
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
    ca_ski = _extension(ca_cert, x509.SubjectKeyIdentifier)
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


def _parse_one_pem(data: bytes, what: str) -> x509.Certificate:
    """Parse exactly one PEM certificate and every field we use later, up front.

    ``cryptography`` parses names, extensions and keys lazily, so hostile DER can raise on
    first access anywhere; touching them here turns all of that into one ``CertificateError``.
    """
    try:
        certs = x509.load_pem_x509_certificates(data)
        if len(certs) != 1:
            raise CertificateError(f"{what}: expected one PEM certificate, got {len(certs)}")
        cert = certs[0]
        _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
        _ = (cert.public_key(), cert.signature_hash_algorithm, list(cert.extensions))
    # Found by flipping every byte of a valid certificate: besides ValueError, parsing raises
    # TypeError, InvalidVersion and DuplicateExtension (not ValueErrors), and *warns* about
    # some malformations (negative serial, name-attribute length), which under ``-W error``
    # are raised and then are one more malformed input.
    except _MALFORMED as exc:
        raise CertificateError(f"{what}: expected one well-formed PEM certificate: {exc}") from exc
    if cert.serial_number <= 0:  # RFC 5280 §4.1.2.2
        raise CertificateError(f"{what}: expected a positive serial number, got {cert.serial_number}")
    # signatureValue is the last field: a BIT STRING whose first content byte counts unused bits.
    # cryptography accepts a non-zero count and still verifies the same bytes, so the encoding
    # would be malleable (found by the bit-flip test); signatures are whole bytes (RFC 3279 §2.2.3).
    if not cert.public_bytes(serialization.Encoding.DER).endswith(b"\x00" + cert.signature):
        raise CertificateError(f"{what}: expected the signature as a whole-byte BIT STRING, got padding bits")
    return cert


def _check_issued_by_anchor(
    cert: x509.Certificate, anchors: Sequence[x509.Certificate], now: dt.datetime
) -> None:
    """Accept ``cert`` if one anchor with its issuer name signed it and is a CA valid at ``now``."""
    candidates = [anchor for anchor in anchors if anchor.subject == cert.issuer]
    if not candidates:
        known = ", ".join(repr(a.subject.rfc4514_string()) for a in anchors)
        raise CertificateError(
            f"PDH certificate issuer {cert.issuer.rfc4514_string()!r} is not a trust anchor; "
            f"expected one of {known}"
        )
    # Several anchors may share a name (a renewed or re-keyed owner CA): any one will do.
    failures: list[str] = []
    for anchor in candidates:
        what = f"trust anchor {anchor.subject.rfc4514_string()!r}"
        try:
            cert.verify_directly_issued_by(anchor)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            failures.append(f"PDH certificate signature does not verify against {what} ({detail})")
            continue
        try:
            _check_is_ca(anchor, what)
            _check_validity(anchor, now, what)
        except CertificateError as exc:
            failures.append(str(exc))
            continue
        return
    raise CertificateError("; ".join(failures))


def _check_is_ca(cert: x509.Certificate, what: str) -> None:
    try:
        constraints = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
    except _MALFORMED as exc:
        raise CertificateError(f"{what}: malformed extensions: {exc}") from exc
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{what}: expected a CA certificate (BasicConstraints CA=TRUE), got a non-CA")
    if usage is not None and not usage.key_cert_sign:
        raise CertificateError(f"{what}: expected KeyUsage keyCertSign on a CA, it is absent")


def _check_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now <= end:
        raise CertificateError(
            f"{what}: valid from {start.isoformat()} to {end.isoformat()}, checked at {now.isoformat()}"
        )


def _check_pdh_profile(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    # Fields were parsed and checked for well-formedness by _parse_one_pem.
    public_key = cert.public_key()
    digest = cert.signature_hash_algorithm
    extensions = list(cert.extensions)
    constraints = _extension(cert, x509.BasicConstraints)
    usage = _extension(cert, x509.KeyUsage)
    purposes = _extension(cert, x509.ExtendedKeyUsage)
    if digest is not None and not isinstance(digest, _ALLOWED_SIGNATURE_HASHES):
        raise CertificateError(f"{what}: expected a SHA-2 signature, got {digest.name}")
    unknown = [
        ext.oid.dotted_string
        for ext in extensions
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension)
    ]
    if unknown:  # RFC 5280 §4.2: an unrecognised critical extension must make us reject
        raise CertificateError(f"{what}: unrecognised critical extension(s) {', '.join(unknown)}")
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{what}: expected an EC secp384r1 key, got {type(public_key).__name__}")
    if not isinstance(public_key.curve, PDH_CURVE):
        raise CertificateError(f"{what}: expected an EC secp384r1 key, got curve {public_key.curve.name}")
    if constraints is not None and constraints.ca:
        raise CertificateError(f"{what}: expected an end-entity certificate, got a CA certificate")
    if usage is None or not usage.key_agreement:
        raise CertificateError(f"{what}: expected KeyUsage keyAgreement, got {_usage_names(usage)}")
    if purposes is None or PDH_MARKER_OID not in purposes:
        got = "none" if purposes is None else ", ".join(p.dotted_string for p in purposes)
        raise CertificateError(
            f"{what}: expected ExtendedKeyUsage {PDH_MARKER_OID.dotted_string} (migd SEV PDH), got {got}"
        )
    return public_key


def _usage_names(usage: x509.KeyUsage | None) -> str:
    if usage is None:
        return "no KeyUsage extension"
    flags = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    )
    return ", ".join(flag for flag in flags if getattr(usage, flag)) or "no usage bits"


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_key_matches(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    try:
        theirs = cert.public_key().public_bytes(serialization.Encoding.DER, spki)
    except _MALFORMED as exc:
        raise CertificateError(f"{cert_path}: unreadable public key: {exc}") from exc
    if ours != theirs:
        raise CertificateError(f"{cert_path} does not certify the key in {key_path}")


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
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)  # mkstemp makes 0600; certificates are public
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.rename(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise CertificateError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    if len(data) > limit:
        raise CertificateError(f"{what} {path}: expected at most {limit} bytes, the file is larger")
    return data


def _load_cert_file(path: Path, what: str) -> x509.Certificate:
    return _parse_one_pem(_read_limited(path, MAX_PEM_FILE, what), f"{what} {path}")


def _load_key_file(path: Path, curve: type[ec.EllipticCurve], what: str) -> ec.EllipticCurvePrivateKey:
    data = _read_limited(path, MAX_PEM_FILE, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{what} {path}: expected an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{what} {path}: expected an EC key, got {type(key).__name__}")
    if not isinstance(key.curve, curve):
        raise CertificateError(f"{what} {path}: expected curve {curve.name}, got {key.curve.name}")
    return key


def _load_or_create_key(
    key_path: Path, cert_path: Path, curve: type[ec.EllipticCurve], what: str
) -> ec.EllipticCurvePrivateKey:
    if key_path.exists():
        return _load_key_file(key_path, curve, what)
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
        cert = _load_cert_file(cert_path, "certificate")
        _check_key_matches(cert, key, cert_path, key_path)
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
    data = _read_limited(path, MAX_PEM_FILE, "trust-anchor file")
    try:
        present = x509.load_pem_x509_certificates(data)
    except _MALFORMED as exc:
        raise CertificateError(f"trust-anchor file {path}: expected PEM certificates: {exc}") from exc
    if ca_cert not in present:
        raise CertificateError(
            f"trust-anchor file {path} does not contain the owner CA {ca_cert.subject.rfc4514_string()!r}; "
            "remove it or add the CA certificate"
        )


def _configure_tls(
    context: ssl.SSLContext,
    ca: str | os.PathLike[str],
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
) -> ssl.SSLContext:
    # Both ends are migd: no reason to speak anything older than TLS 1.3.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        context.load_verify_locations(cafile=os.fspath(ca))
        context.load_cert_chain(certfile=os.fspath(cert), keyfile=os.fspath(key))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"TLS files (ca={ca}, cert={cert}, key={key}) do not load: {exc}") from exc
    return context


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _as_utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware, got a naive datetime")
    return moment.astimezone(dt.timezone.utc)
