"""Fault rules: one flat format, validation with one-line reasons, matching, and the rules file's reload."""

import ipaddress
import os
import time
from pathlib import Path

import pytest

from mongoproxy.faults import FaultEngine, RuleError, parse_rule
from mongoproxy.faults.rules import load_rules_file

EXAMPLE = {
    "name": "failover",
    "op": ["insert", "update"],
    "ns": "shop.*",
    "action": "error",
    "code": 10107,
    "labels": ["RetryableWriteError"],
    "max_count": 5,
}


def never(_=None):
    raise AssertionError("shape computed although no rule asks for it")


def test_the_issue_example_round_trips():
    rule = parse_rule(EXAMPLE)
    assert rule.as_dict() == {**EXAMPLE, "injected": 0, "active": True}
    assert parse_rule({k: v for k, v in rule.as_dict().items() if k not in ("injected", "active")}).spec == rule.spec


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"name": "x", "action": "explode"}, "action 'explode' is not known: use one of delay, error"),
        ({"name": "x", "action": "close", "percentage": 150}, "percentage must be from 0 to 100, got 150"),
        ({"name": "x", "action": "close", "client": "10.0.0.300/8"}, "client '10.0.0.300/8' is not a CIDR"),
        ({"name": "x", "action": "delay"}, "action delay needs ms"),
        ({"name": "x", "action": "error"}, "action error needs code"),
        ({"name": "x", "action": "delay", "ms": 5, "code": 91}, "code does not apply to action delay"),
        ({"name": "x", "action": "close", "colour": "red"}, "unknown key 'colour'"),
        ({"name": "a b", "action": "close"}, "rule name 'a b' is missing or not valid"),
        ({"name": "x", "action": "close", "duration": "soon"}, "duration 'soon' is not a duration"),
        ({"name": "x", "action": "throttle"}, "needs bytes_per_second"),
        ({"name": "x", "action": "delay", "ms": 1, "where": "later"}, "where 'later' is not valid"),
        ({"name": "x", "action": "close", "max_count": 0}, "max_count must be at least 1"),
    ],
)
def test_bad_rules_have_one_line_reasons(raw, reason):
    with pytest.raises(RuleError) as info:
        parse_rule(raw)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_matching_keys():
    rule = parse_rule({"name": "r", "op": ["find", "!count"], "ns": "shop.*", "comment": "drill", "action": "close"})
    assert rule.matches("find", "shop", "orders", "a drill here", never)
    assert not rule.matches("find", "shop", "orders", None, never)
    assert not rule.matches("find", "other", "orders", "drill", never)
    assert not rule.matches("aggregate", "shop", "orders", "drill", never)
    neg = parse_rule({"name": "n", "op": "!find", "action": "close"})
    assert neg.matches("insert", "a", "b", None, never) and not neg.matches("find", "a", "b", None, never)


def test_handshakes_only_when_named_and_auth_never():
    anything = parse_rule({"name": "any", "action": "close"})
    assert anything.matches("ping", "admin", "", None, never)
    assert not anything.matches("hello", "admin", "", None, never)
    assert not anything.matches("isMaster", "admin", "", None, never)
    assert not anything.matches("saslStart", "admin", "", None, never)
    named = parse_rule({"name": "hello", "op": ["hello", "saslStart"], "action": "close"})
    assert named.matches("hello", "admin", "", None, never)
    assert not named.matches("saslStart", "admin", "", None, never)


def test_connection_keys_decide_who_is_gated():
    rule = parse_rule({"name": "r", "client": "10.1.0.0/16", "app": "shop-*", "action": "close"})
    inside, outside = ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("10.2.0.1")
    assert rule.could_match(inside, None)  # the app is not known before the handshake
    assert rule.could_match(inside, "shop-api") and not rule.could_match(inside, "billing")
    assert not rule.could_match(outside, "shop-api")


def test_shape_and_limits():
    rule = parse_rule({"name": "s", "shape": "abcd", "max_count": 2, "duration": "10m", "action": "close"})
    assert rule.matches("find", "a", "b", None, lambda: "abcd") and not rule.matches(
        "find", "a", "b", None, lambda: "x"
    )
    engine = FaultEngine(True)
    engine.add(rule)
    ip = ipaddress.ip_address("127.0.0.1")
    hits = [engine.decide(ip, "app", "find", "a", "b", None, lambda: "abcd") for _ in range(3)]
    assert hits == [rule, rule, None] and not engine.active
    assert rule.expires == pytest.approx(rule.added + 600)
    past = parse_rule({"name": "p", "until": "2001-01-01T00:00:00Z", "action": "close"})
    assert not past.live(time.time())


def test_disabled_engine_refuses_rules():
    with pytest.raises(RuleError, match="--allow-faults"):
        FaultEngine(False).add(parse_rule(EXAMPLE))


def test_toml_and_yaml_files(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[[rule]]\nname = "slow"\nop = "find"\naction = "delay"\nms = 300\n')
    yaml = tmp_path / "r.yaml"
    yaml.write_text("- name: slow\n  op: find\n  action: delay\n  ms: 300\n")
    assert [r.spec for r in load_rules_file(str(toml))] == [r.spec for r in load_rules_file(str(yaml))]


def test_a_bad_rules_file_keeps_the_previous_rules(tmp_path, caplog):
    path = tmp_path / "drill.toml"
    path.write_text('[[rule]]\nname = "slow"\nop = "find"\naction = "delay"\nms = 300\n')
    engine = FaultEngine(True, str(path))
    assert list(engine.rules) == ["slow"]
    path.write_text('[[rule]]\nname = "slow"\nop = "find"\naction = "delay"\nms = 300\npercentage = 150\n')
    engine.reload()
    assert list(engine.rules) == ["slow"] and engine.rules["slow"].percentage == 100
    assert "percentage must be from 0 to 100, got 150; keeping the previous 1 rule(s)" in caplog.text
    assert "percentage" in engine.listing()["file_error"]
    path.write_text('[[rule]]\nname = "fail"\nop = "insert"\naction = "error"\ncode = 91\n')
    os.utime(path, (time.time() + 5, time.time() + 5))
    engine.reload()
    assert list(engine.rules) == ["fail"] and "file_error" not in engine.listing()


def test_every_drill_playbook_file_loads():
    drills = sorted((Path(__file__).parents[2] / "deploy" / "drills").glob("*.toml"))
    assert [p.stem for p in drills] == [
        "failover",
        "flapping-network",
        "slow-reads",
        "stuck-aggregate",
        "throttled-link",
    ]
    actions = set()
    for path in drills:
        (rule,) = load_rules_file(str(path))
        assert rule.expires is not None or rule.max_count is not None  # every drill ends on its own
        assert f"mongoproxy fault rm {rule.name}" in path.read_text()
        actions.add(rule.action)
    assert actions == {"delay", "error", "close", "blackhole", "throttle"}
