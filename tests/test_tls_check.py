"""`migd serve`'s check of its own TLS identity against tls.ca (migd/daemon/tls_check.py).

Each broken identity (another CA, a CA of the same name with another key, a key that is not the
certificate's, expired, not yet valid, a purpose missing) is refused with a message naming the
file and the problem; the host identity ``migd keys init`` makes passes. The negative control:
the TLS context the daemon built before the check (``tls_server_context``) loads the very same
broken files without a word, which is why the problem surfaced only at migration time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migd.daemon.tls_check import check_tls_identity
from migd.errors import CertificateError
from migd.platform import identity
from migd.platform.pki_verify import tls_client_context, tls_server_context

NOW = dt.datetime.now(dt.timezone.utc)
BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path, common_name: str = "owner CA", *, path_length: int | None = 0
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    """A self-signed CA (cert written to ``directory/ca.pem``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def make_host(directory: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path], *,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              purposes: list[x509.ObjectIdentifier] | None = BOTH, digital_signature: bool = True
              ) -> tuple[Path, Path]:
    """A host certificate and key under ``ca`` (``host.pem``, ``host.key`` in ``directory``)."""
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name("hostA")).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or NOW - dt.timedelta(days=1))
               .not_valid_after(not_after or NOW + dt.timedelta(days=365))
               .add_extension(x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=not digital_signature, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False))
    if purposes is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "host.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "host.key").write_bytes(_pem_key(key))
    return directory / "host.pem", directory / "host.key"


@dataclass(frozen=True)
class Case:
    ca: Path
    cert: Path
    key: Path
    expected: str  # in the message ("" for an identity that must pass)


def build_case(kind: str, root: Path) -> Case:
    """The files of one identity of ``kind`` under ``root``."""
    ca = make_ca(root / "ca")
    if kind == "good":
        return Case(ca[2], *make_host(root / "host", ca), "")
    if kind == "other-ca":
        other = make_ca(root / "other-ca", "another CA")
        return Case(ca[2], *make_host(root / "host", other), "is issued by 'CN=another CA', not by a CA in tls.ca")
    if kind == "same-name-other-key":
        other = make_ca(root / "other-ca")  # same subject, another key: a re-created CA
        return Case(ca[2], *make_host(root / "host", other), "its signature does not verify under that CA's key")
    if kind == "key-mismatch":
        cert, _ = make_host(root / "host", ca)
        _, key = make_host(root / "other", ca)
        return Case(ca[2], cert, key, "is not the key of tls.cert")
    if kind == "expired":
        files = make_host(root / "host", ca, not_before=NOW - dt.timedelta(days=30),
                          not_after=NOW - dt.timedelta(days=1))
        return Case(ca[2], *files, "expired on")
    if kind == "not-yet-valid":
        files = make_host(root / "host", ca, not_before=NOW + dt.timedelta(days=2),
                          not_after=NOW + dt.timedelta(days=30))
        return Case(ca[2], *files, "is not valid yet")
    if kind == "server-auth-only":
        files = make_host(root / "host", ca, purposes=[ExtendedKeyUsageOID.SERVER_AUTH])
        return Case(ca[2], *files, "lacks clientAuth")
    if kind == "client-auth-only":
        files = make_host(root / "host", ca, purposes=[ExtendedKeyUsageOID.CLIENT_AUTH])
        return Case(ca[2], *files, "lacks serverAuth")
    if kind == "no-digital-signature":
        files = make_host(root / "host", ca, digital_signature=False)
        return Case(ca[2], *files, "does not allow digitalSignature")
    raise AssertionError(kind)


BROKEN = ["other-ca", "same-name-other-key", "key-mismatch", "expired", "not-yet-valid", "server-auth-only",
          "client-auth-only", "no-digital-signature"]


def test_the_identity_keys_init_makes_passes(tmp_path: Path) -> None:
    paths = identity.init_host(tmp_path / "hostA", tmp_path / "ca", common_name="hostA")
    check_tls_identity(paths["ca_cert"], paths["tls_cert"], paths["tls_key"])


@pytest.mark.parametrize("kind", ["good", "no-purposes"])
def test_a_sound_identity_passes(tmp_path: Path, kind: str) -> None:
    """The negative control of every refusal below: the same builder, nothing broken."""
    ca = make_ca(tmp_path / "ca")
    cert, key = make_host(tmp_path / "host", ca, purposes=None if kind == "no-purposes" else BOTH)
    check_tls_identity(ca[2], cert, key)


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_identity_is_refused_naming_the_file_and_the_problem(tmp_path: Path, kind: str) -> None:
    case = build_case(kind, tmp_path)
    with pytest.raises(CertificateError) as refused:
        check_tls_identity(case.ca, case.cert, case.key)
    message = str(refused.value)
    assert case.expected in message, message
    named = case.key if kind == "key-mismatch" else case.cert
    assert str(named) in message, message


@pytest.mark.parametrize("kind", ["other-ca", "same-name-other-key", "expired", "not-yet-valid"])
def test_negative_control_the_tls_contexts_alone_accept_these_files(tmp_path: Path, kind: str) -> None:
    """What the daemon did before the check: both contexts load without complaint (the peer
    refused the certificate only at migration time)."""
    case = build_case(kind, tmp_path)
    tls_server_context(case.ca, case.cert, case.key)
    tls_client_context(case.ca, case.cert, case.key)


def test_the_clock_decides_validity(tmp_path: Path) -> None:
    """``now`` is honoured: the certificate expires at its notAfter, not before."""
    case = build_case("good", tmp_path)
    check_tls_identity(case.ca, case.cert, case.key, now=NOW + dt.timedelta(days=364))
    with pytest.raises(CertificateError, match="expired on"):
        check_tls_identity(case.ca, case.cert, case.key, now=NOW + dt.timedelta(days=366))


def test_a_ca_file_that_is_not_a_ca_is_refused(tmp_path: Path) -> None:
    """tls.ca pointing at a host certificate that issued nothing: named, not a stack trace."""
    case = build_case("good", tmp_path)
    with pytest.raises(CertificateError, match="not by a CA in tls.ca"):
        check_tls_identity(case.cert, case.cert, case.key)


def _intermediate(root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path], *, ca: bool = True
                  ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    """An intermediate CA (or, ``ca=False``, a certificate posing as one) under ``root``."""
    root_cert, root_key, path = root
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("issuing CA")).issuer_name(root_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    return cert, key, path


@pytest.mark.parametrize(("carried", "intermediate_is_ca", "refused"), [
    (True, True, None),  # root → issuing CA → host, the file carries the issuing CA: a peer accepts it
    (False, True, "is issued by 'CN=issuing CA', not by a CA in tls.ca"),  # control: without it, no path
    (True, False, "expected a CA certificate"),  # control: an "intermediate" that is no CA makes no path
    ("root-path-length-0", True, r"allows 0 intermediate CA\(s\) below it"),  # control: the root forbids one
])
def test_a_chain_through_an_intermediate_the_file_carries(
    tmp_path: Path, carried: bool | str, intermediate_is_ca: bool, refused: str | None,
) -> None:
    root = make_ca(tmp_path / "ca", path_length=0 if carried == "root-path-length-0" else None)
    issuing = _intermediate(root, ca=intermediate_is_ca)
    cert, key = make_host(tmp_path / "host", issuing)
    if carried:
        cert.write_bytes(cert.read_bytes() + issuing[0].public_bytes(serialization.Encoding.PEM))
    if refused is None:
        check_tls_identity(root[2], cert, key)
        tls_server_context(root[2], cert, key)  # and OpenSSL loads the same files
        return
    with pytest.raises(CertificateError, match=refused):
        check_tls_identity(root[2], cert, key)
