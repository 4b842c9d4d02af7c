"""One harness under libFuzzer: `python -m tests.fuzz.child NAME [libFuzzer flags] CORPUS_DIR...`.

Run by `python -m tests.fuzz`; the code under test is imported inside atheris.instrument_imports so that
its Python branches guide the fuzzer.
"""

from __future__ import annotations

import importlib
import sys

import atheris

from tests.fuzz.registry import HARNESSES, INSTRUMENT, NOT_INSTRUMENTED


def main() -> None:
    """Import the harness with instrumentation and hand control to libFuzzer (which exits the process)."""
    name = sys.argv[1]
    with atheris.instrument_imports(include=list(INSTRUMENT[name]), exclude=list(NOT_INSTRUMENTED.get(name, ()))):
        module = importlib.import_module(HARNESSES[name][0])
    atheris.Setup([sys.argv[0], *sys.argv[2:]], module.test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
