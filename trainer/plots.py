"""Learning curves PNG from metrics.jsonl: people would rather look than read."""

import importlib.util
import io
import json

import storage


def available() -> bool:
  return importlib.util.find_spec('matplotlib') is not None


def plot_learning_curves(workdir: str) -> str:
  """Writes `WORKDIR/learning_curves.png` (loss and accuracy vs step, train and test); returns its path."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  events = [json.loads(line) for line in storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines()
            if line.strip()]
  train = [e for e in events if e.get('kind') == 'train']
  test = [e for e in events if e.get('kind') == 'eval']
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
    ax.plot([e['step'] for e in train], [e[f'train_{key}'] for e in train], label=f'train {key}', alpha=0.8)
    ax.plot([e['step'] for e in test], [e[f'test_{key}'] for e in test], 'o-', label=f'test {key}')
    ax.set_xlabel('step')
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
  if test:
    ax_acc.set_title(f'final test accuracy {test[-1]["test_accuracy"]:.4f}')
  fig.tight_layout()
  path = storage.join(workdir, 'learning_curves.png')
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  storage.write_bytes(path, png.getvalue())
  plt.close(fig)
  return path
