"""Builds the Cython fast path. BROKER_NO_EXTENSIONS=1 installs the pure-Python package only."""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("BROKER_NO_EXTENSIONS", "").strip().lower() not in ("1", "true", "yes", "on"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension("broker._fastpath", ["broker/_fastpath.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3"},
        annotate=os.environ.get("BROKER_CYTHON_ANNOTATE") == "1",
    )

setup(ext_modules=ext_modules)
