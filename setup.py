"""The one compiled part of livemig: post-copy's fault path (src/livemig/native/faultpath.c).

Everything else is in pyproject.toml. Needs gcc, the Python headers and zlib's (zlib1g-dev).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "livemig._faultpath",
            ["src/livemig/native/faultpath.c"],
            libraries=["z"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
