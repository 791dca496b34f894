"""Checking and using host identities: PDH chain validation, key/certificate loading, ECDH, TLS.

The counterpart of :mod:`migd.platform.identity` (which creates and stores the identity): everything
here reads, never writes. Real SEV firmware certifies a Platform Diffie-Hellman key (PDH)
through AMD's ARK → ASK → CEK → PEK → PDH chain (SEV API 55766, "Certificates"); migd's
emulated firmware uses X.509 under an *owner CA* instead, and SEND_START / RECEIVE_START
always validate the peer's PDH against configured trust anchors (docs/design.md §5 "SEV firmware
transport": real firmware skips the check unless the DOMAIN or SEV policy bit is set; migd never
does).

A PDH certificate is told apart from every other certificate of the CA by its
ExtendedKeyUsage: it carries :data:`PDH_MARKER_OID`, migd's own "SEV PDH" purpose (together
with KeyUsage keyAgreement). That also keeps a PDH certificate from being accepted as a TLS
certificate: OpenSSL's purpose check wants serverAuth/clientAuth.

Certificates from peers are untrusted input: they are size-limited, parsed completely up
front (``cryptography`` parses lazily, so hostile DER could otherwise raise anywhere later),
and every parse failure surfaces as :class:`~migd.errors.CertificateError`.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from migd.errors import CertificateError

__all__ = [
    "MAX_PDH_CERT_PEM",
    "MAX_PEM_FILE",
    "PDH_CURVE",
    "PDH_MARKER_OID",
    "TlsProblem",
    "certificate_extension",
    "certificate_pem",
    "check_is_ca",
    "check_key_matches",
    "check_pdh_profile",
    "ecdh_shared_secret",
    "load_certificate_bundle",
    "load_certificate_file",
    "load_private_key_file",
    "load_trust_anchors",
    "read_limited",
    "tls_problem",
    "tls_client_context",
    "tls_server_context",
    "verify_pdh_certificate",
]

#: migd's own "SEV PDH" key purpose (ExtendedKeyUsage). It lives in the UUID-derived arc
#: 2.25 (ITU-T X.667 | ISO/IEC 9834-8), which needs no registration, instead of borrowing a
#: private enterprise number we do not own: 2.25.<UUID 6620b2a6-b576-43b5-aea6-931d1d39a3eb>.
PDH_MARKER_OID = x509.ObjectIdentifier("2.25.135751032546478720659894720421600797675")

PDH_CURVE = ec.SECP384R1  # SEV API 55766: PDH keys are ECDH on P-384

#: Largest PDH certificate accepted from a peer; ours are about 700 bytes of PEM.
MAX_PDH_CERT_PEM = 16 * 1024
#: Largest local PEM file (keys, certificates, trust-anchor bundles) read from disk.
MAX_PEM_FILE = 1024 * 1024

# Found by flipping every byte of a valid certificate: besides ValueError, parsing raises
# TypeError, InvalidVersion and DuplicateExtension (not ValueErrors), and *warns* about
# some malformations (negative serial, name-attribute length), which under ``-W error``
# are raised and then are one more malformed input. cryptography 44-49 also raise KeyError
# from ``cert.subject`` for a name attribute of an unknown string type (e.g. tag 13).
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    Warning,
)
_ALLOWED_SIGNATURE_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)

# OpenSSL's X509_V_ERR_* verify codes (include/openssl/x509_vfy.h), as
# ssl.SSLCertVerificationError.verify_code carries them.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_INVALID_PURPOSE = 26
X509_V_ERR_HOSTNAME_MISMATCH = 62
#: "Not issued by a CA this side trusts": no issuer among the trusted certificates (2, 20, 21),
#: a self-signed certificate or chain root that is not one of them (18, 19), a signature that
#: does not verify under the issuer's key (7).
UNKNOWN_ISSUER_VERIFY_CODES = frozenset({2, 7, 18, 19, 20, 21})


class TlsProblem(enum.Enum):
    """Why a TLS handshake between two daemons failed, as OpenSSL reports it (either side)."""

    NO_CERTIFICATE = "no-certificate"  # the peer presented none (we required one)
    UNKNOWN_CA = "unknown-ca"  # the peer's certificate is not issued by our tls.ca
    EXPIRED = "expired"  # the peer's certificate is past its notAfter
    NOT_YET_VALID = "not-yet-valid"  # the peer's certificate is before its notBefore
    WRONG_PURPOSE = "wrong-purpose"  # its ExtendedKeyUsage lacks serverAuth / clientAuth
    NAME_MISMATCH = "name-mismatch"  # the destination's certificate does not name the host we dialled
    BAD_CERTIFICATE = "bad-certificate"  # any other verify failure of the peer's certificate
    REFUSED_BY_PEER = "refused-by-peer"  # the peer sent an alert about our certificate
    VERSION = "version"  # no common TLS version (migd speaks 1.3 only)
    NOT_TLS = "not-tls"  # the bytes that came are not TLS (plain TCP, HTTP)
    OTHER = "other"


# OpenSSL reason codes (the ``reason`` attribute of ssl.SSLError; include/openssl/sslerr.h).
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
                              "PACKET_LENGTH_TOO_LONG"})
_VERSION_REASONS = frozenset({"UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "VERSION_TOO_LOW",
                              "TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_SSL_VERSION"})
# Alerts the peer sends when it refuses the certificate we presented (received: "<...>_ALERT_<name>").
_REFUSED_ALERTS = ("_ALERT_CERTIFICATE_REQUIRED", "_ALERT_UNKNOWN_CA", "_ALERT_BAD_CERTIFICATE",
                   "_ALERT_CERTIFICATE_EXPIRED", "_ALERT_UNSUPPORTED_CERTIFICATE", "_ALERT_CERTIFICATE_UNKNOWN",
                   "_ALERT_CERTIFICATE_REVOKED", "_ALERT_DECRYPT_ERROR", "_ALERT_ACCESS_DENIED")
_VERIFY_PROBLEMS = {
    X509_V_ERR_CERT_NOT_YET_VALID: TlsProblem.NOT_YET_VALID,
    X509_V_ERR_CERT_HAS_EXPIRED: TlsProblem.EXPIRED,
    X509_V_ERR_INVALID_PURPOSE: TlsProblem.WRONG_PURPOSE,
    X509_V_ERR_HOSTNAME_MISMATCH: TlsProblem.NAME_MISMATCH,
    **{code: TlsProblem.UNKNOWN_CA for code in UNKNOWN_ISSUER_VERIFY_CODES},
}


def tls_problem(reason: str | None, verify_code: int | None = None) -> TlsProblem:
    """Classify a failed TLS handshake from OpenSSL's reason code and, if any, its verify code.

    ``reason`` is ``ssl.SSLError.reason`` (e.g. ``PEER_DID_NOT_RETURN_A_CERTIFICATE``);
    ``verify_code`` is ``ssl.SSLCertVerificationError.verify_code``. Codes, not message
    prose, so that OpenSSL rewording a message changes nothing.
    """
    if reason == "CERTIFICATE_VERIFY_FAILED" or verify_code:
        return _VERIFY_PROBLEMS.get(verify_code or 0, TlsProblem.BAD_CERTIFICATE)
    if reason is None:
        return TlsProblem.OTHER
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return TlsProblem.NO_CERTIFICATE
    if reason in _VERSION_REASONS:
        return TlsProblem.VERSION
    if reason in _NOT_TLS_REASONS:
        return TlsProblem.NOT_TLS
    if reason.endswith(_REFUSED_ALERTS):
        return TlsProblem.REFUSED_BY_PEER
    return TlsProblem.OTHER


def load_trust_anchors(paths: Iterable[str | os.PathLike[str]]) -> list[x509.Certificate]:
    """Load CA certificates from PEM files (each may hold several); every one must be a CA."""
    anchors: list[x509.Certificate] = []
    files = [Path(p) for p in paths]
    if not files:
        raise CertificateError("no trust-anchor files given; expected at least one PEM file")
    for path in files:
        certs = load_certificate_bundle(path, "trust-anchor file")
        for index, cert in enumerate(certs):
            check_is_ca(cert, f"trust anchor #{index} in {path}")
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
    at = dt.datetime.now(dt.timezone.utc) if now is None else _as_utc(now)
    cert = _parse_one_pem(data, "PDH certificate")
    _check_issued_by_anchor(cert, anchors, at)
    _check_validity(cert, at, "PDH certificate")
    return check_pdh_profile(cert, "PDH certificate")


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


def load_certificate_file(path: Path, what: str) -> x509.Certificate:
    """Exactly one well-formed PEM certificate from ``path`` (at most :data:`MAX_PEM_FILE` bytes)."""
    return _parse_one_pem(read_limited(path, MAX_PEM_FILE, what), f"{what} {path}")


def load_certificate_bundle(path: Path, what: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``path`` (at least one; at most :data:`MAX_PEM_FILE` bytes)."""
    data = read_limited(path, MAX_PEM_FILE, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except _MALFORMED as exc:
        raise CertificateError(f"{what} {path}: expected PEM certificates: {exc}") from exc


def load_private_key_file(path: Path, curve: type[ec.EllipticCurve], what: str) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC private key on ``curve`` from ``path``; ``CertificateError`` otherwise."""
    data = read_limited(path, MAX_PEM_FILE, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{what} {path}: expected an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{what} {path}: expected an EC key, got {type(key).__name__}")
    if not isinstance(key.curve, curve):
        raise CertificateError(f"{what} {path}: expected curve {curve.name}, got {key.curve.name}")
    return key


def check_key_matches(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> None:
    """Raise ``CertificateError`` unless ``cert`` certifies the public half of ``key``."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    try:
        theirs = cert.public_key().public_bytes(serialization.Encoding.DER, spki)
    except _MALFORMED as exc:
        raise CertificateError(f"{cert_path}: unreadable public key: {exc}") from exc
    if ours != theirs:
        raise CertificateError(f"{cert_path} does not certify the key in {key_path}")


def check_is_ca(cert: x509.Certificate, what: str) -> None:
    """Raise ``CertificateError`` unless ``cert`` is a CA (BasicConstraints CA, keyCertSign if KeyUsage)."""
    try:
        constraints = certificate_extension(cert, x509.BasicConstraints)
        usage = certificate_extension(cert, x509.KeyUsage)
    except _MALFORMED as exc:
        raise CertificateError(f"{what}: malformed extensions: {exc}") from exc
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{what}: expected a CA certificate (BasicConstraints CA=TRUE), got a non-CA")
    if usage is not None and not usage.key_cert_sign:
        raise CertificateError(f"{what}: expected KeyUsage keyCertSign on a CA, it is absent")


def check_pdh_profile(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    """Check the PDH profile of a certificate; return its P-384 public key.

    ``cert`` must come from this module's parsers (:func:`load_certificate_file`), which
    touch every field up front, so nothing below can raise anything but ``CertificateError``.

    SHA-2 signature, no unrecognised critical extension, EC secp384r1 key, not a CA,
    KeyUsage keyAgreement and ExtendedKeyUsage :data:`PDH_MARKER_OID`.
    """
    public_key = cert.public_key()
    digest = cert.signature_hash_algorithm
    extensions = list(cert.extensions)
    constraints = certificate_extension(cert, x509.BasicConstraints)
    usage = certificate_extension(cert, x509.KeyUsage)
    purposes = certificate_extension(cert, x509.ExtendedKeyUsage)
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


def certificate_extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    """The value of ``cert``'s extension of type ``kind``, or None when it has none."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


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
            check_is_ca(anchor, what)
            _check_validity(anchor, now, what)
        except CertificateError as exc:
            failures.append(str(exc))
            continue
        return
    raise CertificateError("; ".join(failures))


def _check_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now <= end:
        raise CertificateError(
            f"{what}: valid from {start.isoformat()} to {end.isoformat()}, checked at {now.isoformat()}"
        )


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


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of ``path`` (``what`` names it in errors); CertificateError if larger or unreadable."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise CertificateError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    if len(data) > limit:
        raise CertificateError(f"{what} {path}: expected at most {limit} bytes, the file is larger")
    return data


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


def _as_utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware, got a naive datetime")
    return moment.astimezone(dt.timezone.utc)
