"""`mongoproxy init-iptables` without touching the kernel: the exact rules, dry-run output, and one-line errors.

tests/system/test_init_iptables.py runs the same commands for real in a network namespace.
"""

from __future__ import annotations

import subprocess

import pytest

from mongoproxy import cli, iptables
from mongoproxy.errors import ConfigError, StartupError


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["init-iptables", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "text,expected",
    [
        ("27017", ("27017",)),
        ("27017,27018", ("27017", "27018")),
        (" 27017 , 27018 ,27017", ("27017", "27018")),
        ("27017-27019,28000", ("27017:27019", "28000")),
        ("27017:27019", ("27017:27019",)),
    ],
)
def test_port_lists(text, expected):
    assert iptables.parse_port_list(text) == expected


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "is empty"),
        ("abc", "not a port or a range"),
        ("27017,70000", "out of range"),
        ("27019-27017", "from low to high"),
        ("0", "out of range"),
    ],
)
def test_port_list_errors_are_one_line(text, needle):
    with pytest.raises(ConfigError) as err:
        iptables.parse_port_list(text)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_port_in_ranges():
    ports = ("27017", "28000:28010")
    assert iptables.port_in(27017, ports) and iptables.port_in(28005, ports)
    assert not iptables.port_in(27018, ports) and not iptables.port_in(28011, ports)


def test_install_plan_is_exactly_these_commands():
    steps = iptables.plan(iptables.Rules(proxy_port=27111, mongo_ports=("27017", "27018"), proxy_uid=9999))
    assert [s.shell() for s in steps] == [
        "iptables -w 10 -t nat -N MONGOPROXY_OUTPUT 2>/dev/null || true",
        "iptables -w 10 -t nat -F MONGOPROXY_OUTPUT",
        "iptables -w 10 -t nat -A MONGOPROXY_OUTPUT -m owner --uid-owner 9999 -j RETURN",
        "iptables -w 10 -t nat -A MONGOPROXY_OUTPUT -o lo -p tcp --dport 27111 -j RETURN",
        "iptables -w 10 -t nat -A MONGOPROXY_OUTPUT -p tcp -m multiport --dports 27017,27018 -j REDIRECT "
        "--to-ports 27111",
        "iptables -w 10 -t nat -C OUTPUT -p tcp -j MONGOPROXY_OUTPUT 2>/dev/null || "
        "iptables -w 10 -t nat -I OUTPUT 1 -p tcp -j MONGOPROXY_OUTPUT",
    ]


def test_uninstall_plan_removes_every_jump_then_the_chain():
    steps = iptables.plan(iptables.Rules(ipv6=True), uninstall=True, backend="legacy")
    expected = []
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        base = f"{tool} -w 10 -t nat"
        expected += [
            f"while {base} -C OUTPUT -p tcp -j MONGOPROXY_OUTPUT 2>/dev/null; do "
            f"{base} -D OUTPUT -p tcp -j MONGOPROXY_OUTPUT; done",
            f"{base} -F MONGOPROXY_OUTPUT 2>/dev/null || true",
            f"{base} -X MONGOPROXY_OUTPUT 2>/dev/null || true",
        ]
    assert [s.shell() for s in steps] == expected


def test_ipv6_repeats_the_rules_with_ip6tables():
    steps = iptables.plan(iptables.Rules(ipv6=True))
    tools = [s.argv[0] for s in steps]
    assert tools == ["iptables"] * 6 + ["ip6tables"] * 6
    assert [s.argv[1:] for s in steps[:6]] == [s.argv[1:] for s in steps[6:]]


def test_many_ports_are_split_for_multiport():
    ports = tuple(str(p) for p in range(27000, 27020)) + ("28000:28009",)
    rules = iptables.chain_rules(iptables.Rules(mongo_ports=ports))
    redirects = [r for r in rules if "REDIRECT" in r]
    covered = []
    for r in redirects:
        listed = r[r.index("--dports") + 1].split(",")
        assert sum(2 if ":" in p else 1 for p in listed) <= iptables.MULTIPORT_MAX
        covered += listed
    assert tuple(covered) == ports
    assert len(redirects) == 2


def test_proxy_port_inside_mongo_ports_is_refused(capsys):
    code, out, err = run_cli(capsys, "--proxy-port", "27018", "--mongo-ports", "27017-27019", "--dry-run")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "choose a proxy port outside" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--proxy-uid", "0"], "non-root uid"),
        (["--proxy-uid", "proxy"], "numeric uid"),
        (["--mongo-ports", "mongo"], "not a port or a range"),
        (["--proxy-port", "99999"], "out of range"),
    ],
)
def test_bad_flags_get_one_line(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv, "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err


def test_dry_run_prints_a_runnable_script(capsys):
    code, out, err = run_cli(capsys, "--dry-run", "--mongo-ports", "27017,27018", "--ipv6")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("# ") and len(lines) == 13
    syntax = subprocess.run(["sh", "-n"], input=out, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    code, out, _ = run_cli(capsys, "--dry-run", "--uninstall")
    assert code == 0 and "-X MONGOPROXY_OUTPUT" in out


def test_missing_iptables_binary_is_one_line(tmp_path):
    steps = iptables.install_steps(str(tmp_path / "iptables"), iptables.Rules())
    with pytest.raises(StartupError) as err:
        iptables.Runner().execute(steps)
    assert "not found: install the iptables package" in str(err.value)


def test_failing_command_is_reported_with_its_message(tmp_path):
    """A real command that fails (not a permission problem) names itself and iptables' message."""
    fake = tmp_path / "iptables"
    fake.write_text("#!/bin/sh\necho \"iptables v1.8.9: Couldn't load match \\`owner'\" >&2\nexit 2\n")
    fake.chmod(0o755)
    with pytest.raises(StartupError) as err:
        iptables.Runner().execute(iptables.install_steps(str(fake), iptables.Rules()))
    msg = str(err.value)
    assert "-F MONGOPROXY_OUTPUT failed: iptables v1.8.9: Couldn't load match `owner'" in msg and "\n" not in msg


def test_permission_denied_names_net_admin(tmp_path):
    fake = tmp_path / "iptables"
    fake.write_text(
        "#!/bin/sh\necho 'iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: "
        "Permission denied (you must be root)' >&2\nexit 4\n"
    )
    fake.chmod(0o755)
    with pytest.raises(StartupError) as err:
        iptables.Runner().execute(iptables.install_steps(str(fake), iptables.Rules()))
    assert str(err.value) == iptables.NO_NET_ADMIN


@pytest.mark.parametrize(
    "capeff,expected",
    [("0000000000001000", True), ("00000000a80435fb", True), ("0000000000000000", False), ("00000000a80425fb", False)],
)
def test_net_admin_is_read_from_capeff(tmp_path, capeff, expected):
    """a80425fb is Docker's default set (no NET_ADMIN); a80435fb adds it."""
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{capeff}\n")
    assert iptables.has_net_admin(str(status)) is expected
    assert iptables.has_net_admin(str(tmp_path / "missing")) is None
