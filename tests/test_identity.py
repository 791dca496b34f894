"""Tests for migd/platform/identity.py: creating and storing the owner CA and the host identity, loading the PDH.

Validation of certificates (PDH chain, trust anchors, TLS) is tested in tests/test_pki_verify.py.
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migd.cli import commands as cli
from migd.platform import identity, pki_verify
from migd.errors import CertificateError, ConfigError

KEY_FILES = (identity.PDH_KEY, identity.TLS_KEY)
CERT_FILES = (identity.PDH_CERT, identity.TLS_CERT, identity.TRUST_DIR_CA_COPY)


def _usage(**flags: bool) -> x509.KeyUsage:
    fields = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{f: flags.get(f, False) for f in fields})



def _snapshot(*dirs: Path) -> dict[Path, tuple[bytes, int, int]]:
    """Every file under ``dirs``: (content, mode, inode); a rewrite changes at least the inode."""
    out = {}
    for d in dirs:
        for path in sorted(d.iterdir()):
            st_ = path.stat()
            out[path] = (path.read_bytes(), stat.S_IMODE(st_.st_mode), st_.st_ino)
    return out


def test_keys_init_creates_every_file_with_private_keys_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, ca = tmp_path / "state", tmp_path / "ca"
    assert cli.main(["keys", "init", "--state-dir", str(state), "--ca", str(ca), "--name", "node1"]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(printed) == {"ca_cert", "pdh_cert", "pdh_key", "tls_cert", "tls_key", "trust_anchor"}
    assert printed["pdh_key"] == str((state / identity.PDH_KEY).absolute())
    assert sorted(p.name for p in ca.iterdir()) == sorted([identity.CA_CERT, identity.CA_KEY])
    assert sorted(p.name for p in state.iterdir()) == sorted(KEY_FILES + CERT_FILES)  # no temp files left
    for name in KEY_FILES:
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((ca / identity.CA_KEY).stat().st_mode) == 0o600
    for name in CERT_FILES:  # negative control: public files are world-readable, keys are not
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o644
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (state / identity.TRUST_DIR_CA_COPY).read_bytes() == (ca / identity.CA_CERT).read_bytes()

    ca_cert = x509.load_pem_x509_certificate((ca / identity.CA_CERT).read_bytes())
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.key_agreement
    assert isinstance(ca_cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca_cert.public_key().curve.name == "secp384r1"
    assert ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc >= dt.timedelta(days=3650)

    pdh = x509.load_pem_x509_certificate((state / identity.PDH_CERT).read_bytes())
    assert pdh.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1 PDH"
    pdh_eku = pdh.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(pdh_eku) == [identity.PDH_MARKER_OID]
    assert pdh.extensions.get_extension_for_class(x509.KeyUsage).value == _usage(key_agreement=True)
    lifetime = pdh.not_valid_after_utc - pdh.not_valid_before_utc
    assert dt.timedelta(days=1820) < lifetime < dt.timedelta(days=1830)

    tls = x509.load_pem_x509_certificate((state / identity.TLS_CERT).read_bytes())
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = tls.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    tls.verify_directly_issued_by(ca_cert)
    pdh.verify_directly_issued_by(ca_cert)


def test_keys_init_is_idempotent_and_fills_in_only_what_is_missing(tmp_path: Path) -> None:
    state, ca = tmp_path / "state", tmp_path / "ca"
    argv = ["keys", "init", "--state-dir", str(state), "--ca", str(ca), "--name", "node1"]
    assert cli.main(argv) == 0
    before = _snapshot(state, ca)
    assert cli.main(argv) == 0
    assert cli.main(argv[:-1] + ["other-name"]) == 0  # an existing identity is kept, whatever the name
    assert _snapshot(state, ca) == before
    # Negative control: a piece that is missing (an interrupted init) is created again, and only it.
    (state / identity.TLS_CERT).unlink()
    assert cli.main(argv) == 0
    after = _snapshot(state, ca)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {state / identity.TLS_CERT}
    reissued = x509.load_pem_x509_certificate((state / identity.TLS_CERT).read_bytes())
    key = serialization.load_pem_private_key((state / identity.TLS_KEY).read_bytes(), None)
    assert reissued.public_key() == key.public_key()  # the existing key was certified, not replaced


def test_init_host_defaults_to_this_hosts_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity.socket, "gethostname", lambda: "box-7.example")
    identity.init_host(tmp_path / "s", tmp_path / "ca")
    tls = x509.load_pem_x509_certificate((tmp_path / "s" / identity.TLS_CERT).read_bytes())
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["box-7.example", "localhost"]


def test_init_host_with_an_ip_address_name_puts_it_in_the_san(tmp_path: Path) -> None:
    identity.init_host(tmp_path / "s", tmp_path / "ca", common_name="10.0.0.5")
    tls = x509.load_pem_x509_certificate((tmp_path / "s" / identity.TLS_CERT).read_bytes())
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]


@pytest.mark.parametrize("name", ["", "bad name", "x" * 61, "a..b", "trail-", "ünï"])
def test_keys_init_rejects_bad_host_names_before_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    argv = ["keys", "init", "--state-dir", str(tmp_path / "s"), "--ca", str(tmp_path / "ca"), "--name", name]
    assert cli.main(argv) == 1
    assert "host name must be" in capsys.readouterr().err
    assert not (tmp_path / "ca").exists() and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError):
        identity.init_host(tmp_path / "s", tmp_path / "ca", common_name=name)
    # Negative control: a good name in the same places works.
    identity.init_host(tmp_path / "s", tmp_path / "ca", common_name="x" * 60)


def test_init_never_overwrites_or_mixes_inconsistent_files(tmp_path: Path) -> None:
    ca, other_ca = tmp_path / "ca", tmp_path / "other-ca"
    identity.init_host(tmp_path / "a", ca, common_name="a")
    # A certificate whose key is gone: refuse (re-keying under it would be a silent identity change).
    (tmp_path / "a" / identity.PDH_KEY).unlink()
    with pytest.raises(CertificateError, match="pdh.key is missing"):
        identity.init_host(tmp_path / "a", ca, common_name="a")
    assert not (tmp_path / "a" / identity.PDH_KEY).exists()
    # Host certificates issued by another owner CA: refuse instead of keeping a mixed identity.
    identity.init_host(tmp_path / "b", ca, common_name="b")
    before = _snapshot(tmp_path / "b")
    with pytest.raises(CertificateError, match="not issued by the owner CA"):
        identity.init_host(tmp_path / "b", other_ca, common_name="b")
    assert _snapshot(tmp_path / "b") == before
    # The trust-anchor copy must contain the owner CA.
    identity.init_host(tmp_path / "c", ca, common_name="c")
    (tmp_path / "c" / identity.TRUST_DIR_CA_COPY).write_bytes((other_ca / identity.CA_CERT).read_bytes())
    with pytest.raises(CertificateError, match="does not contain the owner CA"):
        identity.init_host(tmp_path / "c", ca, common_name="c")
    # A CA certificate without its key.
    (other_ca / identity.CA_KEY).unlink()
    with pytest.raises(CertificateError, match="ca.key is missing"):
        identity.ensure_ca(other_ca)
    # Negative control: the consistent directories load fine.
    identity.init_host(tmp_path / "b", ca, common_name="b")


def test_load_pdh_checks_key_curve_and_match(tmp_path: Path) -> None:
    for name in ("hostA", "hostB"):
        identity.init_host(tmp_path / name, tmp_path / "ca", common_name=name)
    host_a, host_b = tmp_path / "hostA", tmp_path / "hostB"
    pdh_pem_a = (host_a / identity.PDH_CERT).read_bytes()
    key, cert = identity.load_pdh(host_a)
    assert cert.public_key() == key.public_key()
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(CertificateError, match="cannot read"):
        identity.load_pdh(state)
    (state / identity.PDH_CERT).write_bytes(pdh_pem_a)
    (state / identity.PDH_KEY).write_bytes((host_b / identity.PDH_KEY).read_bytes())
    with pytest.raises(CertificateError, match="does not certify the key"):
        identity.load_pdh(state)
    (state / identity.PDH_KEY).write_bytes((host_a / identity.TLS_KEY).read_bytes())
    with pytest.raises(CertificateError, match="expected curve secp384r1, got secp256r1"):
        identity.load_pdh(state)
    (state / identity.PDH_KEY).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CertificateError, match="expected an unencrypted PEM private key"):
        identity.load_pdh(state)
    (state / identity.PDH_KEY).write_bytes((host_a / identity.PDH_KEY).read_bytes())
    (state / identity.PDH_CERT).write_bytes(b"junk")
    with pytest.raises(CertificateError, match="expected one"):
        identity.load_pdh(state)
    # A TLS certificate in place of the PDH one (matching key, wrong profile) is refused too.
    (state / identity.PDH_CERT).write_bytes((host_a / identity.TLS_CERT).read_bytes())
    (state / identity.PDH_KEY).write_bytes((host_a / identity.TLS_KEY).read_bytes())
    with pytest.raises(CertificateError, match="secp384r1"):
        identity.load_pdh(state)
    # Negative control: the matching pair, copied, loads.
    (state / identity.PDH_CERT).write_bytes(pdh_pem_a)
    (state / identity.PDH_KEY).write_bytes((host_a / identity.PDH_KEY).read_bytes())
    assert identity.load_pdh(state)[1] == cert


def test_verification_names_are_re_exported() -> None:
    # Callers that imported these from migd.platform.identity before the split keep working.
    for name in (
        "MAX_PDH_CERT_PEM", "MAX_PEM_FILE", "PDH_CURVE", "PDH_MARKER_OID", "certificate_pem",
        "ecdh_shared_secret", "load_trust_anchors", "tls_client_context", "tls_server_context",
        "verify_pdh_certificate",
    ):  # fmt: skip
        assert getattr(identity, name) is getattr(pki_verify, name)
        assert name in identity.__all__
