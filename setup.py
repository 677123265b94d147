"""The optional native kernels (``src/layerwise/_native.c``), built beside the package as an empty
extension module whose functions ``layerwise._native`` calls through ctypes; every other setting is
in pyproject.toml. Without a working C compiler (or Python's headers) the package installs without
them: the default then runs torch's kernels, and ``compile=True`` builds them on first use."""

import hashlib
import sys
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "src/layerwise/_native.c"
unix = sys.platform != "win32"
kernels = Extension(
    "layerwise._native_kernels", [SOURCE], optional=True, py_limited_api=True,
    # The hash of the source: layerwise uses the library only while _native.c is the file it was built from.
    define_macros=[("LAYERWISE_EXTENSION", None), ("Py_LIMITED_API", "0x030A0000"),
                   ("LAYERWISE_SOURCE_SHA256", f'"{hashlib.sha256(Path(SOURCE).read_bytes()).hexdigest()}"')],
    # No multiply-add contracted by the compiler (the lerp's fused ones are explicit, to give torch's
    # bits; clang contracts by default); each vector ISA's instance is chosen in the source.
    extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"] if unix else [], libraries=["m"] if unix else [])
setup(ext_modules=[kernels], options={"bdist_wheel": {"py_limited_api": "cp310"}})
