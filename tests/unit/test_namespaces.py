"""Namespace patterns shared by --log-ns and --record-ns."""

import pytest

from mongoproxy.errors import ConfigError
from mongoproxy.namespaces import NamespaceFilter, ns_list_parser


def test_patterns_match_exact_wildcard_and_database():
    f = NamespaceFilter(("shop.orders", "audit.*", "metrics"))
    assert f("shop", "orders") and f("audit", "anything") and f("metrics", "") and f("metrics", "x")
    assert not f("shop", "users") and not f("shop", "") and not f("other", "orders")
    assert not NamespaceFilter(()) and f


def test_parser_names_the_flag():
    parse = ns_list_parser("--record-ns")
    assert parse("shop.orders, audit.* ,,metrics") == ("shop.orders", "audit.*", "metrics")
    assert parse(["a.b"]) == ("a.b",)
    with pytest.raises(ConfigError, match="--record-ns '.orders'"):
        parse(".orders")
