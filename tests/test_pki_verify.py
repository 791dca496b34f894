"""Tests for migd/platform/pki_verify.py: PDH chain validation against hostile input, ECDH, trust anchors, TLS."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migd.platform import identity, pki_verify
from migd.errors import CertificateError

UTC = dt.timezone.utc


@dataclass(frozen=True)
class Pki:
    """One owner CA and two hosts under it, shared (read-only) by the tests of this module."""

    ca_dir: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    hosts: dict[str, Path]

    @property
    def anchors(self) -> list[x509.Certificate]:
        return [self.ca_cert]

    def pdh_pem(self, host: str) -> bytes:
        return (self.hosts[host] / identity.PDH_CERT).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    hosts = {}
    for name in ("hostA", "hostB"):
        identity.init_host(root / name, root / "ca", common_name=name)
        hosts[name] = root / name
    ca_cert, ca_key = identity.ensure_ca(root / "ca")
    return Pki(root / "ca", ca_cert, ca_key, hosts)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _usage(**flags: bool) -> x509.KeyUsage:
    fields = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{f: flags.get(f, False) for f in fields})


def _forge(
    issuer_name: x509.Name,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    public_key: object | None = None,
    subject: str = "forged PDH",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_usage: x509.KeyUsage | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (pki_verify.PDH_MARKER_OID,),
    ca: bool = False,
) -> bytes:
    """A certificate built independently of migd; the defaults give a valid PDH profile."""
    now = dt.datetime.now(UTC)
    key = public_key if public_key is not None else ec.generate_private_key(ec.SECP384R1()).public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(hours=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(key_usage or _usage(key_agreement=True), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=True)
    return builder.sign(signing_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM)


def _self_signed_ca(
    name: str, key: ec.EllipticCurvePrivateKey, days: tuple[int, int] = (-1, 9)
) -> x509.Certificate:
    """A CA certificate valid from ``now + days[0]`` to ``now + days[1]`` (days)."""
    now = dt.datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA384())
    )


def _armour(der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_two_hosts_verify_each_other_and_derive_the_same_z(pki: Pki, tmp_path: Path) -> None:
    key_a, cert_a = identity.load_pdh(pki.hosts["hostA"])
    key_b, cert_b = identity.load_pdh(pki.hosts["hostB"])
    anchors = pki_verify.load_trust_anchors([pki.hosts["hostA"] / identity.TRUST_DIR_CA_COPY])
    peer_b = pki_verify.verify_pdh_certificate(pki_verify.certificate_pem(cert_b), anchors)
    peer_a = pki_verify.verify_pdh_certificate(pki_verify.certificate_pem(cert_a), anchors)
    z_ab = pki_verify.ecdh_shared_secret(key_a, peer_b)
    z_ba = pki_verify.ecdh_shared_secret(key_b, peer_a)
    assert z_ab == z_ba and len(z_ab) == 48
    # Negative control: a third host under the same CA gets a different secret with A.
    identity.init_host(tmp_path / "hostC", pki.ca_dir, common_name="hostC")
    _, cert_c = identity.load_pdh(tmp_path / "hostC")
    peer_c = pki_verify.verify_pdh_certificate(pki_verify.certificate_pem(cert_c), anchors)
    assert pki_verify.ecdh_shared_secret(key_a, peer_c) != z_ab


def test_ecdh_refuses_a_key_off_the_pdh_curve(pki: Pki) -> None:
    key_a, _ = identity.load_pdh(pki.hosts["hostA"])
    with pytest.raises(CertificateError, match="secp384r1"):
        pki_verify.ecdh_shared_secret(key_a, ec.generate_private_key(ec.SECP256R1()).public_key())


@pytest.mark.fault_class("access control: untrusted PDH")
def test_pdh_from_another_ca_is_rejected_even_under_the_same_name(pki: Pki, tmp_path: Path) -> None:
    identity.init_host(tmp_path / "rogue", tmp_path / "rogue-ca", common_name="hostA")
    rogue_pem = (tmp_path / "rogue" / identity.PDH_CERT).read_bytes()
    # The rogue CA was created with the default name, so the issuer *name* matches ours.
    assert x509.load_pem_x509_certificate(rogue_pem).issuer == pki.ca_cert.subject
    with pytest.raises(CertificateError, match="signature does not verify"):
        pki_verify.verify_pdh_certificate(rogue_pem, pki.anchors)
    named_ca = _self_signed_ca("someone else's CA", ec.generate_private_key(ec.SECP384R1()))
    other = _forge(named_ca.subject, ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(CertificateError, match="is not a trust anchor"):
        pki_verify.verify_pdh_certificate(other, pki.anchors)
    # Negative control: the rogue PDH is fine for whoever trusts the rogue CA.
    rogue_anchors = pki_verify.load_trust_anchors([tmp_path / "rogue-ca" / identity.CA_CERT])
    pki_verify.verify_pdh_certificate(rogue_pem, rogue_anchors)


@pytest.mark.fault_class("access control: untrusted PDH")
def test_self_signed_pdh_is_rejected(pki: Pki) -> None:
    own = ec.generate_private_key(ec.SECP384R1())
    self_signed = _forge(_name("forged PDH"), own, public_key=own.public_key())
    with pytest.raises(CertificateError, match="is not a trust anchor"):
        pki_verify.verify_pdh_certificate(self_signed, pki.anchors)
    # Claiming the owner CA as issuer does not help: the signature is not the CA's.
    claims_ca = _forge(pki.ca_cert.subject, own, public_key=own.public_key())
    with pytest.raises(CertificateError, match="signature does not verify"):
        pki_verify.verify_pdh_certificate(claims_ca, pki.anchors)
    # Negative control: the very same profile signed by the CA key is accepted.
    genuine = _forge(pki.ca_cert.subject, pki.ca_key, public_key=own.public_key())
    assert pki_verify.verify_pdh_certificate(genuine, pki.anchors) == own.public_key()


def test_validity_window_of_pdh_and_anchor(pki: Pki) -> None:
    now = dt.datetime.now(UTC)
    expired = _forge(pki.ca_cert.subject, pki.ca_key, not_before=now - dt.timedelta(days=30),
                     not_after=now - dt.timedelta(days=1))
    with pytest.raises(CertificateError, match="PDH certificate: valid from .* checked at"):
        pki_verify.verify_pdh_certificate(expired, pki.anchors)
    future = _forge(pki.ca_cert.subject, pki.ca_key, not_before=now + dt.timedelta(days=1),
                    not_after=now + dt.timedelta(days=30))
    with pytest.raises(CertificateError, match="valid from"):
        pki_verify.verify_pdh_certificate(future, pki.anchors)
    # ``now`` drives the clock: the same certificate is good inside its window, bad after it.
    pem = pki.pdh_pem("hostB")
    end = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    pki_verify.verify_pdh_certificate(pem, pki.anchors, now=end - dt.timedelta(seconds=1))
    with pytest.raises(CertificateError, match="valid from"):
        pki_verify.verify_pdh_certificate(pem, pki.anchors, now=end + dt.timedelta(seconds=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        pki_verify.verify_pdh_certificate(pem, pki.anchors, now=dt.datetime.now())
    # An expired anchor (same name, same key: the PDH signature verifies) is rejected too.
    stale_anchor = _self_signed_ca("migd owner CA", pki.ca_key, days=(-30, -1))
    with pytest.raises(CertificateError, match="trust anchor .*: valid from"):
        pki_verify.verify_pdh_certificate(pem, [stale_anchor])
    fresh_anchor = _self_signed_ca("migd owner CA", pki.ca_key, days=(-1, 1))
    pki_verify.verify_pdh_certificate(pem, [stale_anchor, fresh_anchor])  # rollover: either may sign


def test_non_pdh_certificates_from_the_same_ca_are_rejected(pki: Pki) -> None:
    tls_pem = (pki.hosts["hostA"] / identity.TLS_CERT).read_bytes()
    with pytest.raises(CertificateError, match="secp384r1"):  # host.pem is P-256
        pki_verify.verify_pdh_certificate(tls_pem, pki.anchors)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    no_marker = _forge(pki.ca_cert.subject, pki.ca_key, public_key=p384, eku=None)
    with pytest.raises(CertificateError, match=f"ExtendedKeyUsage {pki_verify.PDH_MARKER_OID.dotted_string}"):
        pki_verify.verify_pdh_certificate(no_marker, pki.anchors)
    tls_purpose = _forge(pki.ca_cert.subject, pki.ca_key, public_key=p384,
                         eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                         key_usage=_usage(digital_signature=True))
    with pytest.raises(CertificateError, match="KeyUsage keyAgreement, got digital_signature"):
        pki_verify.verify_pdh_certificate(tls_purpose, pki.anchors)
    signing_only = _forge(
        pki.ca_cert.subject, pki.ca_key, public_key=p384, key_usage=_usage(digital_signature=True)
    )
    with pytest.raises(CertificateError, match="keyAgreement"):
        pki_verify.verify_pdh_certificate(signing_only, pki.anchors)
    as_ca = _forge(pki.ca_cert.subject, pki.ca_key, public_key=p384, ca=True)
    with pytest.raises(CertificateError, match="end-entity"):
        pki_verify.verify_pdh_certificate(as_ca, pki.anchors)
    with pytest.raises(CertificateError):
        pki_verify.verify_pdh_certificate(pki_verify.certificate_pem(pki.ca_cert), pki.anchors)
    # Negative control: the forging helper's defaults make an acceptable PDH.
    control = _forge(pki.ca_cert.subject, pki.ca_key, public_key=p384)
    assert pki_verify.verify_pdh_certificate(control, pki.anchors) == p384


@pytest.mark.parametrize(
    "public_key",
    [
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP521R1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["p256", "p521", "ed25519"],
)
def test_pdh_on_the_wrong_curve_is_rejected(pki: Pki, public_key: object) -> None:
    pem = _forge(pki.ca_cert.subject, pki.ca_key, public_key=public_key)
    with pytest.raises(CertificateError, match="expected an EC secp384r1 key"):
        pki_verify.verify_pdh_certificate(pem, pki.anchors)


def test_anchor_must_be_a_ca(pki: Pki) -> None:
    # hostA's TLS key signs a "PDH" in the name of its own (non-CA) certificate.
    tls_key = serialization.load_pem_private_key((pki.hosts["hostA"] / identity.TLS_KEY).read_bytes(), None)
    tls_cert = x509.load_pem_x509_certificate((pki.hosts["hostA"] / identity.TLS_CERT).read_bytes())
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
    pem = _forge(tls_cert.subject, tls_key)
    with pytest.raises(CertificateError, match="expected a CA certificate"):
        pki_verify.verify_pdh_certificate(pem, [tls_cert])
    with pytest.raises(CertificateError, match="no trust anchors"):
        pki_verify.verify_pdh_certificate(pki.pdh_pem("hostA"), [])


GARBAGE = {
    "empty": b"",
    "text": b"garbage",
    "armoured-junk": b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    "armoured-empty": b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    "nul-bytes": bytes(4096),
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_a_certificate_error(pki: Pki, data: bytes) -> None:
    with pytest.raises(CertificateError, match="PDH certificate: expected one"):
        pki_verify.verify_pdh_certificate(data, pki.anchors)


def test_truncated_der_two_certs_and_wrong_types_are_rejected(pki: Pki) -> None:
    pem = pki.pdh_pem("hostB")
    der = _der(pem)
    for cut in (1, len(der) // 2, len(der) - 1):
        with pytest.raises(CertificateError):
            pki_verify.verify_pdh_certificate(_armour(der[:cut]), pki.anchors)
    with pytest.raises(CertificateError):
        pki_verify.verify_pdh_certificate(pem[: len(pem) // 2], pki.anchors)  # cut inside the base64
    with pytest.raises(CertificateError, match="expected one"):
        pki_verify.verify_pdh_certificate(der, pki.anchors)  # DER, not PEM
    with pytest.raises(CertificateError, match="expected one PEM certificate, got 2"):
        pki_verify.verify_pdh_certificate(pem + pki.pdh_pem("hostA"), pki.anchors)
    with pytest.raises(CertificateError, match="expected PEM bytes, got str"):
        pki_verify.verify_pdh_certificate(pem.decode(), pki.anchors)  # type: ignore[arg-type]
    # Negative control: the untouched certificate, also as a memoryview, verifies.
    pki_verify.verify_pdh_certificate(memoryview(_armour(der)), pki.anchors)


def test_oversized_input_is_rejected_at_the_limit(pki: Pki) -> None:
    pem = pki.pdh_pem("hostB")
    padded = pem + b"\n" * (pki_verify.MAX_PDH_CERT_PEM - len(pem))
    pki_verify.verify_pdh_certificate(padded, pki.anchors)  # exactly at the limit: fine
    with pytest.raises(CertificateError, match=f"at most {pki_verify.MAX_PDH_CERT_PEM} bytes, got"):
        pki_verify.verify_pdh_certificate(padded + b"\n", pki.anchors)
    with pytest.raises(CertificateError, match="at most"):
        pki_verify.verify_pdh_certificate(bytes(10 * 1024 * 1024), pki.anchors)


def test_tampered_signature_or_body_is_rejected(pki: Pki) -> None:
    der = bytearray(_der(pki.pdh_pem("hostB")))
    pki_verify.verify_pdh_certificate(_armour(bytes(der)), pki.anchors)  # control: re-armouring is harmless
    sig = bytearray(der)
    sig[-1] ^= 0x01  # last byte of the ECDSA signature's s value
    with pytest.raises(CertificateError, match="signature does not verify"):
        pki_verify.verify_pdh_certificate(_armour(bytes(sig)), pki.anchors)
    body = bytearray(der)
    at = bytes(body).index(b"hostB PDH")
    body[at] ^= 0x20  # "HostB PDH": a different subject under the same signature
    with pytest.raises(CertificateError, match="signature does not verify"):
        pki_verify.verify_pdh_certificate(_armour(bytes(body)), pki.anchors)


def test_signature_with_padding_bits_is_rejected(pki: Pki) -> None:
    """The BIT STRING's unused-bits count is outside the signed data: a non-zero count must not pass."""
    for _ in range(64):  # the parser takes the variant only if the signature's last bit is 0: 1/2 per try
        der = _der(_forge(pki.ca_cert.subject, pki.ca_key))
        if der[-1] & 1 == 0:
            break
    else:
        pytest.fail("no certificate with an even last signature byte in 64 tries")
    signature_len = len(x509.load_der_x509_certificate(der).signature)
    assert der[-signature_len - 1] == 0  # the unused-bits byte
    pki_verify.verify_pdh_certificate(_armour(der), pki.anchors)  # control
    padded = bytearray(der)
    padded[-signature_len - 1] = 1
    same_signature = x509.load_der_x509_certificate(der).signature
    assert x509.load_der_x509_certificate(bytes(padded)).signature == same_signature  # unsigned field
    with pytest.raises(CertificateError, match="whole-byte BIT STRING"):
        pki_verify.verify_pdh_certificate(_armour(bytes(padded)), pki.anchors)


@pytest.mark.filterwarnings("error")
def test_every_single_bit_flip_is_a_certificate_error(pki: Pki) -> None:
    """Hostile DER never escapes as another exception type (also with warnings as errors)."""
    der = _der(pki.pdh_pem("hostB"))
    accepted = []
    for position in range(len(der)):
        for mask in (0x01, 0x80):
            mutated = bytearray(der)
            mutated[position] ^= mask
            try:
                pki_verify.verify_pdh_certificate(_armour(bytes(mutated)), pki.anchors)
            except CertificateError:
                continue
            accepted.append((position, mask))
    assert accepted == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), armour=st.booleans())
def test_random_bytes_are_a_certificate_error(pki: Pki, data: bytes, armour: bool) -> None:
    with pytest.raises(CertificateError):
        pki_verify.verify_pdh_certificate(_armour(data) if armour else data, pki.anchors)


def test_load_trust_anchors_reads_bundles_and_rejects_bad_files(pki: Pki, tmp_path: Path) -> None:
    other = _self_signed_ca("second CA", ec.generate_private_key(ec.SECP384R1()))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki_verify.certificate_pem(pki.ca_cert) + pki_verify.certificate_pem(other))
    loaded = pki_verify.load_trust_anchors([bundle, str(pki.ca_dir / identity.CA_CERT)])
    assert loaded == [pki.ca_cert, other, pki.ca_cert]
    cases = {
        "missing.pem": None,
        "empty.pem": b"",
        "garbage.pem": b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
        "leaf.pem": (pki.hosts["hostA"] / identity.TLS_CERT).read_bytes(),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        expected = "expected a CA certificate" if name == "leaf.pem" else name
        with pytest.raises(CertificateError, match=expected):
            pki_verify.load_trust_anchors([bundle, path])
    with pytest.raises(CertificateError, match="no trust-anchor files"):
        pki_verify.load_trust_anchors([])


def _tls_files(state: Path) -> tuple[Path, Path, Path]:
    return state / identity.TRUST_DIR_CA_COPY, state / identity.TLS_CERT, state / identity.TLS_KEY


async def _exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[bytes, asyncio.Future[dict]]:
    """One ping/pong over TLS on 127.0.0.1; returns the reply and the server's view of the client."""
    client_seen: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(4)
            client_seen.set_result(writer.get_extra_info("peercert"))
            writer.write(b"pong")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
        )
        try:
            writer.write(b"ping")
            await writer.drain()
            reply = await reader.readexactly(4)
        finally:
            writer.close()
        return reply, client_seen
    finally:
        server.close()


def _run(coro: object) -> tuple[bytes, asyncio.Future[dict]]:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))  # type: ignore[arg-type]


def test_ssl_contexts_load_and_mutual_tls_handshake_works(pki: Pki) -> None:
    server_ctx = pki_verify.tls_server_context(*_tls_files(pki.hosts["hostA"]))
    client_ctx = pki_verify.tls_client_context(*_tls_files(pki.hosts["hostB"]))
    assert server_ctx.verify_mode == ssl.CERT_REQUIRED and client_ctx.check_hostname
    for server_hostname in ("hostA", "localhost", "127.0.0.1"):
        reply, client_seen = _run(_exchange(server_ctx, client_ctx, server_hostname))
        assert reply == b"pong"
        subject = dict(rdn[0] for rdn in client_seen.result()["subject"])
        assert subject["commonName"] == "hostB"  # the server really authenticated the client


@pytest.mark.fault_class("access control: TLS client certificate")
def test_mutual_tls_rejects_wrong_peers(pki: Pki, tmp_path: Path) -> None:
    server_ctx = pki_verify.tls_server_context(*_tls_files(pki.hosts["hostA"]))
    client_ctx = pki_verify.tls_client_context(*_tls_files(pki.hosts["hostB"]))
    # The client checks the server's name.
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _run(_exchange(server_ctx, client_ctx, "hostC"))
    # A PDH certificate is not a TLS certificate, though it is signed by the same CA.
    ca, _, _ = _tls_files(pki.hosts["hostA"])
    pdh_server = pki_verify.tls_server_context(ca, pki.hosts["hostA"] / identity.PDH_CERT,
                                             pki.hosts["hostA"] / identity.PDH_KEY)
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        _run(_exchange(pdh_server, client_ctx, "hostA"))
    # The server refuses a client from another CA, and a client without a certificate.
    identity.init_host(tmp_path / "rogue", tmp_path / "rogue-ca", common_name="hostB")
    rogue_client = pki_verify.tls_client_context(ca, *_tls_files(tmp_path / "rogue")[1:])
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=ca)
    for bad_client in (rogue_client, anonymous):
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            _run(_exchange(server_ctx, bad_client, "hostA"))
    mismatched_key = pki.hosts["hostB"] / identity.TLS_KEY
    with pytest.raises(CertificateError, match="do not load"):
        pki_verify.tls_server_context(ca, pki.hosts["hostA"] / identity.TLS_CERT, mismatched_key)
