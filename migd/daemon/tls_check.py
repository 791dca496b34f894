"""``migd serve`` checks its own TLS identity against ``tls.ca`` before anything listens.

Without the check a ``tls.cert`` that the peers cannot accept (issued by another CA, expired,
not matching ``tls.key``) surfaces only at migration time, as a refused handshake on the other
host. Here it stops the daemon at start with one message naming the file and the problem.

The certificate is used both ways (the listener's server certificate and the client
certificate of outgoing migrations and RESOLVE), so what either side of a peer checks is
checked here: issued by a CA certificate in ``tls.ca`` (issuer name and signature), that CA a
CA and valid, the certificate valid now, ``tls.key`` its private key, KeyUsage (if present)
allowing digitalSignature (TLS 1.3 signs with it), ExtendedKeyUsage (if present) allowing
both serverAuth and clientAuth (OpenSSL's purpose check on either side refuses it otherwise).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from migd.errors import CertificateError
from migd.platform.pki_verify import (
    MAX_PEM_FILE,
    certificate_extension,
    check_is_ca,
    load_certificate_bundle,
    read_limited,
)

__all__ = ["check_tls_identity"]

#: Both roles of the host certificate (RFC 5280 §4.2.1.12); anyExtendedKeyUsage allows every purpose.
_REQUIRED_PURPOSES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth (the migration listener)",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth (outgoing migrations, RESOLVE)",
}


def check_tls_identity(ca: Path, cert: Path, key: Path, *, now: dt.datetime | None = None) -> None:
    """Raise ``CertificateError`` naming the file and the problem unless ``cert``/``key`` form a
    usable TLS identity under ``ca`` at ``now`` (default: the current UTC time; timezone-aware)."""
    at = dt.datetime.now(dt.timezone.utc) if now is None else now.astimezone(dt.timezone.utc)
    authorities = load_certificate_bundle(ca, "tls.ca")
    # A certificate file may carry intermediates after the leaf; the leaf comes first (as OpenSSL
    # reads it in load_cert_chain).
    leaf, *intermediates = load_certificate_bundle(cert, "tls.cert")
    what = f"tls.cert {cert}"
    _check_chain(leaf, intermediates, authorities, ca, what, at)
    _check_validity(leaf, what, at)
    _check_key(leaf, cert, key)
    _check_purposes(leaf, what)


def _check_chain(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                 authorities: Sequence[x509.Certificate], ca: Path, what: str, at: dt.datetime) -> None:
    """From ``leaf`` through the intermediates the file carries up to a CA in ``tls.ca``, as a peer
    that trusts ``tls.ca`` builds the path (each intermediate used at most once: no loop)."""
    current, label, unused, below = leaf, what, list(intermediates), 0
    while not any(authority.subject == current.issuer for authority in authorities):
        step = next((c for c in unused if c.subject == current.issuer), None)
        if step is None:
            break  # _check_issuer names the missing issuer
        unused.remove(step)
        step_label = f"{what} (intermediate {step.subject.rfc4514_string()!r})"
        try:
            current.verify_directly_issued_by(step)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CertificateError(f"{label} is not signed by the intermediate {step_label} that names it") from exc
        check_is_ca(step, step_label)
        _check_path_length(step, below, step_label)
        _check_validity(step, step_label, at)
        current, label, below = step, step_label, below + 1
    _check_issuer(current, authorities, ca, label, at, below)


def _check_path_length(authority: x509.Certificate, below: int, what: str) -> None:
    """RFC 5280 §4.2.1.9: a CA's pathLenConstraint bounds the intermediate CAs that may follow it."""
    constraints = certificate_extension(authority, x509.BasicConstraints)
    if constraints is not None and constraints.path_length is not None and below > constraints.path_length:
        raise CertificateError(f"{what} allows {constraints.path_length} intermediate CA(s) below it "
                               f"(pathLenConstraint), the chain has {below}")


def _check_issuer(leaf: x509.Certificate, authorities: Sequence[x509.Certificate], ca: Path, what: str,
                  at: dt.datetime, below: int = 0) -> None:
    issuer = leaf.issuer.rfc4514_string()
    candidates = [authority for authority in authorities if authority.subject == leaf.issuer]
    if not candidates:
        held = ", ".join(repr(a.subject.rfc4514_string()) for a in authorities)
        raise CertificateError(f"{what} is issued by {issuer!r}, not by a CA in tls.ca {ca} (it holds {held}); "
                               f"peers that trust tls.ca will refuse it")
    problems: list[str] = []
    for authority in candidates:  # a re-keyed CA may share its predecessor's name: any one will do
        try:
            leaf.verify_directly_issued_by(authority)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            problems.append(f"{what} names {issuer!r} as its issuer, but its signature does not verify under "
                            f"that CA's key in tls.ca {ca} (another CA of the same name?) ({detail})")
            continue
        try:
            check_is_ca(authority, f"tls.ca {ca} ({issuer!r})")
            _check_path_length(authority, below, f"tls.ca {ca} ({issuer!r})")
            _check_validity(authority, f"tls.ca {ca} ({issuer!r})", at)
        except CertificateError as exc:
            problems.append(str(exc))
            continue
        return
    raise CertificateError("; ".join(problems))


def _check_validity(cert: x509.Certificate, what: str, at: dt.datetime) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if at < start:
        raise CertificateError(f"{what} is not valid yet: valid from {start.isoformat()} "
                               f"(now {at.isoformat()}; is this host's clock right?)")
    if at > end:
        raise CertificateError(f"{what} expired on {end.isoformat()} (now {at.isoformat()}); renew it")


def _check_key(leaf: x509.Certificate, cert: Path, key: Path) -> None:
    data = read_limited(key, MAX_PEM_FILE, "tls.key")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"tls.key {key}: expected an unencrypted PEM private key: {exc}") from exc
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CertificateError(f"tls.key {key} is not the key of tls.cert {cert} (their public keys differ)")


def _check_purposes(leaf: x509.Certificate, what: str) -> None:
    usage = certificate_extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise CertificateError(f"{what}: its KeyUsage does not allow digitalSignature, which TLS 1.3 needs")
    purposes = certificate_extension(leaf, x509.ExtendedKeyUsage)
    if purposes is None or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in purposes:
        return
    missing = [name for oid, name in _REQUIRED_PURPOSES.items() if oid not in purposes]
    if missing:
        raise CertificateError(f"{what}: its ExtendedKeyUsage lacks {' and '.join(missing)}; "
                               f"the host certificate serves both roles")
