"""The three architectures have the layers the papers describe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capvae import models


def _kernels(tree, kind):
  """Kernel shapes of the layers of ``kind`` (e.g. 'Dense'), in layer order."""
  layers = sorted((k for k in tree if k.startswith(kind + '_')),
                  key=lambda k: int(k.rsplit('_', 1)[1]))
  return [tuple(tree[k]['kernel'].shape) for k in layers]


def _init(name, m=10, shape=(64, 64, 1)):
  model = models.get(name, m, shape)
  x = jnp.zeros((2, *shape))
  params = model.init(jax.random.key(0), x, jax.random.key(1))
  return model, params, x


def test_burgess_layers():
  _, params, _ = _init('burgess')
  enc, dec = params['params']['encoder'], params['params']['decoder']
  assert _kernels(enc, 'Conv') == [(4, 4, 1, 32)] + [(4, 4, 32, 32)] * 3
  assert _kernels(enc, 'Dense') == [(512, 256), (256, 256), (256, 20)]
  assert _kernels(dec, 'Dense') == [(10, 256), (256, 256), (256, 512)]
  assert _kernels(dec, 'ConvTranspose') == [(4, 4, 32, 32)] * 3 + [(4, 4, 32, 1)]
  assert len(enc) == 7 and len(dec) == 7


def test_locatello_layers():
  _, params, _ = _init('locatello')
  enc, dec = params['params']['encoder'], params['params']['decoder']
  assert _kernels(enc, 'Conv') == [(4, 4, 1, 32), (4, 4, 32, 32), (2, 2, 32, 64),
                                   (2, 2, 64, 64)]
  assert _kernels(enc, 'Dense') == [(1024, 256), (256, 20)]
  assert _kernels(dec, 'Dense') == [(10, 256), (256, 1024)]
  assert _kernels(dec, 'ConvTranspose') == [(4, 4, 64, 64), (4, 4, 64, 32), (4, 4, 32, 32),
                                            (4, 4, 32, 1)]
  assert len(enc) == 6 and len(dec) == 6


def test_mlp_layers():
  _, params, _ = _init('mlp')
  enc, dec = params['params']['encoder'], params['params']['decoder']
  assert _kernels(enc, 'Dense') == [(4096, 1200), (1200, 1200), (1200, 20)]
  assert _kernels(dec, 'Dense') == [(10, 1200), (1200, 1200), (1200, 1200), (1200, 4096)]
  assert len(enc) == 3 and len(dec) == 4


@pytest.mark.parametrize('name', models.MODELS)
def test_shapes_and_reparameterisation(name):
  model, params, _ = _init(name, m=6)
  x = (jax.random.uniform(jax.random.key(2), (3, 64, 64, 1)) > 0.5).astype(jnp.float32)
  out, mean, logvar = model.apply(params, x, jax.random.key(3))
  assert out.shape == x.shape and mean.shape == (3, 6) and logvar.shape == (3, 6)
  # With the same key the sample, hence the output, is reproducible; with
  # another key it changes; decoding the mean directly gives the noiseless output.
  out2, _, _ = model.apply(params, x, jax.random.key(3))
  out3, _, _ = model.apply(params, x, jax.random.key(4))
  np.testing.assert_array_equal(out, out2)
  assert not np.allclose(out, out3)
  mean2, logvar2 = model.apply(params, x, method=model.encode)
  np.testing.assert_array_equal(mean, mean2)
  np.testing.assert_array_equal(logvar, logvar2)


def test_unknown_model_and_bad_shape():
  with pytest.raises(ValueError, match='allowed'):
    models.get('resnet', 10, (64, 64, 1))
  with pytest.raises(ValueError, match='divisible by 16'):
    models.get('burgess', 10, (60, 60, 1))
