"""`mongoproxy webhook`: the mutating admission webhook that injects the sidecar, over HTTPS (aiohttp).

Routes: POST /mutate (AdmissionReview v1, answered by `admission.review`), GET /healthz, /readyz and
/metrics (its own Prometheus registry). The certificate and the injection defaults (--config, a TOML file of
`inject`'s settings, the ConfigMap in deploy/webhook/) are polled for changes every --reload-seconds and on
SIGHUP; a file that does not load keeps the old state, logs one line and is counted. Invariants:
  - the TLS context is loaded in place, so new handshakes present the new certificate and nothing restarts;
  - /mutate always answers 200 with allowed: true (the `failurePolicy: Ignore` model, even for our bugs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mongoproxy import admission, inject
from mongoproxy.config import LOG_LEVEL, Option, build, load_file, non_negative_float, parse_host, parse_port
from mongoproxy.errors import ConfigError, StartupError
from mongoproxy.events import hostport

log = logging.getLogger("mongoproxy.webhook")

NATIVE_SIDECAR_MINOR = 29  # Kubernetes 1.29 enables native sidecars (restartPolicy: Always init containers)
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a Pod object is at most ~1.5 MiB (etcd); the review wraps it once
RELOAD_ERRORS = ("cert_reload", "config_reload")


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT ([::]:8443 for IPv6) -> (host, port)."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen {value!r} is not HOST:PORT: give e.g. 0.0.0.0:8443 or [::]:8443")
    return parse_host(host), parse_port(port)


def parse_kubernetes_version(value: str) -> tuple[int, int] | None:
    """'1.28', 'v1.30.2' -> (1, 28); '' -> None (assume native sidecars)."""
    text = str(value).strip().lstrip("v")
    if not text:
        return None
    parts = text.split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].rstrip("+").isdigit():
        raise ConfigError(f"--kubernetes-version {value!r} is not a version: give the cluster's, e.g. 1.28")
    return int(parts[0]), int(parts[1].rstrip("+"))


OPTIONS = [
    Option(
        "listen",
        ("--listen",),
        "HOST:PORT the HTTPS server listens on",
        parse_listen,
        "0.0.0.0:8443",
        metavar="HOST:PORT",
        group="webhook",
    ),
    Option(
        "tls_cert",
        ("--tls-cert",),
        "certificate chain (PEM); reloaded when it changes",
        str,
        None,
        metavar="PATH",
        group="webhook",
    ),
    Option(
        "tls_key",
        ("--tls-key",),
        "private key (PEM); reloaded when it changes",
        str,
        None,
        metavar="PATH",
        group="webhook",
    ),
    Option(
        "kubernetes_version",
        ("--kubernetes-version",),
        "the cluster's version; below 1.29 the proxy is injected as a legacy sidecar",
        parse_kubernetes_version,
        None,
        metavar="X.Y",
        group="webhook",
    ),
    Option(
        "reload_seconds",
        ("--reload-seconds",),
        "how often the certificate and --config are checked for changes",
        non_negative_float("--reload-seconds"),
        10.0,
        metavar="SECONDS",
        group="webhook",
    ),
    replace(LOG_LEVEL, group="webhook"),
]
WEBHOOK_KEYS = {o.dest for o in OPTIONS}


def _stamp(*paths: str) -> tuple:
    """What changes when a file is replaced (Kubernetes swaps a symlink; cert-manager rewrites the Secret)."""
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class Watched:
    """A file-backed state: `load()` builds it, `reload()` rebuilds it when the files changed, never raising."""

    def __init__(self, name: str, paths: tuple[str, ...], load: Callable[[], Any], on_error: Callable[[], None]):
        self.name, self.paths, self._load, self._on_error = name, paths, load, on_error
        self.reloads = 0
        self.value = load()  # at startup a failure is the caller's StartupError
        self._seen = _stamp(*paths)

    def reload(self) -> None:
        """Load again if the files changed; on failure log one line and keep the old state."""
        stamp = _stamp(*self.paths)
        if stamp == self._seen:
            return
        self._seen = stamp  # a broken file is reported once, and retried when it changes again
        try:
            self.value = self._load()
        except Exception as exc:  # noqa: BLE001 - keep serving with the old state
            self._on_error()
            log.error("%s: not reloaded, keeping the previous one: %s", self.name, _one_line(exc))
            return
        self.reloads += 1
        log.info("%s reloaded from %s", self.name, ", ".join(self.paths))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror.lower()
    return " ".join(str(exc).split()) or type(exc).__name__


def _tls_context(cert: str, key: str) -> Callable[[], ssl.SSLContext]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def load() -> ssl.SSLContext:
        # In place: the listening socket keeps this context, new handshakes get the new chain.
        ctx.load_cert_chain(cert, key)
        return ctx

    return load


class InjectOptionsLoader:
    """Reads `inject`'s settings from the --config file; the webhook's own keys in it are skipped."""

    def __init__(self, path: str | None, kubernetes_version: tuple[int, int] | None) -> None:
        self.path, self.kubernetes_version = path, kubernetes_version

    def __call__(self) -> inject.InjectOptions:
        values = load_file(self.path) if self.path else {}
        settings = {k: v for k, v in values.items() if k not in WEBHOOK_KEYS}
        opts = inject.options_from_settings(settings, self.path or "")
        if self.kubernetes_version is not None and self.kubernetes_version < (1, NATIVE_SIDECAR_MINOR):
            opts = replace(opts, legacy_sidecar=True)
        return opts


class Webhook:
    """The HTTP face: routes, metrics and the watched certificate and defaults."""

    def __init__(self, settings: Any, config_path: str | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()  # *_created series double the scrape size and no dashboard reads them
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mongoproxy_webhook_requests_total",
            "admission reviews answered, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "mongoproxy_webhook_errors_total",
            "requests answered without a patch and reload failures, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "mongoproxy_webhook_request_duration_seconds",
            "time to answer one admission review",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        for outcome in admission.OUTCOMES:
            self.requests.labels(outcome)
        for reason in admission.REQUEST_ERRORS + RELOAD_ERRORS:
            self.errors.labels(reason)
        self.draining = False
        if not settings.tls_cert or not settings.tls_key:
            raise ConfigError("the webhook serves HTTPS only: give --tls-cert and --tls-key (PEM files)")
        try:
            self.tls = Watched(
                "certificate",
                (settings.tls_cert, settings.tls_key),
                _tls_context(settings.tls_cert, settings.tls_key),
                self.errors.labels("cert_reload").inc,
            )
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"cannot load --tls-cert {settings.tls_cert} with --tls-key {settings.tls_key}: "
                f"{_one_line(exc)}: give a PEM certificate and its key"
            ) from None
        loader = InjectOptionsLoader(config_path, settings.kubernetes_version)
        paths = (config_path,) if config_path else ()
        self.defaults = Watched("injection defaults", paths, loader, self.errors.labels("config_reload").inc)

    def reload(self) -> None:
        """SIGHUP and the poll timer: reload what changed; never raises."""
        self.tls.reload()
        self.defaults.reload()

    def routes(self) -> list:
        """The aiohttp routes: /mutate, /healthz, /readyz, /metrics."""
        from aiohttp import web

        return [
            web.post("/mutate", self.mutate),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
        ]

    async def mutate(self, request: Any) -> Any:
        from aiohttp import web

        t0 = time.perf_counter()
        body = await request.read()
        answer = admission.review(body, self.defaults.value)
        self.requests.labels(answer.outcome).inc()
        if answer.error:
            self.errors.labels(answer.error).inc()
            log.warning("uid=%s %s: %s", answer.uid or "?", answer.error, answer.warnings[0])
        self.duration.observe(time.perf_counter() - t0)
        return web.json_response(answer.response())

    async def healthz(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="ok\n")

    async def readyz(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(status=503, text="draining\n") if self.draining else web.Response(text="ready\n")

    async def metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start(hook: Webhook, host: str, port: int) -> Any:
    """Serve `hook` on host:port over TLS; returns the aiohttp AppRunner (cleanup() stops it)."""
    from aiohttp import web

    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.add_routes(hook.routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=hook.tls.value, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {hostport(host, port)}: {exc.strerror}: check --listen") from None
    return runner


async def serve(hook: Webhook, host: str, port: int, reload_seconds: float) -> int:
    """Run until SIGTERM/SIGINT: poll for changed files, reload on SIGHUP, stop in-flight requests cleanly."""
    runner = await start(hook, host, port)
    log.info("webhook listening on https://%s (/mutate, /healthz, /readyz, /metrics)", hostport(host, port))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hook.reload)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=reload_seconds or None)
            except TimeoutError:
                hook.reload()
    finally:
        hook.draining = True
        await runner.cleanup()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `mongoproxy webhook`."""
    p = subparsers.add_parser(
        "webhook",
        help="serve the mutating admission webhook that injects the sidecar",
        description="Serve AdmissionReview v1 requests on https://HOST:PORT/mutate: every Pod CREATE gets the "
        "JSONPatch that adds what 'mongoproxy inject' adds. Pods annotated mongoproxy.io/inject: \"false\" and "
        "pods already injected are left alone; mongoproxy.io/* annotations override the defaults per pod. Errors "
        "never block a pod: it is allowed unchanged, with a warning. Also /healthz, /readyz and /metrics. "
        "Needs the webhook extra: pip install 'mongoproxy[webhook]'.",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MONGOPROXY_CONFIG"),
        help="TOML file of injection defaults named like inject's flags (image, proxy_port, cpu_limit, "
        "metric_labels, ...); reloaded when it changes [env MONGOPROXY_CONFIG]",
    )
    group = p.add_argument_group("webhook options")
    for o in OPTIONS:
        default = "" if o.default is None else f" (default: {o.default})"
        group.add_argument(
            *o.flags, dest=o.dest, default=None, metavar=o.metavar, help=f"{o.help}{default} [env {o.env}]"
        )
    p.set_defaults(func=handler)
    return p


def handler(args: argparse.Namespace) -> int:
    """Run the sub-command; returns the exit code."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ConfigError("mongoproxy webhook needs aiohttp: pip install 'mongoproxy[webhook]'") from None
    file_values = load_file(args.config) if args.config else {}
    settings = build(
        {o.dest: getattr(args, o.dest, None) for o in OPTIONS},
        file_values={k: v for k, v in file_values.items() if k in WEBHOOK_KEYS},
        options=OPTIONS,
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hook = Webhook(settings, args.config)
    host, port = settings.listen
    return asyncio.run(serve(hook, host, port, settings.reload_seconds))
