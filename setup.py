"""Builds the compiled modules (the map core, the Redis command packer);
everything else is declared in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# CAF_SHARING_DEBUG=1 keeps bounds checks and line tracing for profiling.
debug = os.environ.get("CAF_SHARING_DEBUG") == "1"

extensions = [
    Extension(
        name,
        [source],
        extra_compile_args=["-O3"] if not debug else ["-O0", "-g"],
        define_macros=[("CYTHON_TRACE", "1")] if debug else [],
    )
    for name, source in [
        ("caf_sharing._fastmap", "src/caf_sharing/_fastmap.pyx"),
        ("caf_sharing.backends.redis._resp", "src/caf_sharing/backends/redis/_resp.pyx"),
    ]
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={
            "boundscheck": debug,
            "wraparound": debug,
            "cdivision": True,
            "embedsignature": True,
            "linetrace": debug,
        },
    )
)
