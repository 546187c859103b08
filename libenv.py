"""Environment for the native libraries we load (TensorFlow, absl's C++ logging, gRPC), set before they load.

TensorFlow reads these once, at import, and prints start-up notices to stderr that depend on the CPU model
(on CPUs with AVX-512 VNNI or AMX: "oneDNN custom operations are on ...", preceded by absl's "All log
messages before absl::InitializeLog() ..."). A user's first screen, and any test that reads stderr, must
not depend on which CPU it ran on, so every entry point (train.py, `benchmarks/`, the tests) calls
`set_defaults()` first. `--verbose` keeps the notices.

`TF_ENABLE_ONEDNN_OPTS=0` also makes TensorFlow's own ops take the same code path on every CPU model (the
oneDNN custom ops are on by default only on some CPUs). The trainer's math runs in XLA, not TensorFlow;
tf.data only decodes and augments, so this costs nothing measurable there. A value the user set wins.
"""

import os
from collections.abc import Sequence

QUIET = {
    'TF_CPP_MIN_LOG_LEVEL': '2',     # TensorFlow's C++ INFO and WARNING lines.
    'TF_ENABLE_ONEDNN_OPTS': '0',    # The CPU-model-dependent oneDNN notice (and code path), see above.
    'GRPC_VERBOSITY': 'ERROR',       # gRPC (TensorFlow's, the JAX coordination service's) INFO lines.
}


def set_defaults(verbose: bool = False) -> None:
  """Sets the `QUIET` variables the user has not set; with `verbose`, leaves the libraries' defaults."""
  if verbose:
    return
  for name, value in QUIET.items():
    os.environ.setdefault(name, value)


def verbose_in(argv: Sequence[str]) -> bool:
  """Whether `argv` asks for --verbose, read as absl would (the last occurrence wins), before flags parse."""
  value = False
  for arg in argv:
    if arg in ('--verbose', '--noverbose'):
      value = arg == '--verbose'
    elif arg.startswith('--verbose='):
      value = arg.split('=', 1)[1].lower() in ('1', 'true', 't', 'yes', 'y')
  return value
