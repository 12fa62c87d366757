# setuptools needs setup.py for cffi_modules; all other metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["csrc/kvm_build.py:ffibuilder", "csrc/dataplane_build.py:ffibuilder"])
