"""TLS both ways against a real TLS SecantusDB: termination, origination, mTLS, SNI, rotation, failures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import threading
import time

import pymongo
import pytest
from pymongo.errors import DuplicateKeyError

from tests.support.inprocess import ProxyThread
from tests.support.proxy import run_proxy_process
from tests.support.tlscerts import TlsSecantus, make_pki
from tests.support.wire import decode_message, encode_op_msg, recv_message

LOOPS = ("asyncio", "uvloop")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def tls_db(pki):
    with TlsSecantus(pki.server_cert, pki.server_key, pki.ca) as db:
        yield db


def client_ctx(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def tls_ping(port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> tuple[dict, bytes]:
    """One TLS connection: ping, and the DER certificate the proxy presented."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
            s.sendall(encode_op_msg({"ping": 1, "$db": "admin"}))
            reply = recv_message(s)
            if reply is None:
                raise ConnectionError("closed without a reply")
            return decode_message(reply).msg.body, s.getpeercert(binary_form=True)


def workload(client: pymongo.MongoClient, db: str) -> list:
    """CRUD, getMore, aggregate and a duplicate-key error; the results, comparable across runs."""
    coll = client[db].items
    out: list = [coll.insert_one({"_id": 0, "v": "zero"}).inserted_id]
    out.append(coll.insert_many([{"_id": i, "v": i % 3} for i in range(1, 26)]).inserted_ids)
    out.append([d["_id"] for d in coll.find({}, sort=[("_id", 1)], batch_size=10)])  # find + 2 getMore
    out.append(
        list(
            coll.aggregate(
                [
                    {"$match": {"v": {"$in": [0, 1, 2]}}},
                    {"$group": {"_id": "$v", "n": {"$sum": 1}}},
                    {"$sort": {"_id": 1}},
                ]
            )
        )
    )
    out.append(coll.update_one({"_id": 1}, {"$set": {"v": "one"}}).modified_count)
    out.append(coll.delete_one({"_id": 2}).deleted_count)
    try:
        coll.insert_one({"_id": 0})
        out.append("no error")
    except DuplicateKeyError as exc:
        out.append(exc.code)
    return out


EXPECTED_OPS = {"insert": 3, "find": 1, "getMore": 2, "aggregate": 1, "update": 1, "delete": 1}


def test_real_tls_server_direct_and_through_terminating_originating_proxy(pki, tls_db):
    with tls_db.client() as c:
        direct = workload(c, "tls_direct")
    args = [
        *("--tls-cert", pki.server_cert, "--tls-key", pki.server_key),
        *("--upstream-tls", "--upstream-tls-ca", pki.ca, "--log-commands", "--log-format", "json"),
    ]
    with run_proxy_process(args, upstream=("localhost", tls_db.port)) as p:
        uri = f"mongodb://localhost:{p.port}/?directConnection=true&tls=true&tlsCAFile={pki.ca}"
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as c:
            proxied = workload(c, "tls_proxied")
        time.sleep(0.2)  # the tap runs right after forwarding: let the last events land before scraping
        counts = {
            op: p.metric("mongoproxy_response_latency_seconds_count", op=op, db="tls_proxied") for op in EXPECTED_OPS
        }
        dup = p.metric("mongoproxy_command_errors_total", op="insert", code_name="DuplicateKey")
        handshake_errors = p.metric("mongoproxy_tls_handshake_errors_total")
        decode_errors = p.metric("mongoproxy_decode_errors_total")
        log = [json.loads(line) for line in p.stderr_text().splitlines() if line.startswith("{")]
    assert proxied == direct
    assert direct[-1] == 11000
    assert counts == EXPECTED_OPS
    assert dup == 1 and handshake_errors == 0 and decode_errors == 0
    logged = [e["op"] for e in log if e["db"] == "tls_proxied"]
    assert {op: logged.count(op) for op in EXPECTED_OPS} == EXPECTED_OPS


def test_plaintext_client_to_tls_server_with_pymongo(pki, tls_db):
    args = ["--upstream-tls", "--upstream-tls-ca", pki.ca, "--log-commands"]
    with run_proxy_process(args, upstream=("localhost", tls_db.port)) as p:
        with p.client() as c:
            res = workload(c, "tls_plain_client")
        time.sleep(0.2)
        assert p.metric("mongoproxy_response_latency_seconds_count", op="getMore", db="tls_plain_client") == 2
        assert p.metric("mongoproxy_info", upstream_tls="verify") == 1
        text = p.stderr_text()
    assert res[-1] == 11000
    assert "tls_plain_client.items insert" in text and "tls_plain_client.items getMore" in text


def test_plaintext_mongosh_to_tls_server(pki, tls_db):
    from tests.support.system import require_node_modules

    mods = require_node_modules()
    with run_proxy_process(
        ["--upstream-tls", "--upstream-tls-ca", pki.ca, "--log-commands"], upstream=("localhost", tls_db.port)
    ) as p:
        res = subprocess_run(
            [
                mods.mongosh,
                "--quiet",
                f"mongodb://127.0.0.1:{p.port}/?directConnection=true",
                "--eval",
                "db.getSiblingDB('tls_sh').c.insertOne({_id: 7}); "
                "printjson(db.getSiblingDB('tls_sh').c.findOne({_id: 7}))",
            ],
            mods.env(),
        )
        time.sleep(0.2)
        text = p.stderr_text()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "_id: 7" in res.stdout
    assert "tls_sh.c insert" in text and "tls_sh.c find" in text


def subprocess_run(cmd, env):
    import subprocess

    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_plaintext_client_refused_when_server_certificate_is_not_trusted(pki, tls_db):
    # No --upstream-tls-ca: the system store does not know the test CA, so the upstream handshake fails.
    with run_proxy_process(["--upstream-tls"], upstream=("localhost", tls_db.port)) as p:
        with p.client(serverSelectionTimeoutMS=1500) as c, pytest.raises(pymongo.errors.PyMongoError):
            c.admin.command("ping")
        assert p.metric("mongoproxy_tls_handshake_errors_total", side="upstream", reason="unknown_ca") >= 1
        assert p.metric("mongoproxy_upstream_connect_errors_total", reason="tls") >= 1


def test_insecure_upstream_is_warned_and_labelled(tls_db):
    with run_proxy_process(["--upstream-tls", "--upstream-tls-insecure"], upstream=("localhost", tls_db.port)) as p:
        with p.client() as c:
            assert c.admin.command("ping")["ok"] == 1
        assert p.metric("mongoproxy_info", upstream_tls="insecure") == 1
        assert "NOT verified" in p.stderr_text()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_mtls_required_accepted_and_refused(pki, tls_db, loop_kind):
    flags = dict(
        tls_cert=[pki.server_cert],
        tls_key=[pki.server_key],
        tls_client_ca=pki.ca,
        upstream_tls="true",
        upstream_tls_ca=pki.ca,
    )
    with ProxyThread(tls_db.port, loop_kind=loop_kind, upstream_host="localhost", **flags) as proxy:
        reg = proxy.proxy.tls.registry
        reply, _ = tls_ping(proxy.port, client_ctx(pki.ca, pki.client_cert, pki.client_key))
        assert reply["ok"] == 1
        proxy.wait_until(lambda: any(e.op == "ping" for e in proxy.sink.commands), what="ping event")
        conn = next(e.connection for e in proxy.sink.commands if e.op == "ping")
        assert conn.client_tls and conn.upstream_tls
        subject = conn.client_cert_subject  # RFC 4514: the last RDN first
        assert subject.startswith("CN=app-client,OU=") and subject.endswith(",O=acme")
        for ctx, reason in (
            (client_ctx(pki.ca), "no_certificate"),
            (client_ctx(pki.ca, pki.rogue_client_cert, pki.rogue_client_key), "unknown_ca"),
        ):
            with pytest.raises((ssl.SSLError, OSError)):
                tls_ping(proxy.port, ctx)
            proxy.wait_until(
                lambda r=reason: (
                    reg.get_sample_value("mongoproxy_tls_handshake_errors_total", {"side": "client", "reason": r}) == 1
                ),
                what=f"{reason} counted",
            )
        assert tls_ping(proxy.port, client_ctx(pki.ca, pki.client_cert, pki.client_key))[0]["ok"] == 1


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_sni_chooses_between_two_certificates(pki, tls_db, loop_kind):
    flags = dict(
        tls_cert=[pki.server_cert, pki.other_cert],
        tls_key=[pki.server_key, pki.other_key],
        upstream_tls="true",
        upstream_tls_ca=pki.ca,
    )
    with ProxyThread(tls_db.port, loop_kind=loop_kind, upstream_host="localhost", **flags) as proxy:
        ctx = client_ctx(pki.ca)
        _, der_other = tls_ping(proxy.port, ctx, "other.test")
        _, der_local = tls_ping(proxy.port, ctx, "localhost")
        ctx_any = client_ctx(pki.ca)
        ctx_any.check_hostname = False
        _, der_unknown = tls_ping(proxy.port, ctx_any, "nobody.test")  # no SAN matches: the default, the first
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_ping(proxy.port, ctx, "nobody.test")
        reg = proxy.proxy.tls.registry
        proxy.wait_until(
            lambda: (
                reg.get_sample_value(
                    "mongoproxy_tls_handshake_errors_total", {"side": "client", "reason": "sni_mismatch"}
                )
                == 1
            ),
            what="sni_mismatch counted",
        )
        names = sorted(e.connection.tls_server_name for e in proxy.sink.commands if e.op == "ping")
    assert pem_of(der_other) == open(pki.other_cert).read().split("-----END CERTIFICATE-----")[0] + END
    assert pem_of(der_local) == open(pki.server_cert).read().split("-----END CERTIFICATE-----")[0] + END
    assert der_unknown == der_local
    assert names == ["localhost", "nobody.test", "other.test"]


END = "-----END CERTIFICATE-----"


def pem_of(der: bytes) -> str:
    return ssl.DER_cert_to_PEM_cert(der).split(END)[0] + END


def test_allow_serves_tls_and_plaintext_on_one_port(pki, tls_db):
    flags = dict(
        tls_cert=[pki.server_cert],
        tls_key=[pki.server_key],
        tls_listen="allow",
        upstream_tls="true",
        upstream_tls_ca=pki.ca,
    )
    with ProxyThread(tls_db.port, upstream_host="localhost", **flags) as proxy:
        assert tls_ping(proxy.port, client_ctx(pki.ca))[0]["ok"] == 1
        with pymongo.MongoClient(
            f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true", serverSelectionTimeoutMS=5000
        ) as c:
            assert c.admin.command("ping")["ok"] == 1
        proxy.wait_until(lambda: sum(e.op == "ping" for e in proxy.sink.commands) >= 2, what="two pings")
        tls_flags = {e.connection.client_tls for e in proxy.sink.commands if e.op == "ping"}
    assert tls_flags == {True, False}


def handshake_errors(p, reason: str) -> float:
    return p.metric("mongoproxy_tls_handshake_errors_total", side="client", reason=reason)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_handshake_failures_are_counted_and_the_proxy_stays_healthy(pki, tls_db, tmp_path):
    base = ["--upstream-tls", "--upstream-tls-ca", pki.ca, "--tls-handshake-timeout", "1"]
    with run_proxy_process(
        ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key, *base], upstream=("localhost", tls_db.port)
    ) as p:
        # A client that trusts another CA refuses the proxy's certificate.
        with pytest.raises(ssl.SSLError):
            tls_ping(p.port, client_ctx(pki.rogue_ca))
        # A TLS 1.1 client (this OpenSSL allows it at security level 0).
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError):
            tls_ping(p.port, old)
        # Plaintext on a require listener.
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.sendall(encode_op_msg({"ping": 1, "$db": "admin"}))
            assert closed_by_peer(s)
        # A client that connects and says nothing.
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            assert closed_by_peer(s)  # by the proxy, after the handshake timeout
        wait_for(lambda: handshake_errors(p, "timeout") == 1, "timeout counted")
        assert handshake_errors(p, "unknown_ca") == 1
        assert handshake_errors(p, "version") == 1
        assert handshake_errors(p, "plaintext") == 1
        assert tls_ping(p.port, client_ctx(pki.ca))[0]["ok"] == 1  # still healthy
        assert p.admin_get("/healthz")[0] == 200
    # An expired certificate: a warning at start-up, it still starts, and clients refuse it.
    with run_proxy_process(
        ["--tls-cert", pki.expired_cert, "--tls-key", pki.expired_key, *base], upstream=("localhost", tls_db.port)
    ) as p:
        assert "expired on" in p.stderr_text()
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_ping(p.port, client_ctx(pki.ca))
        wait_for(lambda: handshake_errors(p, "certificate_expired") == 1, "certificate_expired counted")


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:  # closed with our request unread
        return True


def wait_for(pred, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_certificate_rotation_under_load(pki, tls_db, tmp_path):
    cert, key = str(tmp_path / "live.pem"), str(tmp_path / "live.key")
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    new_cert, new_key = pki.issue("rotated", "localhost", "127.0.0.1", common_name="rotated")
    args = [
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-reload-interval",
        "0.2",
        "--upstream-tls",
        "--upstream-tls-ca",
        pki.ca,
    ]
    with run_proxy_process(args, upstream=("localhost", tls_db.port)) as p:
        before = tls_ping(p.port, client_ctx(pki.ca))[1]
        stop, done, errors = threading.Event(), [0], []
        uri = f"mongodb://localhost:{p.port}/?directConnection=true&tls=true&tlsCAFile={pki.ca}"

        def load() -> None:
            with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, maxPoolSize=2) as c:
                coll = c.tls_rotate.items
                while not stop.is_set() and done[0] < 100_000:
                    try:
                        coll.insert_one({"n": done[0]})
                        assert coll.find_one({"n": done[0]}) is not None
                        done[0] += 1
                    except Exception as exc:  # noqa: BLE001 - every failure is reported
                        errors.append(repr(exc))

        t = threading.Thread(target=load)
        t.start()
        wait_for(lambda: done[0] >= 20, "load running")
        for src, dst in ((new_key, key), (new_cert, cert)):  # replaced by rename, as cert-manager and kubelet do
            shutil.copy(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
        wait_for(lambda: tls_ping(p.port, client_ctx(pki.ca))[1] != before, "new certificate served")
        after = tls_ping(p.port, client_ctx(pki.ca))[1]
        n = done[0]
        wait_for(lambda: done[0] >= n + 20, "load still running after the rotation")
        stop.set()
        t.join(30)
        assert p.metric("mongoproxy_tls_reload_errors_total") == 0
    assert errors == []
    assert pem_of(after) == pem_of(ssl.PEM_cert_to_DER_cert(open(new_cert).read().split(END)[0] + END))


def test_sighup_reloads_the_certificate(pki, tls_db, tmp_path):
    import signal

    cert, key = str(tmp_path / "live.pem"), str(tmp_path / "live.key")
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    new_cert, new_key = pki.issue("hup", "localhost", "127.0.0.1", common_name="hup")
    args = [
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-reload-interval",
        "0",
        "--upstream-tls",
        "--upstream-tls-ca",
        pki.ca,
    ]
    with run_proxy_process(args, upstream=("localhost", tls_db.port)) as p:
        before = tls_ping(p.port, client_ctx(pki.ca))[1]
        shutil.copy(new_key, key)
        shutil.copy(new_cert, cert)
        assert tls_ping(p.port, client_ctx(pki.ca))[1] == before  # no timer: nothing changes by itself
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: "TLS certificates reloaded" in p.stderr_text(), "reload logged")
        assert tls_ping(p.port, client_ctx(pki.ca))[1] != before


def test_reload_keeps_the_old_certificate_when_the_new_file_is_bad(pki, tls_db, tmp_path):
    cert, key = str(tmp_path / "live.pem"), str(tmp_path / "live.key")
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    args = [
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-reload-interval",
        "0.2",
        "--upstream-tls",
        "--upstream-tls-ca",
        pki.ca,
    ]
    with run_proxy_process(args, upstream=("localhost", tls_db.port)) as p:
        shutil.copy(pki.other_key, key)  # a key that does not match the certificate
        wait_for(lambda: p.metric("mongoproxy_tls_reload_errors_total") == 1, "reload error counted")
        assert tls_ping(p.port, client_ctx(pki.ca))[0]["ok"] == 1
        assert "keeping the certificates in use" in p.stderr_text()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_passthrough_on_a_plaintext_listener(pki, tls_db, loop_kind):
    # No certificate: a TLS client's bytes go to the (TLS) server untouched and unobserved.
    with ProxyThread(tls_db.port, loop_kind=loop_kind, upstream_host="localhost") as proxy:
        uri = f"mongodb://localhost:{proxy.port}/?directConnection=true&tls=true&tlsCAFile={pki.ca}"
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as c:
            assert c.tls_pt.items.insert_one({"_id": loop_kind}).inserted_id == loop_kind
            assert c.tls_pt.items.find_one({"_id": loop_kind}) == {"_id": loop_kind}
        reg = proxy.proxy.tls.registry
        n = reg.get_sample_value("mongoproxy_tls_passthrough_connections_total", {"reason": "no_certificate"})
        assert n >= 2  # pymongo's monitor and its pool connection
        assert proxy.sink.decode_errors == [] and proxy.sink.commands == []


def test_passthrough_when_tls_listen_is_off(pki, tls_db):
    flags = dict(tls_cert=[pki.server_cert], tls_key=[pki.server_key], tls_listen="off")
    with ProxyThread(tls_db.port, upstream_host="localhost", **flags) as proxy:
        reply, der = tls_ping(proxy.port, client_ctx(pki.ca))  # the server's own TLS, through the proxy
        assert reply["ok"] == 1
        reg = proxy.proxy.tls.registry
        proxy.wait_until(
            lambda: (
                reg.get_sample_value("mongoproxy_tls_passthrough_connections_total", {"reason": "tls_listen_off"}) == 1
            ),
            what="passthrough counted",
        )
        assert proxy.sink.decode_errors == [] and proxy.sink.commands == []


SIZES = (1, 100, 16 * 1024 + 1, 1024 * 1024, 20 * 1000 * 1000)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_byte_exact_through_termination_and_origination(pki, loop_kind):
    """The SHA-256 of the plaintext streams is equal at both ends, each way, for 1 B to 20 MB messages."""
    import asyncio
    import hashlib

    from tests.support.inprocess import running_proxy
    from tests.support.loops import run_async

    async def main():
        got = hashlib.sha256()

        async def echo(reader, writer):
            while data := await reader.read(1 << 16):
                got.update(data)
                writer.write(data)
                await writer.drain()
            writer.close()

        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        flags = dict(tls_cert=[pki.server_cert], tls_key=[pki.server_key], upstream_tls="true", upstream_tls_ca=pki.ca)
        async with running_proxy(port, upstream_host="localhost", **flags) as proxy:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.ports[0], ssl=client_ctx(pki.ca), server_hostname="localhost"
            )
            sent, back = hashlib.sha256(), hashlib.sha256()
            for size in SIZES:
                payload = os.urandom(size)
                sent.update(payload)
                writer.write(payload)
                back.update(await reader.readexactly(size))
            writer.close()
            conn = next(iter(proxy.connections)).conn
            assert conn.client_tls and conn.upstream_tls
            assert conn.bytes_from_client == conn.bytes_from_server == sum(SIZES)
        server.close()
        return sent.hexdigest(), got.hexdigest(), back.hexdigest()

    sent, at_server, at_client = run_async(main, loop_kind, timeout=120)
    assert sent == at_server == at_client


def test_recording_on_a_tls_connection_is_decrypted_and_marked(pki, tls_db, tmp_path):
    dpkt = pytest.importorskip("dpkt")
    path = tmp_path / "rec"
    args = [
        "--tls-cert",
        pki.server_cert,
        "--tls-key",
        pki.server_key,
        "--upstream-tls",
        "--upstream-tls-ca",
        pki.ca,
        "--record",
        str(path),
    ]
    with run_proxy_process(args, upstream=("localhost", tls_db.port)) as p:
        reply, _ = tls_ping(p.port, client_ctx(pki.ca))
        assert reply["ok"] == 1
    (file,) = path.glob("*.pcapng")
    raw = file.read_bytes()
    assert b"TLS on the client and server side, recorded decrypted" in raw
    assert b"ping" in raw and b"$db" in raw  # the decrypted OP_MSG, not TLS records
    with open(file, "rb") as f:
        assert sum(1 for _ in dpkt.pcapng.Reader(f)) > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"],
            "--tls-cert /nonexistent.pem: no such file",
        ),
        (["--tls-cert", "CERT"], "give --tls-cert and --tls-key in pairs"),
        (["--tls-cert", "CERT", "--tls-key", "OTHERKEY"], "does not match --tls-cert"),
        (["--tls-cert", "KEY", "--tls-key", "KEY"], "cannot load --tls-cert"),
        (["--tls-listen", "require"], "--tls-listen require needs a certificate"),
        (["--upstream-tls-ca", "CA"], "has no effect without --upstream-tls"),
        (
            ["--upstream-tls", "--upstream-tls-ca", "/nonexistent-ca.pem"],
            "--upstream-tls-ca /nonexistent-ca.pem: no such",
        ),
        (["--tls-min-version", "1.1"], "--tls-min-version '1.1' is not valid"),
    ],
)
def test_startup_errors_are_one_line(pki, args, needle):
    from tests.support.proxy import run_proxy_cli

    files = {"CERT": pki.server_cert, "KEY": pki.server_key, "OTHERKEY": pki.other_key, "CA": pki.ca}
    args = [files.get(a, a) for a in args]
    res = run_proxy_cli(["run", "--proxy", "0:127.0.0.1:1", "--admin-port", "0", *args], timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
