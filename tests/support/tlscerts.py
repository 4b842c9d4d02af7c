"""Certificates made in the test (trustme) and a SecantusDB that serves TLS."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

from .secantus import SecantusServer


@dataclass
class Pki:
    """PEM files in one directory: a CA, certificates it issued, and a second CA nobody trusts."""

    dir: str
    ca: str  # the CA everyone trusts
    server_cert: str  # localhost, 127.0.0.1, ::1
    server_key: str
    other_cert: str  # other.test (a second name, for SNI)
    other_key: str
    client_cert: str  # CN=app-client, O=acme
    client_key: str
    expired_cert: str  # localhost, 127.0.0.1, expired yesterday
    expired_key: str
    rogue_ca: str  # another CA
    rogue_client_cert: str  # a client certificate from rogue_ca
    rogue_client_key: str

    def issue(self, name: str, *identities: str, **kw) -> tuple[str, str]:
        """Another certificate from the trusted CA, written as NAME.pem / NAME.key; (cert, key)."""
        return _write(self.dir, name, self._ca.issue_cert(*identities, **kw))

    _ca: object = None


def _write(d: str, name: str, leaf) -> tuple[str, str]:
    cert, key = os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.key")
    leaf.cert_chain_pems[0].write_to_path(cert)
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(cert, append=True)
    leaf.private_key_pem.write_to_path(key)
    return cert, key


def make_pki(d: str) -> Pki:
    """Write a fresh set of certificates into `d`."""
    import trustme

    ca, rogue = trustme.CA(), trustme.CA()
    ca_path, rogue_path = os.path.join(d, "ca.pem"), os.path.join(d, "rogue-ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    rogue.cert_pem.write_to_path(rogue_path)
    server = _write(d, "server", ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost"))
    other = _write(d, "other", ca.issue_cert("other.test", common_name="other.test"))
    client = _write(d, "client", ca.issue_cert("app-client", common_name="app-client", organization_name="acme"))
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = _write(
        d,
        "expired",
        ca.issue_cert("localhost", "127.0.0.1", not_before=past - datetime.timedelta(days=30), not_after=past),
    )
    rogue_client = _write(d, "rogue-client", rogue.issue_cert("app-client", common_name="app-client"))
    pki = Pki(d, ca_path, *server, *other, *client, *expired, rogue_path, *rogue_client)
    pki._ca = ca
    return pki


class TlsSecantus(SecantusServer):
    """SecantusDB serving TLS with the given certificate, key and (optionally) client CA."""

    def __init__(self, cert: str, key: str, ca: str, client_ca: str | None = None, **kw) -> None:
        args = ["--tls-cert-file", cert, "--tls-key-file", key]
        if client_ca:
            args += ["--tls-ca-file", client_ca]
        super().__init__(extra_args=tuple(args) + tuple(kw.pop("extra_args", ())), **kw)
        self.ca = ca

    @property
    def uri(self) -> str:
        """mongodb:// URI with tls=true and the CA file."""
        return f"mongodb://{self.host}:{self.port}/?directConnection=true&tls=true&tlsCAFile={self.ca}"

    def client(self, **kwargs):
        """A pymongo MongoClient over TLS, directly to the server."""
        import pymongo

        kwargs.setdefault("serverSelectionTimeoutMS", 5000)
        return pymongo.MongoClient(self.uri, **kwargs)

    def _wait_ready(self, timeout: float) -> None:
        import pymongo
        from pymongo.errors import PyMongoError

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SecantusDB exited with {self.proc.returncode}; log:\n{self.log_text()}")
            try:
                with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=300, connectTimeoutMS=300) as c:
                    c.admin.command("ping")
                return
            except PyMongoError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"TLS SecantusDB did not answer ping; log:\n{self.log_text()}") from None
                time.sleep(0.05)
