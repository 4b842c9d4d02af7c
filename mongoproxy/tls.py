"""TLS both ways: the listeners' certificates (termination), the upstream context (origination), passthrough.

The TlsManager owns every SSL context, re-reads certificate files when their
mtime changes (on its own timer) or when reload() is called (SIGHUP), and
counts handshake errors, reload errors and passthrough connections. A failed
(re)load keeps the contexts in use; new connections take whatever contexts are
current when they start, open ones keep theirs. The accepting side (peeking at
the ClientHello, the handshake) is in mongoproxy.tlslisten.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass
from typing import Any

from mongoproxy.config import Option, non_negative_float, parse_bool
from mongoproxy.errors import ConfigError, StartupError
from mongoproxy.limits import RateLimitedLog
from mongoproxy.tlsfiles import CertInfo, cert_info, expiry_warning, format_subject, load_ca, load_chain

log = logging.getLogger("mongoproxy")

LISTEN_MODES = ("off", "allow", "require")
SIDES = ("client", "upstream")
HANDSHAKE_REASONS = (
    "unknown_ca",
    "bad_certificate",
    "certificate_expired",
    "no_certificate",
    "version",
    "sni_mismatch",
    "timeout",
    "plaintext",
    "eof",
    "other",
)
PASSTHROUGH_REASONS = ("no_certificate", "tls_listen_off")
LOG_EVERY_S = 60.0  # passthrough and handshake-error warnings: at most one line per minute each
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _choice(flag: str, choices: tuple[str, ...]):
    def parse(value: str) -> str:
        v = str(value).strip().lower()
        if v not in choices:
            raise ConfigError(f"{flag} {value!r} is not valid: use one of {', '.join(choices)}")
        return v

    return parse


def _path(value: str) -> str:
    return os.path.expanduser(str(value).strip())


OPTIONS: list[Option] = [
    Option(
        "tls_cert",
        ("--tls-cert",),
        "PEM certificate (chain) the listeners present; repeat with --tls-key in pairs, "
        "chosen by SNI against each certificate's SANs, the first is the default",
        _path,
        (),
        multiple=True,
        metavar="FILE",
        group="tls",
    ),
    Option(
        "tls_key",
        ("--tls-key",),
        "PEM private key of the --tls-cert at the same position",
        _path,
        (),
        multiple=True,
        metavar="FILE",
        group="tls",
    ),
    Option(
        "tls_client_ca",
        ("--tls-client-ca",),
        "require client certificates signed by this CA (mTLS); the subject becomes client_cert_subject",
        _path,
        metavar="FILE",
        group="tls",
    ),
    Option(
        "tls_listen",
        ("--tls-listen",),
        "off, allow (TLS and plaintext on one port, told apart by the first bytes) or require "
        "(default: require when a certificate is given, otherwise off)",
        _choice("--tls-listen", LISTEN_MODES),
        metavar="MODE",
        group="tls",
    ),
    Option(
        "tls_min_version",
        ("--tls-min-version",),
        "lowest TLS version accepted from clients and spoken to servers: 1.2 or 1.3",
        _choice("--tls-min-version", tuple(_VERSIONS)),
        "1.2",
        metavar="VERSION",
        group="tls",
    ),
    Option(
        "tls_handshake_timeout",
        ("--tls-handshake-timeout",),
        "seconds a TLS handshake may take (either side) before the connection is closed",
        non_negative_float("--tls-handshake-timeout"),
        10.0,
        metavar="SECONDS",
        group="tls",
    ),
    Option(
        "tls_reload_interval",
        ("--tls-reload-interval",),
        "seconds between checks of the certificate files' mtimes; 0 turns the timer off (SIGHUP still reloads)",
        non_negative_float("--tls-reload-interval"),
        5.0,
        metavar="SECONDS",
        group="tls",
    ),
    Option(
        "upstream_tls",
        ("--upstream-tls",),
        "connect to the server over TLS",
        parse_bool,
        False,
        switch=True,
        group="tls",
    ),
    Option(
        "upstream_tls_ca",
        ("--upstream-tls-ca",),
        "CA file trusted for the server's certificate (default: the system store)",
        _path,
        metavar="FILE",
        group="tls",
    ),
    Option(
        "upstream_tls_cert",
        ("--upstream-tls-cert",),
        "client certificate presented to the server (MONGODB-X509)",
        _path,
        metavar="FILE",
        group="tls",
    ),
    Option(
        "upstream_tls_key", ("--upstream-tls-key",), "key of --upstream-tls-cert", _path, metavar="FILE", group="tls"
    ),
    Option(
        "upstream_tls_server_name",
        ("--upstream-tls-server-name",),
        "name sent as SNI and verified in the server's certificate (default: the upstream host, or in "
        "transparent mode the client's SNI or the original destination address)",
        str,
        metavar="NAME",
        group="tls",
    ),
    Option(
        "upstream_tls_insecure",
        ("--upstream-tls-insecure",),
        "do not verify the server's certificate (warned at start-up, shown in mongoproxy_info)",
        parse_bool,
        False,
        switch=True,
        group="tls",
    ),
]


# ---- certificates ----


@dataclass(frozen=True)
class ServerCert:
    """One --tls-cert/--tls-key pair and the server context that presents it."""

    cert: str
    key: str
    info: CertInfo
    context: ssl.SSLContext


# ---- the manager ----


class TlsManager:
    """Every TLS setting of the process, its contexts, reload and counters; a `proxy.components` entry."""

    name = "tls"

    def __init__(self, config: Any, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter

        g = config.get
        self.certs_files: tuple[str, ...] = tuple(g("tls_cert") or ())
        self.key_files: tuple[str, ...] = tuple(g("tls_key") or ())
        self.client_ca: str | None = g("tls_client_ca")
        self.min_version = _VERSIONS[g("tls_min_version") or "1.2"]
        self.handshake_timeout = float(g("tls_handshake_timeout") or 10.0) or None
        self.reload_interval = float(g("tls_reload_interval") if g("tls_reload_interval") is not None else 5.0)
        self.upstream = bool(g("upstream_tls"))
        self.upstream_ca: str | None = g("upstream_tls_ca")
        self.upstream_cert: str | None = g("upstream_tls_cert")
        self.upstream_key: str | None = g("upstream_tls_key")
        self.upstream_server_name: str | None = g("upstream_tls_server_name")
        self.insecure = bool(g("upstream_tls_insecure"))
        self._check_combinations(g("tls_listen"))
        self.listen_mode: str = g("tls_listen") or ("require" if self.certs_files else "off")

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._handshake_errors = Counter(
            "mongoproxy_tls_handshake_errors",
            "TLS handshakes that failed, by side (client: to the proxy; upstream: to the server) and reason.",
            ["side", "reason"],
            registry=r,
        )
        self._reload_errors = Counter(
            "mongoproxy_tls_reload_errors",
            "Certificate reloads that failed (the certificates in use were kept).",
            registry=r,
        )
        self._passthrough = Counter(
            "mongoproxy_tls_passthrough_connections",
            "TLS connections forwarded untouched and unobserved because the proxy could not open them.",
            ["reason"],
            registry=r,
        )
        # Every known reason exists from the first scrape, at 0, so rate() and alerts see it.
        for side in SIDES:
            for reason in HANDSHAKE_REASONS:
                self._handshake_errors.labels(side, reason)
        for reason in PASSTHROUGH_REASONS:
            self._passthrough.labels(reason)
        self._log = RateLimitedLog(log, LOG_EVERY_S)
        self._timer: asyncio.Task | None = None

        self.server_certs: list[ServerCert] = self._load_server()
        self.upstream_context: ssl.SSLContext | None = self._load_upstream()
        self._mtimes: dict[str, int] = self._stat_files()
        if self.insecure:
            log.warning("--upstream-tls-insecure: the server's certificate is NOT verified (anyone may impersonate it)")

    def _check_combinations(self, listen: str | None) -> None:
        if len(self.certs_files) != len(self.key_files):
            raise ConfigError(
                f"give --tls-cert and --tls-key in pairs: {len(self.certs_files)} certificate(s) "
                f"and {len(self.key_files)} key(s)"
            )
        if listen in ("allow", "require") and not self.certs_files:
            raise ConfigError(f"--tls-listen {listen} needs a certificate: give --tls-cert FILE --tls-key FILE")
        if self.client_ca and not self.certs_files:
            raise ConfigError("--tls-client-ca needs a listener certificate: give --tls-cert FILE --tls-key FILE")
        if bool(self.upstream_cert) != bool(self.upstream_key):
            raise ConfigError("give --upstream-tls-cert and --upstream-tls-key together")
        given = [
            flag
            for flag, v in (
                ("--upstream-tls-ca", self.upstream_ca),
                ("--upstream-tls-cert", self.upstream_cert),
                ("--upstream-tls-server-name", self.upstream_server_name),
                ("--upstream-tls-insecure", self.insecure),
            )
            if v
        ]
        if given and not self.upstream:
            raise ConfigError(f"{given[0]} has no effect without --upstream-tls: add --upstream-tls")

    # ---- loading ----

    def _load_server(self) -> list[ServerCert]:
        out = []
        for i, (cert, key) in enumerate(zip(self.certs_files, self.key_files)):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = self.min_version
            load_chain(ctx, cert, key, "--tls-cert", "--tls-key")
            if self.client_ca:
                load_ca(ctx, self.client_ca, "--tls-client-ca")
                ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                info = cert_info(cert)
            except (ssl.SSLError, ValueError, KeyError) as exc:
                raise StartupError(f"--tls-cert {cert} (pair {i + 1}) cannot be decoded: {exc}") from None
            expiry_warning(cert, "--tls-cert", info)
            out.append(ServerCert(cert, key, info, ctx))
        return out

    def _load_upstream(self) -> ssl.SSLContext | None:
        if not self.upstream:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = self.min_version
        if self.upstream_ca:
            load_ca(ctx, self.upstream_ca, "--upstream-tls-ca")
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.upstream_cert and self.upstream_key:
            load_chain(ctx, self.upstream_cert, self.upstream_key, "--upstream-tls-cert", "--upstream-tls-key")
            try:
                expiry_warning(self.upstream_cert, "--upstream-tls-cert", cert_info(self.upstream_cert))
            except (ssl.SSLError, ValueError, KeyError):
                pass  # load_cert_chain accepted it; the expiry check is only a courtesy
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _files(self) -> list[str]:
        files = [*self.certs_files, *self.key_files, self.client_ca]
        if self.upstream:
            files += [self.upstream_ca, self.upstream_cert, self.upstream_key]
        return [f for f in files if f]

    def _stat_files(self) -> dict[str, int]:
        out = {}
        for f in self._files():
            try:
                out[f] = os.stat(f).st_mtime_ns
            except OSError:
                out[f] = -1
        return out

    @property
    def terminating(self) -> bool:
        """True when the listeners open TLS (allow or require)."""
        return self.listen_mode != "off"

    @property
    def info_label(self) -> str:
        """The `upstream_tls` label of mongoproxy_info: off, verify or insecure."""
        return "off" if not self.upstream else ("insecure" if self.insecure else "verify")

    def passthrough_reason(self) -> str:
        """Why a TLS ClientHello on a non-terminating listener is passed through."""
        return "tls_listen_off" if self.certs_files else "no_certificate"

    # ---- reload (the shared contract: never raises) ----

    def reload(self) -> None:
        """Re-read every certificate file now (SIGHUP); on failure keep the old contexts, log and count."""
        mtimes = self._stat_files()
        try:
            certs = self._load_server()
            upstream = self._load_upstream()
        except Exception as exc:  # noqa: BLE001 - a bad file must never take the proxy down
            self._mtimes = mtimes  # do not retry the same broken files on every tick
            self._reload_errors.inc()
            log.warning("TLS reload failed, keeping the certificates in use: %s", exc)
            return
        self.server_certs, self.upstream_context, self._mtimes = certs, upstream, mtimes
        log.info("TLS certificates reloaded (%d listener certificate(s))", len(certs))

    def check_files(self) -> bool:
        """Reload when a file's mtime changed; True when a reload was attempted."""
        if self._stat_files() == self._mtimes:
            return False
        self.reload()
        return True

    def start(self) -> None:
        """Start the mtime timer on the running loop (when there are files to watch)."""
        if self.reload_interval > 0 and self._files() and self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                self.check_files()
            except Exception as exc:  # noqa: BLE001 - the timer must survive anything
                log.warning("TLS file check failed: %r", exc)

    def close(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- per connection ----

    def server_cert_for(self, server_name: str | None) -> tuple[ServerCert, bool]:
        """The certificate for an SNI name and whether a SAN matched (no SNI: the default, matched)."""
        certs = self.server_certs
        if not server_name:
            return certs[0], True
        for c in certs:
            if c.info.matches(server_name):
                return c, True
        return certs[0], False

    def upstream_args(self, host: str, client_sni: str = "") -> dict:
        """create_connection() keyword arguments for the upstream: {} without --upstream-tls."""
        ctx = self.upstream_context
        if ctx is None:
            return {}
        name = self.upstream_server_name or client_sni or host
        return {"ssl": ctx, "server_hostname": name, "ssl_handshake_timeout": self.handshake_timeout}

    def describe_client(self, transport: Any, conn: Any) -> None:
        """Copy the TLS facts (both sides' encryption, the verified client certificate's subject) onto conn."""
        conn.upstream_tls = self.upstream
        if transport.get_extra_info("ssl_object") is None:
            return
        conn.client_tls = True
        peer = transport.get_extra_info("peercert")
        if peer:
            conn.client_cert_subject = format_subject(peer.get("subject"))

    def handshake_error(self, side: str, reason: str, who: str, detail: str) -> None:
        """Count a failed handshake and log it (at most one warning a minute per side and reason)."""
        self._handshake_errors.labels(side, reason).inc()
        what = "from client" if side == "client" else "to server"
        self._log.warning(f"hs-{side}-{reason}", "TLS handshake %s %s failed (%s): %s", what, who, reason, detail)

    def upstream_handshake_error(self, exc: BaseException, who: str) -> None:
        """Count a failed handshake with the server."""
        reason, detail = classify(exc)
        self.handshake_error("upstream", reason, who, detail)

    def passthrough(self, conn: Any, reason: str) -> None:
        """Count a connection forwarded untouched (its TLS could not be opened)."""
        self._passthrough.labels(reason).inc()
        self._log.warning(
            "passthrough",
            "connection %d from %s is TLS and cannot be opened (%s): forwarded untouched, not observed",
            conn.id,
            conn.client,
            reason,
        )


# ---- handshake failures ----

_VERIFY_CODES = {10: "certificate_expired", 18: "unknown_ca", 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca"}
_REASON_WORDS = (
    ("CERTIFICATE_EXPIRED", "certificate_expired"),
    ("CERTIFICATE EXPIRED", "certificate_expired"),
    ("HAS EXPIRED", "certificate_expired"),
    ("UNKNOWN_CA", "unknown_ca"),
    ("UNABLE TO GET LOCAL ISSUER", "unknown_ca"),
    ("SELF-SIGNED", "unknown_ca"),
    ("SELF SIGNED", "unknown_ca"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_certificate"),
    ("CERTIFICATE_REQUIRED", "no_certificate"),
    ("HOSTNAME MISMATCH", "sni_mismatch"),
    ("IP ADDRESS MISMATCH", "sni_mismatch"),
    ("UNRECOGNIZED_NAME", "sni_mismatch"),
    ("PROTOCOL_VERSION", "version"),
    ("UNSUPPORTED_PROTOCOL", "version"),
    ("WRONG_SSL_VERSION", "version"),
    ("VERSION_TOO_LOW", "version"),
    ("NO_PROTOCOLS_AVAILABLE", "version"),
    ("WRONG_VERSION_NUMBER", "plaintext"),
    ("HTTP_REQUEST", "plaintext"),
    ("BAD_CERTIFICATE", "bad_certificate"),
    ("CERTIFICATE_UNKNOWN", "bad_certificate"),
    ("UNSUPPORTED_CERTIFICATE", "bad_certificate"),
    ("CERTIFICATE VERIFY FAILED", "bad_certificate"),
)


def classify(exc: BaseException) -> tuple[str, str]:
    """(reason token, detail) of a failed handshake."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout", "the handshake did not finish in time (--tls-handshake-timeout)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        msg = getattr(exc, "verify_message", "") or str(exc)
        if code in _VERIFY_CODES:
            return _VERIFY_CODES[code], msg
        if code == 62 or "mismatch" in msg.lower():
            return "sni_mismatch", msg
        return "bad_certificate", msg
    text = f"{getattr(exc, 'reason', '') or ''} {exc}"
    upper = text.upper().replace("_", " ")
    for word, reason in _REASON_WORDS:
        if word.replace("_", " ") in upper:
            return reason, str(getattr(exc, "reason", None) or exc)
    if "taking longer" in text:
        return "timeout", str(exc)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)) or (
        "EOF" in upper or "CLOSED" in upper
    ):
        return "eof", "the peer closed the connection during the handshake"
    return "other", str(exc) or repr(exc)
