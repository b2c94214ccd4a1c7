"""Shared fixtures: repository paths and config loading."""

import os

import pytest
from capvae import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')


def load_config(name):
  return config_lib.sibling(os.path.join(CONFIGS, 'x.py'), name).get_config()


@pytest.fixture
def test_config():
  return load_config('test')
