# setuptools reads cffi's `cffi_modules` only from setup.py, so this shim stays; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
