"""--upstream: the proxy in front of a whole deployment (replica set, sharded cluster, mongodb+srv://).

Discovery is what a driver does: the URI's seed list (SRV and TXT records for +srv, via pymongo's
parser and dnspython), then `hello` on each member, again every --topology-interval seconds. Each
member gets a listener of its own on --listen-host; members that join get one (also the moment a
hello reply names them), members that leave have theirs closed once no connection uses it. On these
listeners, and only there, hello replies are rewritten (see hellogate and protocol.hello) so that a
driver's discovery stays inside the proxy. With --load-balance, a sharded cluster gets one listener
that spreads new connections round robin over the mongos routers whose last hello succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import bson

from mongoproxy import hellogate
from mongoproxy.config import ConfigError, Option, ProxySpec, non_negative_float, parse_bool, parse_port
from mongoproxy.errors import StartupError
from mongoproxy.events import DecodeErrorEvent, hostport
from mongoproxy.members import (
    DEFAULT_PORT_BASE,
    Member,
    PortAllocator,
    member_state,
    probe,
    redact,
    split_address,
    uri_tls_context,
)
from mongoproxy.protocol import hello

log = logging.getLogger("mongoproxy.topology")


def parse_upstream_uri(value: str) -> str:
    """Accept a mongodb:// or mongodb+srv:// string; the full parse (and SRV) happens at start."""
    text = str(value).strip()
    if not text.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(
            f"--upstream {redact(text)!r} is not a MongoDB connection string: "
            "use mongodb://host1,host2/?replicaSet=NAME or mongodb+srv://cluster.example.net/"
        )
    return text


def parse_advertise_host(value: str) -> str:
    """A host name or IP address (no port) that clients can reach the member listeners by."""
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # [::1] as a URI writes it
    if not text or any(c in text for c in ",/ ") or (":" in text and text.count(":") < 2):
        raise ConfigError(
            f"--advertise-host {value!r} is not a host name or IP address: give one, without a port "
            "(the member listeners' ports come from --listen-port-base)"
        )
    return text


OPTIONS = [
    Option(
        "upstream",
        ("--upstream",),
        "a whole deployment behind the proxy: a mongodb:// or mongodb+srv:// connection string; each member gets "
        "a listener and hello replies name the listeners; repeatable (in the environment: space-separated)",
        parse_upstream_uri,
        (),
        multiple=True,
        separator=None,  # a URI's host list has commas
        metavar="URI",
        group="cluster",
    ),
    Option(
        "listen_port_base",
        ("--listen-port-base",),
        "first listen port of the --upstream members (default: the first port from 27113 up that no --proxy uses)",
        parse_port,
        None,
        metavar="N",
        group="cluster",
    ),
    Option(
        "advertise_host",
        ("--advertise-host",),
        "the host that rewritten hello replies, /topology and the client connection string name for the member "
        "listeners (default: the first --listen-host, with 0.0.0.0 as 127.0.0.1 and :: as ::1); set it when "
        "clients reach the proxy by another name, e.g. a container's service name",
        parse_advertise_host,
        None,
        metavar="HOST",
        group="cluster",
    ),
    Option(
        "load_balance",
        ("--load-balance",),
        "for a sharded --upstream: one listener spreading new connections round robin over the healthy mongos",
        parse_bool,
        False,
        switch=True,
        group="cluster",
    ),
    Option(
        "topology_interval",
        ("--topology-interval",),
        "seconds between the hello checks of every --upstream member (joins, leaves, failovers, health)",
        non_negative_float("--topology-interval"),
        10.0,
        metavar="SECONDS",
        group="cluster",
    ),
]


@dataclass(frozen=True)
class MemberSpec(ProxySpec):
    """A listener created by --upstream: its member (or, with --load-balance, its router pool)."""

    topology: Any = None
    member: Any = None  # None on the --load-balance listener

    def route(self, client: Any) -> tuple[str, int] | None:
        """The upstream of a new connection; labels its Connection with the member's state."""
        member = self.member if self.member is not None else self.topology.pick()
        if member is None:
            client._refuse("no_member", "no mongos router is known yet")
            return None
        client.conn.member_state = member.state
        client.member = member
        return member.host, member.port

    def upstream_tls(self, host: str, client_sni: str = "") -> dict:
        """create_connection() TLS arguments for a member: the URI's tls=, else the --upstream-tls flags."""
        return self.topology.tls_args(host, client_sni)

    def gate(self, client: Any) -> None:
        """Put the hello gate on a connected pair (replica sets only: nothing else needs rewriting)."""
        if self.topology.deployment == "replicaset":
            self.topology.install_gate(client)


class Topology:
    """One --upstream deployment: discovery, member listeners, the address map and /topology."""

    def __init__(self, proxy: Any, uri: str, ports: PortAllocator, counter: Any) -> None:
        self.proxy = proxy
        self.uri = uri
        self.ports = ports
        self.rewritten = counter
        self.deployment = "unknown"
        self.set_name: str | None = None
        self.expected_set: str | None = None
        self.direct = False
        self.seeds: list[tuple[str, int]] = []
        self.ssl: ssl.SSLContext | None = None
        self.members: dict[str, Member] = {}  # address (and aliases) -> member
        self.address_map: dict[str, str] = {}  # member address (lower case) -> listener address
        self.balancer: MemberSpec | None = None
        self.balancer_port = 0
        self._rr = 0
        self._task: asyncio.Task | None = None
        self.reachable = False
        self.on_change: Any = None  # called after each refresh (readiness)
        self.advertise_host = advertised_host(proxy.config)
        self.interval = proxy.config.topology_interval
        self.timeout = proxy.config.connect_timeout or 10.0

    # ---- start-up

    async def start(self) -> None:
        """Parse the URI, discover, bind listeners, log the mapping; StartupError names the fix."""
        await self._parse()
        await self.refresh(initial=True)
        for _ in range(3):  # members named by the seeds: ask them too, so the start-up lines show their states
            members = self._unique()
            if not any(m.healthy for m in members) or all(m.healthy or m.error for m in members):
                break
            await self.refresh(initial=True, classify=False)
        if self.proxy.config.load_balance:
            if self.deployment != "sharded":
                raise StartupError(
                    f"--load-balance needs mongos routers, but {redact(self.uri)} is a {self.deployment} "
                    "deployment: drop --load-balance"
                )
            port, socks = self.ports.bind("--load-balance")
            self.balancer_port = port
            self.balancer = MemberSpec(port, "mongos", 0, text="--load-balance", topology=self)
            await self._serve(self.balancer, socks, None)
        self._report()
        if self.interval:
            self._task = asyncio.get_running_loop().create_task(self._monitor())

    async def _parse(self) -> None:
        from pymongo.errors import ConfigurationError, InvalidURI
        from pymongo.uri_parser import parse_uri

        shown = redact(self.uri)
        try:
            # +srv resolves SRV and TXT records (blocking, dnspython): off the loop.
            parsed = await asyncio.get_running_loop().run_in_executor(None, parse_uri, self.uri)
        except (InvalidURI, ValueError) as exc:
            raise StartupError(
                f"--upstream {shown}: the URI does not parse ({exc}): fix the connection string"
            ) from None
        except ConfigurationError as exc:
            if self.uri.startswith("mongodb+srv://"):
                raise StartupError(
                    f"--upstream {shown}: SRV lookup failed ({exc}): check the cluster name and the DNS server"
                ) from None
            raise StartupError(f"--upstream {shown}: {exc}: fix the connection string") from None
        except OSError as exc:  # e.g. tlsCAFile names a file that is not there
            raise StartupError(f"--upstream {shown}: {exc}: fix the connection string") from None
        options = parsed["options"]
        self.expected_set = options.get("replicaSet")
        self.direct = bool(options.get("directConnection"))  # one server, as a driver would: no members added
        try:
            self.ssl = uri_tls_context(options)  # tls=true: the proxy originates TLS, clients stay plaintext
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"--upstream {shown}: cannot load its TLS files ({exc}): check tlsCAFile and the key"
            ) from None
        self.seeds = [(h, int(p)) for h, p in parsed["nodelist"]]

    def tls_args(self, host: str, client_sni: str = "") -> dict:
        """TLS arguments to reach a member ({} in plaintext)."""
        if self.ssl is not None:
            return {"ssl": self.ssl, "server_hostname": host, "ssl_handshake_timeout": self.timeout}
        tls = getattr(self.proxy, "tls", None)
        return tls.upstream_args(host, client_sni) if tls is not None else {}

    def _report(self) -> None:
        for line in self.listener_lines():
            log.info("%s", line)
        log.info("connect clients with: %s", self.client_uri())
        if not any(m.healthy for m in self._unique()):
            log.warning(
                "no member of %s answered hello within %gs: listening anyway; /readyz answers 503 until one does",
                redact(self.uri),
                self.timeout,
            )

    def listener_lines(self) -> list[str]:
        """One line per listener: '27113 → host:port (primary)'."""
        lines = []
        if self.balancer is not None:
            names = ", ".join(m.address for m in self._unique())
            lines.append(f"{self.balancer_port} → load balanced over {names}")
        tls = ", TLS" if self.tls_args("") else ""
        for m in self._unique():
            if m.listen_port:
                lines.append(f"{m.listen_port} → {m.address} ({m.state}{tls})")
        return lines

    def client_uri(self) -> str:
        """The connection string to give clients."""
        tls = getattr(self.proxy, "tls", None)
        options = ["tls=true"] if tls is not None and tls.terminating else []
        if self.balancer is not None:
            hosts = hostport(self.advertise_host, self.balancer_port)
        else:
            hosts = ",".join(
                hostport(self.advertise_host, m.listen_port) for m in self._unique() if m.listen_port and not m.removed
            )
            if self.deployment == "replicaset" and self.set_name:
                options.insert(0, f"replicaSet={self.set_name}")
            elif self.deployment == "single":
                options.insert(0, "directConnection=true")
        return f"mongodb://{hosts}/" + (f"?{'&'.join(options)}" if options else "")

    def _unique(self) -> list[Member]:
        return list(dict.fromkeys(self.members.values()))

    # ---- discovery

    async def refresh(self, initial: bool = False, classify: bool = True) -> None:
        """hello every known member (the seeds at first), learn joins, leaves and states."""
        targets: list[tuple[str, int, Member | None]] = []
        if not self.members:
            targets = [(h, p, None) for h, p in self.seeds]
        else:
            targets = [(m.host, m.port, m) for m in self._unique() if not (m.removed and not m.servers)]
        results = await asyncio.gather(*(self._probe(h, p) for h, p, _ in targets))
        replies: list[tuple[str, int, Member | None, dict]] = []
        for (h, p, m), res in zip(targets, results):
            if isinstance(res, dict):
                replies.append((h, p, m, res))
            elif m is not None:
                if m.healthy:
                    log.warning("member %s stopped answering hello: %s", m.address, res)
                m.healthy, m.error = False, res
                self._set_state(m, "unknown")
        if initial and classify:
            self._classify(replies)
        listed: set[str] | None = None  # the members the primary names (leaves are judged only against it)
        for h, p, m, doc in replies:
            if self.expected_set and doc.get("setName") not in (None, self.expected_set):
                log.warning(
                    "%s answers for set %r, not %r: ignored", hostport(h, p), doc.get("setName"), self.expected_set
                )
                continue
            state = member_state(doc)
            name = str(doc.get("me") or hostport(h, p)).lower()
            member = m or self.members.get(name) or self._add(name)
            seed = hostport(h, p).lower()
            if seed != name and seed not in self.members:
                self.members[seed] = member  # a seed the set names otherwise: an alias
                self.address_map[seed] = self.address_map.get(name, "")
            if not member.healthy and not initial:
                log.info("member %s answers hello (%s)", member.address, state)
            member.healthy, member.error = True, ""
            self._set_state(member, state)
            names = [str(a).lower() for k in ("hosts", "passives", "arbiters") for a in doc.get(k, ())]
            for n in names if not self.direct else ():
                if n not in self.members:
                    self._add(n)
                    if not initial:
                        log.info("member %s joined %s: listening on %s", n, self.set_name, self.address_map.get(n))
            if state == "primary" and not self.direct:
                listed = set(names)
        for m in self._unique():
            gone = listed is not None and m.address not in listed
            if gone and not m.removed:
                log.info("member %s left %s: its listener closes once idle", m.address, self.set_name)
            elif m.removed and not gone:
                log.info("member %s is back in %s", m.address, self.set_name)
            m.removed = gone if listed is not None else m.removed
        if not initial:
            self._close_idle_removed()
        self._update_ready()

    async def _probe(self, host: str, port: int) -> dict | str:
        try:
            return await probe(host, port, self.timeout, self.tls_args(host))
        except (OSError, TimeoutError, ValueError, IndexError, bson.errors.BSONError) as exc:
            return str(exc) or type(exc).__name__

    def _classify(self, replies: list) -> None:
        docs = [d for *_, d in replies]
        if self.direct:
            self.deployment = "single"
            self.set_name = next((d["setName"] for d in docs if "setName" in d), None)
        elif any(d.get("msg") == "isdbgrid" for d in docs):
            self.deployment = "sharded"
        elif any("setName" in d for d in docs) or self.expected_set:
            self.deployment = "replicaset"
            self.set_name = next((d["setName"] for d in docs if "setName" in d), self.expected_set)
        else:
            self.deployment = "single"
        if not replies:
            for h, p in self.seeds:  # nothing answered: listen for the seeds and keep trying
                self._add(hostport(h, p).lower())

    def _add(self, address: str) -> Member:
        """A member and its listener (bound synchronously; served as soon as the loop runs)."""
        host, port = split_address(address)
        member = Member(address, host, port)
        self.members[address] = member
        if self.balancer is not None or (self.proxy.config.load_balance and self.deployment == "sharded"):
            return member  # behind the one balancing listener
        listen_port, socks = self.ports.bind(f"--upstream member {address}")
        member.listen_port = listen_port
        member.spec = MemberSpec(listen_port, host, port, text=f"--upstream {address}", topology=self, member=member)
        self.address_map[address] = hostport(self.advertise_host, listen_port)
        asyncio.get_running_loop().create_task(self._serve(member.spec, socks, member))
        return member

    async def _serve(self, spec: MemberSpec, socks: list[socket.socket], member: Member | None) -> None:
        from mongoproxy.server import ClientSide

        def factory() -> ClientSide:
            return ClientSide(self.proxy, spec)

        tls = getattr(self.proxy, "tls", None)
        if tls is not None and tls.terminating:  # --tls-cert: clients speak TLS to the member listeners too
            from mongoproxy.tlslisten import TlsListener

            servers: list[Any] = [TlsListener(tls, factory, socks, self.proxy.limiter, self._open_connections)]
        else:
            loop = asyncio.get_running_loop()
            servers = [await loop.create_server(factory, sock=sock, backlog=1024) for sock in socks]
        self.proxy.add_own_listener(socks)  # a transparent connection to a member listener is a loop too
        for server in servers:
            self.proxy.servers.append((spec, server))
            if member is not None:
                member.servers.append(server)

    def _open_connections(self) -> int:
        return len(self.proxy.connections)

    def unknown_address(self, address: str) -> str | None:
        """A hello reply named a member not seen yet: give it a listener now, so the driver never bypasses us."""
        if self.proxy.draining or address in self.members:
            return None  # known without a listener (no free port was left): warned once already
        try:
            self._add(address)
        except StartupError as exc:
            log.warning("%s", exc)
            return None
        log.info("member %s joined %s: listening on %s", address, self.set_name, self.address_map[address])
        return self.address_map[address]

    def _set_state(self, member: Member, state: str) -> None:
        if member.state == state:
            return
        if member.state != "unknown":
            log.info("member %s is now %s (was %s)", member.address, state, member.state)
        member.state = state
        for c in list(self.proxy.connections):  # a failover moves the member_state label of open connections
            if getattr(c, "member", None) is member and c.conn is not None:
                c.conn.member_state = state

    def _close_idle_removed(self) -> None:
        for m in self._unique():
            if m.removed and m.servers and not any(getattr(c, "member", None) is m for c in self.proxy.connections):
                for server in m.servers:
                    self.proxy.remove_own_listener(getattr(server, "sockets", None) or ())
                    server.close()
                self.proxy.servers[:] = [(s, srv) for s, srv in self.proxy.servers if srv not in m.servers]
                m.servers = []
                log.info("listener %d of departed member %s closed", m.listen_port, m.address)

    def _update_ready(self) -> None:
        self.reachable = any(m.healthy for m in self._unique())
        if self.on_change is not None:
            self.on_change()

    async def _monitor(self) -> None:
        while not self.proxy.draining:
            await asyncio.sleep(self.interval)
            if self.proxy.draining:
                return
            try:
                await self.refresh()
            except StartupError as exc:  # port range exhausted for a joining member: keep the rest going
                log.warning("%s", exc)
            except Exception:  # noqa: BLE001 - the monitor must outlive one bad round
                log.exception("topology refresh of %s failed", redact(self.uri))

    def pick(self) -> Member | None:
        """The next healthy mongos, round robin (any mongos when none is healthy)."""
        pool = [m for m in self._unique() if not m.removed]
        healthy = [m for m in pool if m.healthy] or pool
        if not healthy:
            return None
        self._rr = (self._rr + 1) % len(healthy)
        return healthy[self._rr]

    # ---- the data path hook

    def install_gate(self, client: Any) -> None:
        """Wrap the pair's two writes: requests are watched for hello, hello replies rewritten."""
        ids: OrderedDict = OrderedDict()
        watch = hellogate.RequestWatch(ids)
        write_upstream = client._write_upstream
        feed = watch.feed

        def write_request(data: bytes) -> None:
            write_upstream(data)  # bytes first, unchanged
            feed(data)

        def on_error(reason: str, detail: str) -> None:
            self.proxy.bus.decode_error(
                DecodeErrorEvent(client.conn, "reply", reason, detail, time.monotonic_ns(), False)
            )

        swap = hello.make_swap(self.address_map, self.unknown_address)
        gate = hellogate.ReplyGate(ids, client.upstream._write_client, swap, self.rewritten.inc, on_error)
        client._write_upstream = write_request
        client.upstream._write_client = gate.feed

    # ---- /topology

    def describe(self) -> dict:
        """The /topology document."""
        members: list[dict[str, Any]] = []
        if self.balancer is not None:
            members.append(
                {
                    "host": "load-balanced",
                    "listen": hostport(self.advertise_host, self.balancer_port),
                    "state": "mongos",
                }
            )
        for m in self._unique():
            entry: dict[str, Any] = {
                "host": m.address,
                "listen": hostport(self.advertise_host, m.listen_port) if m.listen_port else None,
                "state": m.state,
            }
            if m.removed:
                entry["removed"] = True
            if m.error:
                entry["error"] = m.error
            members.append(entry)
        return {
            "deployment": self.deployment,
            "set_name": self.set_name,
            "members": members,
            "client_uri": self.client_uri(),
        }


class Cluster:
    """Every --upstream of the process: a proxy.components entry serving /topology and readiness."""

    def __init__(self, proxy: Any, topologies: list[Topology]) -> None:
        self.proxy = proxy
        self.topologies = topologies
        self.started = False
        for t in topologies:
            t.on_change = self.update
        proxy.ready_checks.append(self.not_ready)

    def not_ready(self) -> str | None:
        """None once discovery ran and a member of every deployment answers hello; else the reason."""
        if not self.started:
            return "discovering the --upstream deployment(s)"
        waiting = [redact(t.uri) for t in self.topologies if not getattr(t, "reachable", False)]
        return f"no member of {', '.join(waiting)} answers hello yet" if waiting else None

    @property
    def reachable(self) -> bool:
        """True once every deployment has a member that answered hello."""
        return all(getattr(t, "reachable", False) for t in self.topologies)

    async def start(self) -> None:
        """Discover every deployment and bind its listeners (after the --proxy listeners); StartupError names the fix."""
        for t in self.topologies:
            await t.start()
        self.started = True
        self.update()

    def describe(self) -> Any:
        """One deployment's document, or a list of them."""
        docs = [t.describe() for t in self.topologies]
        return docs[0] if len(docs) == 1 else docs

    def admin_routes(self) -> list:
        """GET /topology (the admin endpoint's routes contract)."""
        from aiohttp import web

        async def topology(request: web.Request) -> web.Response:
            return web.json_response(self.describe(), dumps=_dumps)

        return [web.get("/topology", topology)]

    def update(self) -> None:
        """Ready while every deployment has a member that answered its last hello."""
        if self.proxy.draining:
            return
        was = self.proxy.ready
        self.proxy.update_ready()  # the one decision: this check and every --proxy upstream resolving
        if self.proxy.ready and not was:
            log.info("a member of every --upstream deployment answers hello: ready")


def advertised_host(config: Any) -> str:
    """The host clients are told for the member listeners: --advertise-host, else from the first --listen-host."""
    explicit = config.get("advertise_host")
    if explicit:
        return explicit
    host = config.listen_host[0]
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard is not an address to connect to


def _dumps(doc: Any) -> str:
    import json

    return json.dumps(doc, ensure_ascii=False, indent=2)


def create(proxy: Any, registry: Any) -> Cluster | None:
    """The --upstream component, in proxy.components before the admin endpoint collects routes; None without."""
    cfg = proxy.config
    if not cfg.get("upstream"):
        return None
    from prometheus_client import Counter

    counter = Counter(
        "mongoproxy_rewritten_replies",
        "hello/isMaster replies whose member addresses were replaced by the proxy's listener addresses.",
        registry=registry,
    )
    taken = {spec.listen_port for spec in cfg.proxy}
    base = cfg.get("listen_port_base") or next(p for p in range(DEFAULT_PORT_BASE, 65536) if p not in taken)
    ports = PortAllocator(tuple(cfg.listen_host), base, taken)
    cluster = Cluster(proxy, [Topology(proxy, uri, ports, counter) for uri in cfg.upstream])
    proxy.components.append(cluster)
    return cluster
