"""The three architectures have the layers the papers describe."""

import re

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


def _init(name, m=10, shape=(64, 64, 1), shapes_only=False):
  """``(model, params, x)``; with ``shapes_only`` the parameters' shapes (``jax.eval_shape``)."""
  model = models.get(name, m, shape)
  x = jnp.zeros((2, *shape))
  init = (lambda f, *a: jax.eval_shape(f, *a)) if shapes_only else (lambda f, *a: jax.jit(f)(*a))
  params = init(model.init, jax.random.key(0), x, jax.random.key(1))
  return model, params, x


def _apply(model, method=None, static=()):
  """``model.apply`` (of ``method``) compiled as one program, as the step runs it."""
  return jax.jit(lambda *a, **kw: model.apply(*a, method=method, **kw), static_argnames=static)


def test_burgess_layers():
  _, params, _ = _init('burgess', shapes_only=True)
  enc, dec = params['params']['encoder'], params['params']['decoder']
  assert _kernels(enc, 'Conv') == [(4, 4, 1, 32)] + [(4, 4, 32, 32)] * 3
  assert _kernels(enc, 'Dense') == [(512, 256), (256, 256), (256, 20)]
  assert _kernels(dec, 'Dense') == [(10, 256), (256, 256), (256, 512)]
  assert _kernels(dec, 'ConvTranspose') == [(4, 4, 32, 32)] * 3 + [(4, 4, 32, 1)]
  assert len(enc) == 7 and len(dec) == 7


def test_locatello_layers():
  _, params, _ = _init('locatello', shapes_only=True)
  enc, dec = params['params']['encoder'], params['params']['decoder']
  assert _kernels(enc, 'Conv') == [(4, 4, 1, 32), (4, 4, 32, 32), (2, 2, 32, 64),
                                   (2, 2, 64, 64)]
  assert _kernels(enc, 'Dense') == [(1024, 256), (256, 20)]
  assert _kernels(dec, 'Dense') == [(10, 256), (256, 1024)]
  assert _kernels(dec, 'ConvTranspose') == [(4, 4, 64, 64), (4, 4, 64, 32), (4, 4, 32, 32),
                                            (4, 4, 32, 1)]
  assert len(enc) == 6 and len(dec) == 6


def test_mlp_layers():
  _, params, _ = _init('mlp', shapes_only=True)
  enc, dec = params['params']['encoder'], params['params']['decoder']
  assert _kernels(enc, 'Dense') == [(4096, 1200), (1200, 1200), (1200, 20)]
  assert _kernels(dec, 'Dense') == [(10, 1200), (1200, 1200), (1200, 1200), (1200, 4096)]
  assert len(enc) == 3 and len(dec) == 4


@pytest.mark.parametrize('name', models.MODELS)
def test_shapes_and_reparameterisation(name):
  model, params, _ = _init(name, m=6)
  x = (jax.random.uniform(jax.random.key(2), (3, 64, 64, 1)) > 0.5).astype(jnp.float32)
  apply = _apply(model)
  out, mean, logvar = apply(params, x, jax.random.key(3))
  assert out.shape == x.shape and mean.shape == (3, 6) and logvar.shape == (3, 6)
  # With the same key the sample, hence the output, is reproducible; with
  # another key it changes; decoding the mean directly gives the noiseless output.
  out2, _, _ = apply(params, x, jax.random.key(3))
  out3, _, _ = apply(params, x, jax.random.key(4))
  np.testing.assert_array_equal(out, out2)
  assert not np.allclose(out, out3)
  mean2, logvar2 = _apply(model, model.encode)(params, x)
  np.testing.assert_array_equal(mean, mean2)
  np.testing.assert_array_equal(logvar, logvar2)


@pytest.mark.parametrize('name', models.MODELS)
def test_with_noise_is_the_call_with_its_draw_given(name):
  model, params, _ = _init(name, m=6)
  x = (jax.random.uniform(jax.random.key(2), (3, 64, 64, 1)) > 0.5).astype(jnp.float32)
  mean, _ = _apply(model, model.encode)(params, x)
  key = jax.random.key(5)
  out, _, _ = _apply(model)(params, x, key)
  eps = jax.random.normal(key, mean.shape)
  with_noise = _apply(model, model.with_noise)
  out2, _, _ = with_noise(params, x, eps)
  # Two programs, so float rounding may differ; another draw would move every pixel.
  np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-5)
  assert not np.allclose(with_noise(params, x, -eps)[0], out, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize('name', models.MODELS)
def test_xla_layers_compute_the_matmul_layers_function(name):
  """``impl='xla'`` (GPU and TPU) and ``'matmul'`` (CPU) are one model: the same
  parameters from the same key, and the same outputs and gradients."""
  shape = (64, 64, 1)
  x = (jax.random.uniform(jax.random.key(2), (3, *shape)) > 0.5).astype(jnp.float32)
  key = jax.random.key(3)
  out = {}
  for impl in ('matmul', 'xla'):
    model = models.get(name, 6, shape, impl=impl)
    params = jax.jit(model.init)(jax.random.key(0), x, jax.random.key(1))
    loss = lambda p: jnp.sum(jnp.sin(model.apply(p, x, key)[0])) + jnp.sum(
        model.apply(p, x, method=model.encode)[0] ** 2)
    out[impl] = params, jax.jit(jax.value_and_grad(loss))(params)
  (p_m, (l_m, g_m)), (p_x, (l_x, g_x)) = out['matmul'], out['xla']
  for a, b in zip(jax.tree.leaves(p_m), jax.tree.leaves(p_x)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(l_x, l_m, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_m)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
  with pytest.raises(ValueError, match="impl 'cudnn' is unknown"):
    models.get(name, 6, shape, impl='cudnn')


def test_unknown_model_and_bad_shape():
  with pytest.raises(ValueError, match='allowed'):
    models.get('resnet', 10, (64, 64, 1))
  with pytest.raises(ValueError, match='divisible by 16'):
    models.get('burgess', 10, (60, 60, 1))


# ---------------------------------------------------------------------------
# capvae.layers: the same function and parameters as Flax's convolutions.
# ---------------------------------------------------------------------------

import flax.linen as nn  # noqa: E402
from capvae import layers  # noqa: E402


@pytest.mark.parametrize('ref, fast, shape', [
    (nn.Conv(32, (4, 4), (2, 2), padding='SAME'), layers.Conv(32, (4, 4), (2, 2)), (3, 64, 64, 1)),
    (nn.Conv(32, (4, 4), (2, 2), padding='SAME'), layers.Conv(32, (4, 4), (2, 2)), (2, 8, 8, 32)),
    (nn.Conv(64, (2, 2), (2, 2), padding='SAME'), layers.Conv(64, (2, 2), (2, 2)), (2, 16, 16, 32)),
    (nn.Conv(8, (3, 3), (1, 1), padding='SAME'), layers.Conv(8, (3, 3), (1, 1)), (2, 7, 5, 3)),
    (nn.Conv(4, (3, 2), (1, 1), padding='SAME'), layers.Conv(4, (3, 2), (1, 1)), (2, 6, 5, 8)),
    (nn.Conv(16, (4, 4), (2, 2), padding='SAME'), layers.Conv(16, (4, 4), (2, 2)), (2, 10, 6, 8)),
    (nn.Conv(8, (3, 3), (2, 2), padding='SAME'), layers.Conv(8, (3, 3), (2, 2), impl='xla'),
     (2, 9, 8, 3)),
    (nn.Conv(32, (4, 4), (2, 2), padding='SAME'), layers.Conv(32, (4, 4), (2, 2), impl='xla'),
     (3, 64, 64, 1)),
    (nn.ConvTranspose(32, (4, 4), (2, 2), padding='SAME'), layers.ConvTranspose(32), (2, 4, 4, 32)),
    (nn.ConvTranspose(1, (4, 4), (2, 2), padding='SAME'), layers.ConvTranspose(1), (2, 32, 32, 32)),
    (nn.ConvTranspose(5, (4, 4), (2, 2), padding='SAME'), layers.ConvTranspose(5), (1, 3, 6, 2)),
    (nn.ConvTranspose(3, (4, 4), (2, 2), padding='SAME'), layers.ConvTranspose(3), (2, 5, 7, 8)),
])
def test_matmul_convolutions_equal_flax(ref, fast, shape):
  """Each layer against Flax's with the same weights (parameters, outputs, gradients)."""
  kx, kp, kc = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, shape)
  params = jax.jit(ref.init)(kp, x)
  # Same parameter tree and the same initial values for the same key.
  fast_params = jax.jit(fast.init)(kp, x)
  assert jax.tree.structure(fast_params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(fast_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # Random (non-zero) biases, and a loss with a non-trivial cotangent.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(kc, p.shape), params)
  y_ref, y_fast = jax.jit(ref.apply)(params, x), jax.jit(fast.apply)(params, x)
  assert y_ref.shape == y_fast.shape
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * jnp.arange(y_ref.size).reshape(y_ref.shape) / y_ref.size)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
  g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


def test_matmul_conv_refuses_what_it_does_not_compute():
  x = jnp.zeros((2, 9, 8, 3))
  with pytest.raises(ValueError, match="stride 2 with even kernels on even images.*impl='xla'"):
    layers.Conv(8, (3, 3), (2, 2)).init(jax.random.key(0), x)


@pytest.mark.parametrize('kernel_shape', [(2, 2, 128, 32), (2, 2, 4, 32), (3, 1, 5, 5),
                                          (1, 1, 8, 3)])
def test_window_product_equals_valid_convolution(kernel_shape):
  # Both orders of the window product (multiply first when C_out <= C_in,
  # else gather first), against XLA's convolution, outputs and gradients.
  kx, kk, kc = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 6, 5, kernel_shape[2]))
  kernel = jax.random.normal(kk, kernel_shape)
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',
                                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = ref(x, kernel)
  np.testing.assert_allclose(layers.conv_valid(x, kernel), y, rtol=1e-5, atol=1e-4)
  ct = jax.random.normal(kc, y.shape)
  grads = [jax.grad(lambda x, k: jnp.sum(f(x, k) * ct), argnums=(0, 1))(x, kernel)
           for f in (layers.conv_valid, ref)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


@pytest.mark.parametrize('kernel_shape', [(2, 2, 4, 32), (2, 2, 32, 4), (2, 2, 128, 32),
                                          (2, 2, 32, 128), (1, 1, 128, 64)])
def test_weight_gradients_contract_the_left_operands_minor_axis(kernel_shape):
  # Every product of a window product's compiled gradient (gathering first or
  # multiplying first, thin or wide) contracts the minor axis of its left
  # operand: written as x.T·dy, a weight gradient contracts the major one, the
  # form XLA's CPU backend leaves to its slow Eigen path.
  x = jnp.zeros((2, 9, 9, kernel_shape[2]))
  kernel = jnp.zeros(kernel_shape)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(layers.conv_valid(x, k))), argnums=(0, 1)))
  hlo = grad.lower(x, kernel).compile().as_text()
  dots = re.findall(r' dot\(.*?lhs_contracting_dims=\{(\d)\}', hlo)
  assert len(dots) >= 2, dots  # the forward product and at least one of the gradient's
  assert '0' not in dots, dots


@pytest.mark.parametrize('kernel_shape', [(2, 2, 128, 32), (2, 2, 32, 128)])
def test_channels_first_operands_are_materialised_before_taps_are_stacked(kernel_shape):
  # The gradient gathers (gather first) or stacks (multiply first) the taps of a
  # channels-first copy of x or dy. Fused into that concatenation, the transpose
  # is read with a stride and costs several times the two run apart, so no
  # computation of the compiled gradient may both transpose and concatenate.
  x = jnp.zeros((2, 9, 9, kernel_shape[2]))
  kernel = jnp.zeros(kernel_shape)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(layers.conv_valid(x, k))), argnums=(0, 1)))
  hlo = grad.lower(x, kernel).compile().as_text()
  bodies = re.findall(r'^%\S+ \(.*?\n\}', hlo, re.M | re.S)
  assert any(' concatenate(' in b for b in bodies), 'no concatenation: the test checks nothing'
  assert any(' transpose(' in b for b in bodies), 'no transpose: the test checks nothing'
  both = [b.split(' ', 1)[0] for b in bodies if ' concatenate(' in b and ' transpose(' in b]
  assert not both, both


def test_dense_is_flax_dense_with_the_same_parameters_and_gradients():
  kx, kp, kc = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(kx, (6, 40))
  ours, ref = layers.Dense(24), nn.Dense(24)
  params = ours.init(kp, x)
  ref_params = ref.init(kp, x)  # the same names, shapes and initial values: checkpoints carry over
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(kc, p.shape), params)  # a non-zero bias
  ct = jax.random.normal(kc, (6, 24))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * ct), argnums=(0, 1))(params, x)
           for m in (ours, ref)]
  for a, b in zip(*(jax.tree.leaves(g) for g in grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(jax.grad(lambda k, x: jnp.sum(jnp.sin(layers.dense(x, k))), argnums=(0, 1))).lower(
      params['params']['kernel'], x).compile().as_text()
  dots = re.findall(r' dot\(.*?lhs_contracting_dims=\{(\d)\}', hlo)
  assert len(dots) >= 2 and '0' not in dots, dots  # the weight gradient as x.T·dy, x.T materialised
  with pytest.raises(ValueError, match=r'\[N, C\]'):
    ours.init(kp, jnp.zeros((2, 3, 40)))  # x.T of a 3-D input would be the wrong gradient


def test_conv_models_keep_flax_parameter_names():
  model = models.get('burgess', 10, (64, 64, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)),
                          jax.random.key(1))
  enc, dec = params['params']['encoder'], params['params']['decoder']
  assert [k for k in enc if k.startswith('Conv')] == [f'Conv_{i}' for i in range(4)]
  assert [k for k in dec if k.startswith('ConvTranspose')] == [f'ConvTranspose_{i}' for i in range(4)]
  assert enc['Conv_0']['kernel'].shape == (4, 4, 1, 32)
  assert dec['ConvTranspose_3']['kernel'].shape == (4, 4, 32, 1)


@pytest.mark.parametrize('init', models.INITS)
def test_init_schemes_draw_each_layer_at_its_frameworks_scale(init):
  model = models.get('burgess', 10, (64, 64, 1), init=init)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 64, 64, 1)), jax.random.key(1))
  checked = 0
  for part in ('encoder', 'decoder'):
    for name, layer in params['params'][part].items():
      w, b = np.asarray(layer['kernel']), np.asarray(layer['bias'])
      deconv = name.startswith('ConvTranspose')
      # torch's fan_in: inputs per output unit; a transposed conv's counts outputs.
      fan_in = 16 * w.shape[-1] if deconv else int(np.prod(w.shape[:-1]))
      bound = 1 / np.sqrt(fan_in)
      uniform = init == 'torch' or (init == 'kaiming' and deconv)
      if uniform:
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
        want_std = bound / np.sqrt(3)
        assert np.abs(b).max() > 0.5 * bound or b.size < 8  # biases drawn, not zero
      else:
        np.testing.assert_array_equal(b, 0)
        # LeCun normal (truncated, rescaled to its variance) or N(0, 2/fan_in).
        want_std = np.sqrt((2.0 if init == 'kaiming' else 1.0) / fan_in)
      if w.size >= 2000:  # enough draws for a 10% check of the spread
        assert np.std(w) == pytest.approx(want_std, rel=0.1), (part, name)
        checked += 1
  assert checked >= 8


def test_unknown_init_is_refused():
  with pytest.raises(ValueError, match="'lecun'"):
    models.get('burgess', 10, (64, 64, 1), init='xavier')
