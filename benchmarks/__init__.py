"""Benchmark scripts, run as `python -m benchmarks.NAME` from the checkout.

Importing the package first sets the native libraries' quiet defaults (`libenv`), so no benchmark prints
TensorFlow's CPU-dependent start-up notices (`--verbose` keeps them).
"""

import sys

import libenv

libenv.set_defaults(verbose=libenv.verbose_in(sys.argv))
