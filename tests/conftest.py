"""Shared fixtures: repository paths, config loading, a compilation cache."""

import atexit
import os
import shutil
import tempfile

# The suite's time is mostly XLA's CPU compiler on programs that then run a few
# steps: the tests compile with LLVM at optimisation level 0 (the same HLO and
# fusion decisions; configs/test.py's train step compiles in 5.6 s, against
# 10.1 s by default). Benchmarks and runs use XLA's defaults. Not also XLA's
# classic fusion emitters (--xla_cpu_use_fusion_emitters=false, 3.8 s): with
# them a member's bits depend on the program it runs in, which the sweep's
# contract forbids (tests/test_sweep.py fails). Set before jax is imported, so
# that this process's XLA client and the CLI subprocesses that the tests start
# read it; a flag already in XLA_FLAGS is left as it is.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from capvae import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')

# Many tests compile the same small programs (in this process, in the CLI
# subprocesses they start, and in pytest-xdist's other workers). A compilation
# cache private to this test session compiles each once. The process that
# makes it (pytest, or xdist's controller, which starts the workers with it in
# their environment) removes it when the session ends.
_CACHE = os.environ.get('CAPVAE_TEST_XLA_CACHE')
if not _CACHE:
  _CACHE = tempfile.mkdtemp(prefix='capvae-test-xla-cache-')
  os.environ['CAPVAE_TEST_XLA_CACHE'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def load_config(name):
  return config_lib.sibling(os.path.join(CONFIGS, 'x.py'), name).get_config()


@pytest.fixture
def test_config():
  return load_config('test')


# The fixtures that train a run for a whole module are session-scoped: pytest
# tears a module-scoped fixture down whenever a worker runs a test of another
# module in between, and under pytest-xdist that happens (test_report's sweep
# was trained and evaluated three times). Their xdist group keeps each
# module's tests on one worker, so each is made once.


def pytest_collection_modifyitems(items):
  """The xdist groups (modules whose shared fixture trains a run, minutes of
  work each) first, so that the workers start on them and the short tests
  fill in around them, rather than one group being handed out last."""
  grouped = lambda item: item.get_closest_marker('xdist_group') is not None
  items[:] = [i for i in items if grouped(i)] + [i for i in items if not grouped(i)]
