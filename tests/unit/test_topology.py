"""--upstream helpers: URI checks, redaction, member states, addresses, the port allocator."""

from __future__ import annotations

import socket

import pytest

from mongoproxy import config as config_mod
from mongoproxy import members
from mongoproxy.errors import ConfigError, StartupError


def test_upstream_option_accepts_mongodb_uris_only():
    cfg = config_mod.build({"upstream": ["mongodb://a,b/?replicaSet=rs0", "mongodb+srv://c.example.net/"]}, env={})
    assert cfg.upstream == ("mongodb://a,b/?replicaSet=rs0", "mongodb+srv://c.example.net/")
    with pytest.raises(ConfigError, match="not a MongoDB connection string"):
        config_mod.build({"upstream": ["http://u:secret@db/"]}, env={})
    with pytest.raises(ConfigError) as info:
        config_mod.build({"upstream": ["postgres://u:secret@db/"]}, env={})
    assert "secret" not in str(info.value) and "***@db" in str(info.value)


def test_upstream_from_the_environment_keeps_host_lists_whole():
    env = {"MONGOPROXY_UPSTREAM": "mongodb://a,b/?replicaSet=rs0 mongodb+srv://c.example.net/"}
    assert config_mod.build({}, env=env).upstream == ("mongodb://a,b/?replicaSet=rs0", "mongodb+srv://c.example.net/")


def test_run_needs_a_proxy_or_an_upstream():
    config_mod.check_proxies(config_mod.build({"upstream": ["mongodb://a/"]}, env={}))
    with pytest.raises(ConfigError, match="--upstream URI"):
        config_mod.check_proxies(config_mod.build({}, env={}))


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("mongodb://alice:pw@h1,h2/?replicaSet=rs0", "mongodb://***@h1,h2/?replicaSet=rs0"),
        ("mongodb+srv://u:p%40ss@c.example.net/", "mongodb+srv://***@c.example.net/"),
        ("mongodb://h1/?authSource=admin", "mongodb://h1/?authSource=admin"),
    ],
)
def test_credentials_are_redacted(uri, shown):
    assert members.redact(uri) == shown


@pytest.mark.parametrize(
    ("doc", "state"),
    [
        ({"setName": "rs0", "isWritablePrimary": True}, "primary"),
        ({"setName": "rs0", "ismaster": True}, "primary"),
        ({"setName": "rs0", "secondary": True}, "secondary"),
        ({"setName": "rs0", "arbiterOnly": True}, "arbiter"),
        ({"setName": "rs0"}, "other"),
        ({"msg": "isdbgrid", "isWritablePrimary": True}, "mongos"),
        ({"isWritablePrimary": True}, "standalone"),
        ({"isreplicaset": True}, "other"),
    ],
)
def test_member_state(doc, state):
    assert members.member_state(doc) == state


@pytest.mark.parametrize(
    ("address", "parts"),
    [("db:27018", ("db", 27018)), ("db", ("db", 27017)), ("[::1]:5", ("::1", 5)), ("[::1]", ("::1", 27017))],
)
def test_split_address(address, parts):
    assert members.split_address(address) == parts


def test_port_allocator_skips_taken_ports_and_reports_exhaustion():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        alloc = members.PortAllocator(("127.0.0.1",), busy, set())
        port, socks = alloc.bind("member a")
        assert port > busy
        for s in socks:
            s.close()
        last = members.PortAllocator(("127.0.0.1",), 65535, {65535})
        with pytest.raises(StartupError, match="port range is exhausted; choose another --listen-port-base"):
            last.bind("member b")
    finally:
        holder.close()


@pytest.mark.parametrize(
    ("flags", "advertised"),
    [
        ({}, "127.0.0.1"),
        ({"listen_host": "0.0.0.0"}, "127.0.0.1"),
        ({"listen_host": "::"}, "::1"),
        ({"listen_host": "::,0.0.0.0"}, "::1"),  # several hosts: the first one decides
        ({"listen_host": "10.1.2.3,127.0.0.1"}, "10.1.2.3"),
        ({"listen_host": "0.0.0.0", "advertise_host": "mongoproxy.svc"}, "mongoproxy.svc"),
        ({"advertise_host": "[fd00::5]"}, "fd00::5"),
    ],
)
def test_advertised_host(flags, advertised):
    from mongoproxy import topology

    cfg = config_mod.build({"upstream": ["mongodb://db:27017/"], **flags}, env={})
    assert topology.advertised_host(cfg) == advertised


@pytest.mark.parametrize("bad", ["", "db:27017", "a,b", "http://x/"])
def test_advertise_host_refuses_what_is_not_a_host(bad):
    with pytest.raises(ConfigError, match="--advertise-host"):
        config_mod.build({"upstream": ["mongodb://db:27017/"], "advertise_host": bad}, env={})
