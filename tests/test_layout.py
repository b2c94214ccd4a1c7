"""The package's layout: which module may reach into which.

The modules below the training loop (losses, workdir, evaluation, the report,
extraction) must not import ``capvae.train``, and no module reads another's
private (underscore) names: each responsibility has one home, and its public
names are what the others use.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'capvae')
# Only the entry point and the loop itself may import the loop.
MAY_IMPORT_TRAIN = {'main.py', 'train.py'}


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith('.py'):
        path = os.path.join(root, f)
        yield os.path.relpath(path, PACKAGE), ast.parse(open(path).read(), path)


def _capvae_aliases(tree):
  """``{alias: module}`` of every ``capvae`` module this file imports."""
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('capvae'):
      for a in node.names:
        out[a.asname or a.name] = f'{node.module}.{a.name}'
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith('capvae'):
          out[a.asname or a.name] = a.name
  return out


@pytest.mark.parametrize('name,tree', list(_modules()), ids=lambda v: v if isinstance(v, str) else '')
def test_no_module_below_the_loop_imports_it_or_reads_private_names(name, tree):
  aliases = _capvae_aliases(tree)
  if os.path.basename(name) not in MAY_IMPORT_TRAIN:
    assert 'capvae.train' not in aliases.values(), f'{name} imports capvae.train'
  private = [f'{n.value.id}.{n.attr}' for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
             and n.value.id in aliases and n.attr.startswith('_') and not n.attr.startswith('__')]
  assert not private, f'{name} reads private names of other modules: {private}'
