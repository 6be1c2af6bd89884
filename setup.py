"""Build script.

The package metadata lives in pyproject.toml. This file exists so that the optional CUDA C++
extension (``reft_kernels._C``, sources in ``csrc/``) can be added to ``ext_modules`` here; until
then the package is pure Python and installs anywhere torch does.
"""
from setuptools import setup

setup()
