"""Builds mongoproxy's one C extension; metadata lives in pyproject.toml.

Environment knobs:
  MONGOPROXY_CYTHON_ANNOTATE=1   write mongoproxy/_bson_parser.html (cython -a)
  MONGOPROXY_CYTHON_TRACE=1      compile with line tracing (profilers, coverage)
"""

import os

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = os.path.join("mongoproxy", "_bson_parser.pyx")
C_SRC = os.path.join("mongoproxy", "_bson_parser.c")

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

if cythonize is not None and os.path.exists(os.path.join(HERE, PYX)):
    ext_modules = cythonize(
        [Extension("mongoproxy._bson_parser", [PYX], extra_compile_args=["-O2", "-Wall"], define_macros=macros)],
        compiler_directives=directives,
        annotate=os.environ.get("MONGOPROXY_CYTHON_ANNOTATE") == "1",
    )
else:
    ext_modules = [
        Extension("mongoproxy._bson_parser", [C_SRC], extra_compile_args=["-O2", "-Wall"], define_macros=macros)
    ]

setup(ext_modules=ext_modules)
