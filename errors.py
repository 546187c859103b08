"""The one exception type that means "the user gave us something wrong".

`train.py` prints a `UserError` as a single line (no traceback) and exits 2; anything else is a bug and
keeps its traceback. Raise it with a message that says what is wrong *and* how to fix it.
"""


class UserError(Exception):
  """Bad config, flags, data files, checkpoints or topology: reported as one clear line."""
