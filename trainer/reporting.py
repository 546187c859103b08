"""What a run tells the user: log lines, `metrics.jsonl`, TensorBoard events (`config.json`: `workdir.py`).

Only process 0 writes. On resume, `metrics.jsonl` drops the lines past the restored step (they describe
steps that are being redone), so the file always reads as one consistent run; a torn line (a process killed
mid-write) is dropped too, with a warning.
"""

import json
import logging as logging_std
import os
import sys
import time

from absl import logging

import storage
from errors import UserError


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class Reporter:
  """Writes metrics events; every method is a no-op off process 0 (except for returning text)."""

  def __init__(self, workdir: str, is_main: bool, start_step: int):
    self.is_main = is_main
    self.path = storage.join(workdir, 'metrics.jsonl')
    self._writer = None
    self._events, self._events_url = None, None
    if not is_main:
      return
    if storage.exists(self.path) and not storage.isfile(self.path):
      raise UserError(f'{self.path} is not a file: move it out of the way (the run appends its metrics there), '
                      'or choose another --workdir')
    self._truncate_after(start_step)
    try:
      from clu import metric_writers  # TensorBoard event files (clu writes them with TensorFlow).
    except ImportError as e:  # A lean accelerator host: metrics.jsonl alone.
      _say_once(f'TensorBoard events are off ({e.__class__.__name__}: {e}); metrics.jsonl has every event. '
                'Install tensorflow and clu to get them.')
      return
    events = storage.join(workdir, 'tensorboard')
    if storage.is_url(workdir):
      # tf.summary writes through tf.io.gfile, whose Cloud Storage endpoint is compiled in: events are written to
      # the local cache and uploaded to the bucket after each write (the bucket always holds them).
      self._events, self._events_url = storage.cache_dir(workdir, 'tensorboard'), events
      events = self._events
    self._writer = metric_writers.SummaryWriter(events)

  def _truncate_after(self, step: int) -> None:
    if not storage.exists(self.path):
      return
    lines = []
    for number, line in enumerate(storage.read_text(self.path).splitlines(keepends=True), 1):
      try:
        event = json.loads(line) if line.strip() else None
      except ValueError:
        logging.warning('%s line %d is not JSON (torn by a killed run?): dropped.', self.path, number)
        continue
      if isinstance(event, dict) and event.get('step', 0) <= step:
        lines.append(line if line.endswith('\n') else line + '\n')
    storage.write_text(self.path, ''.join(lines))  # Atomic: a kill here leaves the old file or the new one.

  def write(self, event: dict) -> None:
    """Appends one event to metrics.jsonl and its numbers to TensorBoard."""
    if not self.is_main:
      return
    event = dict(event, time=round(time.time(), 3))
    storage.append_text(self.path, json.dumps(event) + '\n')
    scalars = {k: v for k, v in event.items() if k not in ('step', 'time', 'kind') and isinstance(v, (int, float))}
    if self._writer is not None:
      self._writer.write_scalars(event['step'], scalars)
    if self._events is not None:
      self._writer.flush()
      storage.upload_tree(self._events, self._events_url)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      if self._events is not None:
        storage.upload_tree(self._events, self._events_url)


_SAID = set()


def _say_once(line: str) -> None:
  """A warning printed once per process (a feature turned off for want of a library)."""
  if line not in _SAID:
    _SAID.add(line)
    logging.warning('%s', line)


class Throughput:
  """Images/sec, share of time waiting for input, and ETA over the window since the last report.

  Time spent in eval and checkpoint saves is excluded (`exclude`), so img/s describes training alone.
  """

  def __init__(self, start_step: int, total_steps: int, global_batch: int):
    self.total_steps, self.global_batch = total_steps, global_batch
    self._t, self._step, self._wait, self._excluded = time.perf_counter(), start_step, 0.0, 0.0

  def window(self, step: int, wait_s_total: float) -> dict:
    now = time.perf_counter()
    dt, steps = max(now - self._t - self._excluded, 1e-9), step - self._step
    out = {'images_per_sec': round(steps * self.global_batch / dt, 1),
           'input_wait_share': round(min((wait_s_total - self._wait) / dt, 1.0), 4),
           'eta_s': round((self.total_steps - step) * dt / max(steps, 1), 1)}
    self._t, self._step, self._wait, self._excluded = now, step, wait_s_total, 0.0
    return out

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an eval, a checkpoint save) out of the current window."""
    self._excluded += seconds


def train_line(event: dict, total_steps: int) -> str:
  return (f'step {event["step"]}/{total_steps}  epoch {event["epoch"]:.2f}  loss {event["train_loss"]:.4f}  '
          f'acc {event["train_accuracy"]:.4f}  {event["images_per_sec"]:.0f} img/s  '
          f'input wait {100 * event["input_wait_share"]:.1f}%  ETA {_fmt_duration(event["eta_s"])}')


def eval_line(event: dict) -> str:
  return (f'eval  step {event["step"]}  epoch {event["epoch"]:.2f}  test loss {event["test_loss"]:.4f}  '
          f'test acc {event["test_accuracy"]:.4f}  ({event["test_examples"]} examples)')


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO chatter of Orbax, TensorFlow and the storage clients (dozens of lines per checkpoint); warnings
  pass, without the tracebacks they carry unless `keep_tracebacks` (--verbose): a failure the trainer reports
  as one `error:` line (a failed save, a lost storage server) must not also print a page of library traceback."""
  keep_tracebacks = False

  def filter(self, record):
    if (record.name == 'asyncio' and not self.keep_tracebacks
        and 'exception was never retrieved' in str(record.msg)):  # Orbax's failed-save futures, collected late.
      return False
    noisy = any(f'{os.sep}{lib}{os.sep}' in record.pathname
                for lib in ('orbax', 'tensorflow', 'etils', 'fsspec', 'gcsfs', 's3fs'))
    if noisy and record.exc_info and not self.keep_tracebacks:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging_std.WARNING or not noisy


_FILTER = _LibraryInfoFilter()


def _late_callback(kind, value) -> bool:
  """After a failed save, tensorstore's C++ callbacks report (PyErr_Print / PyErr_WriteUnraisable) one 'Event
  loop is closed' traceback per pending write: the save is reported as one line, so these only go to the log."""
  if kind is RuntimeError and 'Event loop is closed' in str(value):
    logging.debug('Late tensorstore callback after a failed save: %s', value)
    return True
  return False


def _excepthook(kind, value, tb):
  if not _late_callback(kind, value):
    sys.__excepthook__(kind, value, tb)


def _unraisablehook(unraisable):
  if not _late_callback(unraisable.exc_type, unraisable.exc_value):
    sys.__unraisablehook__(unraisable)


def quiet_library_logs(keep_tracebacks: bool | None = None) -> None:
  """Installs the filter once (idempotent); `keep_tracebacks` (when given) sets whether library warnings keep
  their tracebacks."""
  if keep_tracebacks is not None:
    _FILTER.keep_tracebacks = keep_tracebacks
    if not keep_tracebacks and sys.excepthook is sys.__excepthook__:
      sys.excepthook, sys.unraisablehook = _excepthook, _unraisablehook
  for target in [logging_std.getLogger()] + logging_std.getLogger().handlers:
    if _FILTER not in target.filters:
      target.addFilter(_FILTER)


def log(line: str, is_main: bool) -> None:
  if is_main:
    logging.info('%s', line)
