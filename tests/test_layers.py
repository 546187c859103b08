"""Layers import one way: no import cycles (function-level imports included), no upward imports, and the
library layers (`models/`, `input_pipeline/`) never spell a command-line flag (they name settings through
`errors.setting`, so the front end decides the wording).

The walk reads the source (ast), imports nothing, and resolves `from P import M` to the module `P.M` where
that file exists.
"""

import ast
import os
import re

from tests.harness import ROOT

# Which top-level parts of the project each part may import (besides itself). Everything else is upward.
BASE = {'errors', 'paths', 'libenv', 'plugins'}
ALLOWED = {
    'errors': set(),
    'paths': {'errors'},
    'libenv': set(),
    'plugins': {'errors'},  # Resolves MODULE:ATTR config values for every layer.
    'storage': {'errors', 'paths'},
    'configs': set(),
    'models': {'errors', 'plugins', 'cpu_kernels'},  # Only the factory (models/__init__.py) plugs the kernels in.
    'cpu_kernels': {'errors'},
    'input_pipeline': BASE | {'storage'},
    'parallel': BASE | {'models', 'cpu_kernels'},
    'trainer': BASE | {'storage', 'models', 'cpu_kernels', 'input_pipeline', 'parallel', 'configs'},
}
SKIP_DIRS = {'.git', 'tests', 'benchmarks', 'docs', 'runs', 'build'}  # Entry points and tests may import anything.


def _project_files():
  for entry in sorted(os.listdir(ROOT)):
    path = os.path.join(ROOT, entry)
    if entry.endswith('.py'):
      yield entry[:-3], path
    elif (os.path.isdir(path) and entry not in SKIP_DIRS and not entry.startswith('.')
          and os.path.isfile(os.path.join(path, '__init__.py'))):
      for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(('.', '__')))
        for name in sorted(filenames):
          if name.endswith('.py'):
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].split(os.sep)
            yield '.'.join(rel[:-1] if rel[-1] == '__init__' else rel), os.path.join(dirpath, name)


def _graph():
  files = dict(_project_files())
  tops = {m.split('.')[0] for m in files} | {'tests', 'benchmarks'}
  graph = {}
  for module, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in files else node.module for a in node.names]
      else:
        continue
      edges |= {n for n in names if n.split('.')[0] in tops and n != module}
    graph[module] = edges
  return graph


def _cycles(graph):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_walk_sees_the_project():
  graph = _graph()
  assert 'parallel.steps' in graph and 'trainer.loop' in graph and 'input_pipeline.sources' in graph
  assert 'parallel.mesh' in graph['parallel.state']  # An edge it must find.


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_cycle_detection_can_fail():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_upward_imports():
  upward = []
  for module, edges in sorted(_graph().items()):
    top = module.split('.')[0]
    allowed = ALLOWED.get(top)
    if allowed is None:  # train.py and other entry points.
      continue
    upward += [f'{module} -> {e}' for e in sorted(edges) if e.split('.')[0] not in allowed | {top}]
  assert upward == []


FLAG = re.compile(r'--(config\.|workdir|platform|num_cpu_devices|num_processes|process_id|coordinator)')


def test_models_and_input_pipeline_never_spell_a_flag():
  spelled = []
  for module, path in _project_files():
    if module.split('.')[0] in ('models', 'input_pipeline'):
      with open(path) as f:
        spelled += [f'{module}:{n}' for n, line in enumerate(f, 1) if FLAG.search(line)]
  assert spelled == []
