"""`mongoproxy demo` without its extra names the install; the embedded server is never started."""

import importlib.util

import pytest

from mongoproxy import demo
from mongoproxy.errors import ConfigError


def test_missing_demo_extra_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "secantus" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'mongoproxy\[demo\]'"):
        demo.main(exit_after_workload=True)
    with pytest.raises(ConfigError, match=r"pip install 'mongoproxy\[demo\]'"):
        demo.EmbeddedServer().start()
