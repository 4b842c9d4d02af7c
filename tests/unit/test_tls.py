"""TLS helpers without a network: ClientHello peeking, SAN matching, subjects, reasons, reload."""

from __future__ import annotations

import shutil
import ssl

import pytest

from mongoproxy import config as config_mod
from mongoproxy.errors import ConfigError, StartupError
from mongoproxy.tls import TlsManager, classify
from mongoproxy.tlsfiles import CertInfo, cert_info, format_subject
from mongoproxy.tlslisten import client_hello_sni, looks_like_tls
from tests.support.tlscerts import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight of a real ssl client, as the proxy would peek at it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_client_hello_sni_and_detection():
    hello = client_hello("db.example.com")
    assert looks_like_tls(hello) and looks_like_tls(hello[:1])
    assert client_hello_sni(hello) == "db.example.com"
    assert client_hello_sni(client_hello(None)) is None
    assert client_hello_sni(hello[:40]) is None  # incomplete: no name, no exception


def test_mongodb_messages_are_not_mistaken_for_tls():
    # A message of 0x116 bytes starts with 0x16 but its second byte is not 3.
    assert not looks_like_tls((0x116).to_bytes(4, "little") + b"\x00" * 12)
    assert not looks_like_tls(b"")


def test_san_matching():
    info = CertInfo(("db.example.com", "*.shard.example.com"), ("10.0.0.1",), "CN=db", 0.0)
    assert info.matches("DB.example.com.")
    assert info.matches("a.shard.example.com")
    assert not info.matches("a.b.shard.example.com")  # a wildcard covers one label
    assert not info.matches("shard.example.com")
    assert info.matches("10.0.0.1") and not info.matches("10.0.0.2")


def test_cert_info_reads_sans_subject_and_expiry(pki, tmp_path):
    import time

    info = cert_info(pki.server_cert)
    assert info.dns_names == ("localhost",) and info.ip_addresses == ("127.0.0.1", "::1")
    assert info.subject.startswith("CN=localhost,") and info.not_after > time.time()
    assert info.matches("localhost") and info.matches("::1") and not info.matches("other.test")
    assert cert_info(pki.expired_cert).not_after < time.time()
    chain = tmp_path / "chain.pem"  # leaf first, then its CA: the leaf is the one described
    chain.write_text(open(pki.other_cert).read() + open(pki.ca).read())
    assert cert_info(str(chain)).dns_names == ("other.test",)
    chain.write_text("not a certificate\n")
    with pytest.raises(ValueError):
        cert_info(str(chain))


def test_subject_is_rfc4514():
    subject = ((("organizationName", "acme, inc"),), (("commonName", "app"),))
    assert format_subject(subject) == "CN=app,O=acme\\, inc"


def test_reasons():
    assert classify(TimeoutError())[0] == "timeout"
    err = ssl.SSLCertVerificationError("certificate verify failed")
    err.verify_code, err.verify_message = 10, "certificate has expired"
    assert classify(err)[0] == "certificate_expired"
    err.verify_code, err.verify_message = 62, "Hostname mismatch"
    assert classify(err)[0] == "sni_mismatch"
    assert classify(ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"))[0] == "unknown_ca"
    assert classify(ssl.SSLError(1, "[SSL: UNSUPPORTED_PROTOCOL] unsupported protocol"))[0] == "version"
    assert classify(ConnectionResetError())[0] == "eof"


def manager(**flags) -> TlsManager:
    return TlsManager(config_mod.build(flags, env={}))


def test_counters_exist_at_zero_and_reload_keeps_the_old_certificate(pki, tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "c.key")
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    m = manager(tls_cert=[cert], tls_key=[key])
    r = m.registry
    assert r.get_sample_value("mongoproxy_tls_handshake_errors_total", {"side": "client", "reason": "timeout"}) == 0
    assert r.get_sample_value("mongoproxy_tls_passthrough_connections_total", {"reason": "no_certificate"}) == 0
    assert m.listen_mode == "require" and m.server_certs[0].info.matches("localhost")
    old = m.server_certs
    assert m.check_files() is False  # nothing changed
    shutil.copy(pki.other_key, key)  # does not match the certificate
    assert m.check_files() is True
    assert m.server_certs is old
    assert r.get_sample_value("mongoproxy_tls_reload_errors_total") == 1
    assert m.check_files() is False  # the same broken files are not retried on every tick
    shutil.copy(pki.other_cert, cert)
    m.reload()
    assert m.server_certs is not old and m.server_certs[0].info.matches("other.test")
    assert r.get_sample_value("mongoproxy_tls_reload_errors_total") == 1


def test_server_cert_for_sni(pki):
    m = manager(tls_cert=[pki.server_cert, pki.other_cert], tls_key=[pki.server_key, pki.other_key])
    assert m.server_cert_for("other.test") == (m.server_certs[1], True)
    assert m.server_cert_for(None) == (m.server_certs[0], True)
    assert m.server_cert_for("nobody.test") == (m.server_certs[0], False)


def test_upstream_args(pki):
    assert manager().upstream_args("db") == {}
    m = manager(upstream_tls="true", upstream_tls_ca=pki.ca)
    args = m.upstream_args("db.internal", "db.example.com")
    assert args["server_hostname"] == "db.example.com" and args["ssl"].verify_mode == ssl.CERT_REQUIRED
    assert manager(upstream_tls="true", upstream_tls_server_name="x").upstream_args("db")["server_hostname"] == "x"
    insecure = manager(upstream_tls="true", upstream_tls_insecure="true")
    assert insecure.upstream_args("db")["ssl"].verify_mode == ssl.CERT_NONE and insecure.info_label == "insecure"


def test_bad_combinations(pki):
    with pytest.raises(ConfigError, match="in pairs"):
        manager(tls_cert=[pki.server_cert])
    with pytest.raises(ConfigError, match="needs a listener certificate"):
        manager(tls_client_ca=pki.ca)
    with pytest.raises(ConfigError, match="together"):
        manager(upstream_tls="true", upstream_tls_cert=pki.client_cert)
    with pytest.raises(StartupError, match="does not match"):
        manager(upstream_tls="true", upstream_tls_cert=pki.client_cert, upstream_tls_key=pki.server_key)
