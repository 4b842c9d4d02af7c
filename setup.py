"""Builds mongoproxy's C extensions; metadata lives in pyproject.toml.

Environment knobs:
  MONGOPROXY_CYTHON_ANNOTATE=1   write mongoproxy/<module>.html (cython -a)
  MONGOPROXY_CYTHON_TRACE=1      compile with line tracing (profilers, coverage)
"""

import os

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The body scanner; the tracker (cimports the scanner); the tap's per-chunk fast path (cimports both);
# the metrics sink's histograms and the digest's counting (both cimport the tracker's CommandEvent).
MODULES = ("_bson_parser", "tracker", "_tap", "sinks._series", "_digest")

directives = {
    "language_level": 3,
    # Every read checks its length explicitly; no global boundscheck(False).
    "embedsignature": True,
}
macros = []
if os.environ.get("MONGOPROXY_CYTHON_TRACE") == "1":
    directives["linetrace"] = True
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

try:
    from Cython.Build import cythonize
except ImportError:  # building from an sdist that ships the generated C
    cythonize = None


def _extension(name: str, source: str) -> Extension:
    return Extension(f"mongoproxy.{name}", [source], extra_compile_args=["-O2", "-Wall"], define_macros=macros)


pyx = [os.path.join("mongoproxy", *m.split(".")) + ".pyx" for m in MODULES]
if cythonize is not None and all(os.path.exists(os.path.join(HERE, p)) for p in pyx):
    ext_modules = cythonize(
        [_extension(m, p) for m, p in zip(MODULES, pyx)],
        compiler_directives=directives,
        annotate=os.environ.get("MONGOPROXY_CYTHON_ANNOTATE") == "1",
    )
else:
    ext_modules = [_extension(m, p[: -len(".pyx")] + ".c") for m, p in zip(MODULES, pyx)]

setup(ext_modules=ext_modules)
