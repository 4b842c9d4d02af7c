"""Config: --proxy specs, precedence of flag > env > file > default, and one-line errors."""

import pytest

from mongoproxy import config
from mongoproxy.errors import ConfigError


@pytest.mark.parametrize(
    "text,expected",
    [
        ("27111", (27111, None, None)),
        ("27113:localhost:27017", (27113, "localhost", 27017)),
        ("27113:10.0.0.5:27017", (27113, "10.0.0.5", 27017)),
        ("27113:[::1]:27017", (27113, "::1", 27017)),
        ("27113:[2001:db8::7]:27018", (27113, "2001:db8::7", 27018)),
        ("0:db.example:27017", (0, "db.example", 27017)),
    ],
)
def test_proxy_spec_forms(text, expected):
    spec = config.parse_proxy_spec(text)
    assert (spec.listen_port, spec.upstream_host, spec.upstream_port) == expected
    assert spec.transparent == (expected[1] is None)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty --proxy"),
        ("abc", "malformed"),
        ("27113:localhost", "malformed"),
        ("27113:::1:27017", "brackets"),
        ("27113:[::1:27017", "close the IPv6"),
        ("27113:[nothost]:27017", "not an IPv6"),
        ("27113:h:port", "not a number"),
        ("70000", "out of range"),
        ("27113:h:0", "out of range"),
    ],
)
def test_proxy_spec_errors_name_the_fix(text, needle):
    with pytest.raises(ConfigError) as err:
        config.parse_proxy_spec(text)
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg


def test_precedence_flag_env_file_default():
    opts = config.CORE_OPTIONS
    file_values = {"drain_seconds": 3, "max_message_bytes": 1000, "connect_timeout": 7}
    env = {"MONGOPROXY_DRAIN_SECONDS": "4", "MONGOPROXY_MAX_MESSAGE_BYTES": "2000"}
    cfg = config.build({"drain_seconds": "5"}, env=env, file_values=file_values, options=opts)
    assert cfg.drain_seconds == 5.0 and cfg.sources["drain_seconds"] == "--drain-seconds"
    assert cfg.max_message_bytes == 2000 and cfg.sources["max_message_bytes"] == "MONGOPROXY_MAX_MESSAGE_BYTES"
    assert cfg.connect_timeout == 7.0 and cfg.sources["connect_timeout"] == "config file"
    assert cfg.listen_host == ("127.0.0.1",) and cfg.sources["listen_host"] == "default"
    assert cfg.admin_port == 9898


def test_env_list_for_repeatable_option():
    cfg = config.build({}, env={"MONGOPROXY_PROXY": "27113:a:1, 27114:b:2"}, options=config.CORE_OPTIONS)
    assert [s.listen_port for s in cfg.proxy] == [27113, 27114]


def test_env_error_names_the_variable():
    with pytest.raises(ConfigError, match="MONGOPROXY_DRAIN_SECONDS"):
        config.build({}, env={"MONGOPROXY_DRAIN_SECONDS": "soon"}, options=config.CORE_OPTIONS)


def test_config_is_frozen_and_replace_copies():
    cfg = config.build({}, env={}, options=config.CORE_OPTIONS)
    with pytest.raises(AttributeError):
        cfg.drain_seconds = 1
    other = cfg.replace(drain_seconds=1.0)
    assert other.drain_seconds == 1.0 and cfg.drain_seconds == 15.0
    with pytest.raises(KeyError):
        cfg.replace(no_such_option=1)


def test_file_unknown_key_and_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("drain_seconds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_file(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_file(str(tmp_path / "missing.toml"))
    good = tmp_path / "good.toml"
    good.write_text('proxy = ["27113:localhost:27017"]\ndrain-seconds = 2\n')
    values = config.load_file(str(good))
    cfg = config.build({}, env={}, file_values=values, options=config.CORE_OPTIONS)
    assert cfg.proxy[0].upstream_host == "localhost" and cfg.drain_seconds == 2.0
    with pytest.raises(ConfigError, match="unknown setting"):
        config.build({}, env={}, file_values={"drain": 1}, options=config.CORE_OPTIONS)


def test_check_proxies():
    base = config.build({}, env={}, options=config.CORE_OPTIONS)
    with pytest.raises(ConfigError, match="no listener"):
        config.check_proxies(base)
    dup = base.replace(proxy=(config.parse_proxy_spec("27113:a:1"), config.parse_proxy_spec("27113:b:2")))
    with pytest.raises(ConfigError, match="listen port 27113 is used by both"):
        config.check_proxies(dup)
    clash = base.replace(proxy=(config.parse_proxy_spec("9898:a:1"),))
    with pytest.raises(ConfigError, match="admin-port 9898"):
        config.check_proxies(clash)
