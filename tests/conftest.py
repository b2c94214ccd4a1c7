"""Shared fixtures: repository paths, config loading, a compilation cache."""

import atexit
import os
import shutil
import tempfile

# Set before jax is imported, so that this process's XLA client and the CLI
# subprocesses that the tests start read it.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from capvae import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')

# Many tests compile the same small programs (in this process and in the CLI
# subprocesses they start). A compilation cache private to this test session
# compiles each once; it is removed when the session ends.
_CACHE = tempfile.mkdtemp(prefix='capvae-test-xla-cache-')
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
