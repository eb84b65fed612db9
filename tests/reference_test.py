"""Tests for reference.py: the hand-written NumPy network computes what model.CNN and jax.grad compute.

The Flax side is used only through `CNN.apply` and `jax.grad`, so these tests pin the function and its gradient,
whatever formulation model.py uses inside. The reference's conv is also pinned on its own against XLA's convolution,
and its gradients against naive loops, so the maths stays visible here (the forward pass's loops, the definition of
a conv layer, are in tests/model_test.py, which checks model.py against them).

Gradients are compared in float64 (jax.enable_x64): both sides then agree to ~1e-15, so rtol=1e-5 checks the
maths, not rounding. In float32, entries that sum many cancelling terms (the conv biases' gradients) come out of
jax.grad up to ~1e-5 of the largest gradient away from the exact values, so a float32 check would need an atol that
loose, enough to hide a mistake in any small entry. The forward pass is compared in float32, as the model runs.
"""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import test_util

import model
import reference
from configs import default


def _config(channels=1, **settings):
  config = default.get_config()
  config.input_shape = (32, 32, channels)
  config.model.update(settings)
  return config


def _data(config, batch=4, seed=0):
  """Random params (biases too, so a dropped bias shows), float32 images and integer labels.

  The parameter shapes come from model.CNN, traced without compiling anything; values are drawn in NumPy with
  lecun-normal scale, so activations stay in the range where every nonlinearity bends.
  """
  rng = np.random.default_rng(seed)
  images = jax.ShapeDtypeStruct((batch, *config.input_shape), jnp.float32)
  shapes = jax.eval_shape(model.CNN(**config.model).init, jax.random.key(0), images)['params']

  def draw(shape):
    fan_in = np.prod(shape[:-1]) if len(shape) > 1 else 10
    return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

  params = jax.tree.map(lambda s: draw(s.shape), shapes)
  labels = rng.integers(0, config.model.num_classes, batch)
  return params, rng.normal(size=images.shape).astype(np.float32), labels


def _settings(config):
  """config.model as a hashable tuple, so that jax.jit can take it as a static argument and reuse compilations."""
  return tuple(sorted(config.model.items()))


def _flax_loss(params, settings, images, labels):
  logits = model.CNN(**dict(settings)).apply({'params': params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# One compile per configuration is much faster than dispatching, and compiling, each small op of the backward pass;
# and these programs run once, so optimising them (what jax_disable_most_optimizations turns off) costs more than it
# saves: it halves the compile time.
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
_flax_value_and_grad = jax.jit(jax.value_and_grad(_flax_loss), static_argnums=1, compiler_options=_FAST_COMPILE)


def _flax_loss_and_grads(params, config, images, labels):
  """jax.value_and_grad of the Flax loss, in float64."""
  with jax.enable_x64(True):
    params, images = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, images))
    loss, grads = _flax_value_and_grad(params, _settings(config), images, labels)
    return float(loss), jax.tree.map(np.asarray, grads)


def _assert_close(actual, expected, rtol=1e-5):
  # The atol only keeps entries that are zero up to rounding (e.g. relu-dead units) from failing rtol.
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-4 * np.abs(expected).max(), strict=True)


# sigmoid and gelu are checked through the loss in the gradient cases below.
FORWARD_CASES = list(itertools.product((1, 3), model.POOLS, ('relu', 'tanh'), model.FLATTEN_ORDERS))


@pytest.mark.parametrize(('channels', 'pool', 'activation', 'flatten_order'), FORWARD_CASES)
def test_forward_matches_flax(channels, pool, activation, flatten_order):
  config = _config(channels, pool=pool, activation=activation, flatten_order=flatten_order)
  params, images, _ = _data(config, batch=8)
  logits, cache = reference.forward(params, config.model, images)
  outputs = model.CNN(**config.model).apply({'params': params}, images, method=model.CNN.layer_outputs)
  # float32 Flax against float64 NumPy: every layer, the logits last, to 1e-5 of its scale.
  for name, value in outputs.items():
    np.testing.assert_allclose(cache[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(), err_msg=name)
  flax_logits = model.CNN(**config.model).apply({'params': params}, images)  # CNN.__call__.
  np.testing.assert_allclose(logits, flax_logits, rtol=1e-5, atol=1e-5 * np.abs(flax_logits).max())


# Every pair of (channels, pool, activation) values appears in some case (a pairwise design: 4 compiles, not 8);
# the rest vary the geometry and the remaining settings.
GRAD_CASES = {
  'C1-max-relu': (1, {'pool': 'max', 'activation': 'relu'}),
  'C1-avg-tanh': (1, {'pool': 'avg', 'activation': 'tanh'}),
  'C3-max-tanh': (3, {'pool': 'max', 'activation': 'tanh'}),
  'C3-avg-relu': (3, {'pool': 'avg', 'activation': 'relu'}),
  'SAME-sigmoid-chw': (1, {'padding': 'SAME', 'activation': 'sigmoid', 'flatten_order': 'chw'}),
  'strides2-SAME-gelu-random': (
    3,
    {
      'strides': 2,
      'padding': 'SAME',
      'pool': 'avg',
      'activation': 'gelu',
      'flatten_order': 'random',
      'flatten_seed': 3,
    },
  ),
  'three-convs-two-hidden': (
    3,
    {'conv_features': (4, 4, 8), 'kernel_size': 3, 'padding': 'SAME', 'hidden_features': (32, 16)},
  ),
  'no-hidden-window1': (1, {'hidden_features': (), 'pool_window': 1, 'kernel_size': 7, 'num_classes': 5}),
  'one-conv-window4': (1, {'conv_features': (3,), 'pool_window': 4, 'flatten_order': 'random'}),
  # At window 2 a mean divides by 4 = 2 * window: a window of 4 tells window**2 from either.
  'one-conv-avg-window4': (1, {'conv_features': (3,), 'pool': 'avg', 'pool_window': 4}),
}


@pytest.mark.parametrize(('channels', 'settings'), GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_loss_and_grads_match_jax_grad(channels, settings):
  config = _config(channels, **settings)
  params, images, labels = _data(config)
  loss, grads = reference.loss_and_grads(params, config.model, images, labels)
  expected_loss, expected_grads = _flax_loss_and_grads(params, config, images, labels)
  assert loss == pytest.approx(expected_loss, rel=1e-10)
  assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
  jax.tree.map(_assert_close, grads, expected_grads)


def test_flax_grads_match_finite_differences():
  """jax.grad of the Flax loss is itself right, so the comparison above is against a true gradient; so is its own
  gradient (reverse over reverse: Hessian-vector products). Forward mode (jax.jvp, jacfwd, jax.hessian) is refused,
  since the blocked convolution's matmul and max pooling define their gradients with jax.custom_vjp.

  The default network (relu and max pooling, the kinks where autodiff and finite differences could part).
  """
  config = _config()
  params, images, labels = _data(config, batch=2)
  with jax.enable_x64(True):
    params, images = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, images))
    loss = jax.jit(lambda p: _flax_loss(p, _settings(config), images, labels))
    # A step well below the default 1e-4, so the finite differences rarely straddle a relu or max-pool kink. Order 2
    # checks the first derivatives too.
    test_util.check_grads(loss, (params,), order=2, modes=['rev'], eps=1e-6)
    with pytest.raises(TypeError, match='forward-mode'):
      jax.jvp(loss, (params,), (params,))


@pytest.mark.parametrize(('channels', 'settings'), [GRAD_CASES['C1-max-relu'], GRAD_CASES['strides2-SAME-gelu-random']])
def test_reference_grads_match_finite_differences(channels, settings):
  """The reference's gradients against its own loss, without JAX: a central difference along random directions."""
  config = _config(channels, **settings)
  params, images, labels = _data(config, batch=2)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  _, grads = reference.loss_and_grads(params, config.model, images, labels)
  rng = np.random.default_rng(1)
  eps = 1e-6
  for _ in range(3):
    direction = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    shifted = [jax.tree.map(lambda p, d, s=s: p + s * eps * d, params, direction) for s in (1, -1)]
    plus, minus = (reference.loss_and_grads(p, config.model, images, labels)[0] for p in shifted)
    along = sum(np.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True))
    assert (plus - minus) / (2 * eps) == pytest.approx(along, rel=1e-6)


def _tiny_conv_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 5, 3))
  kernel = rng.normal(size=(3, 2, 3, 4))  # Non-square, so a swapped axis shows.
  grad_y = rng.normal(size=(2, 4, 4, 4))
  return x, kernel, grad_y


def test_conv2d_backward_matches_naive_loops():
  """grad_kernel is the correlation of the input with grad_y; grad_x the full convolution with the flipped kernel."""
  x, kernel, grad_y = _tiny_conv_data()
  kh, kw, c_in, c_out = kernel.shape
  b, out_h, out_w, _ = grad_y.shape
  grad_x, grad_kernel, grad_bias = reference.conv2d_backward(x, kernel, grad_y)

  expected_kernel = np.zeros(kernel.shape)
  for p, q, c, o in itertools.product(range(kh), range(kw), range(c_in), range(c_out)):
    expected_kernel[p, q, c, o] = sum(
      x[n, i + p, j + q, c] * grad_y[n, i, j, o] for n, i, j in itertools.product(range(b), range(out_h), range(out_w))
    )
  grad_y_full = np.pad(grad_y, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
  expected_x = np.zeros(x.shape)
  for n, r, t, c in itertools.product(*map(range, x.shape)):
    expected_x[n, r, t, c] = sum(
      grad_y_full[n, r + p, t + q, o] * kernel[kh - 1 - p, kw - 1 - q, c, o]
      for p, q, o in itertools.product(range(kh), range(kw), range(c_out))
    )
  np.testing.assert_allclose(grad_kernel, expected_kernel, rtol=1e-12)
  np.testing.assert_allclose(grad_x, expected_x, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(grad_bias, grad_y.sum(axis=(0, 1, 2)), rtol=1e-12)


@pytest.mark.parametrize(('strides', 'padding'), list(itertools.product((1, 3), model.PADDINGS)))
def test_conv2d_strides_and_padding_match_xla(strides, padding):
  """Odd sizes, so windows the stride does not reach and uneven SAME padding are both exercised."""
  rng = np.random.default_rng(strides)
  x = rng.normal(size=(2, 8, 7, 3))
  kernel = rng.normal(size=(3, 4, 3, 2))
  bias = rng.normal(size=2)
  y = reference.conv2d(x, kernel, bias, strides, padding)
  grad_y = rng.normal(size=y.shape)
  with jax.enable_x64(True):

    def xla_conv(x, kernel):
      return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )

    expected_y, vjp = jax.vjp(xla_conv, x, kernel)
    expected_grad_x, expected_grad_kernel = map(np.asarray, vjp(grad_y))
  grad_x, grad_kernel, grad_bias = reference.conv2d_backward(x, kernel, grad_y, strides, padding)
  np.testing.assert_allclose(y, np.asarray(expected_y) + bias, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(grad_x, expected_grad_x, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(grad_kernel, expected_grad_kernel, rtol=1e-12)
  np.testing.assert_allclose(grad_bias, grad_y.sum(axis=(0, 1, 2)), rtol=1e-12)


def test_pool2d_backward_by_hand():
  x = np.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)
  grad_y = np.full((1, 1, 1, 1), 2.0)
  # The tied maximum shares the gradient; the other entries get none.
  np.testing.assert_array_equal(reference.pool2d_backward(x, grad_y, 'max', 2).squeeze(), [[0, 1], [1, 0]])
  np.testing.assert_array_equal(reference.pool2d_backward(x, grad_y, 'avg', 2).squeeze(), [[0.5, 0.5], [0.5, 0.5]])


def test_max_pool_ties_in_relu_nets_are_all_zero_windows():
  """With random inputs, max-pool ties are relu windows that are all zero; relu's zero slope drops their gradient.

  So there the tie rule does not matter: routing each tie to a single entry instead passes this test too.
  """
  config = _config()
  params, images, labels = _data(config)
  _, cache = reference.forward(params, config.model, images)
  b, h, w, c = cache['conv2'].shape
  windows = cache['conv2'].reshape(b, h // 2, 2, w // 2, 2, c)
  is_max = windows == windows.max(axis=(2, 4), keepdims=True)
  tied = is_max.sum(axis=(2, 4)) > 1
  assert tied.any()
  assert (windows.max(axis=(2, 4))[tied] == 0).all()
  _, grads = reference.loss_and_grads(params, config.model, images, labels)
  _, expected_grads = _flax_loss_and_grads(params, config, images, labels)
  jax.tree.map(_assert_close, grads, expected_grads)


def test_max_pool_ties_with_nonzero_slope_split_like_jax():
  """A zero conv1 kernel with positive biases makes every conv1 map constant and positive, so every pool1 window is
  a tie where relu's slope is 1, and conv1's kernel gradient depends on how the tie is routed. jax.grad splits it
  equally among the tied entries; routing it all to one of them fails here. conv2's kernel and bias are multiples
  of 1/64 and conv1's biases of 1/4, so every sum is exact and pool2's ties stay ties in whatever order a convolution
  adds."""
  config = _config()
  params, images, labels = _data(config)
  params['conv1']['kernel'] = np.zeros_like(params['conv1']['kernel'])
  params['conv1']['bias'] = np.array([0.25, 0.5, 0.75], np.float32)
  params['conv2'] = jax.tree.map(lambda p: np.round(p * 64) / 64, params['conv2'])
  _, grads = reference.loss_and_grads(params, config.model, images, labels)
  _, expected_grads = _flax_loss_and_grads(params, config, images, labels)
  assert np.abs(grads['conv1']['kernel']).max() > 1e-3  # The tie routing is what this gradient measures.
  jax.tree.map(_assert_close, grads, expected_grads)


def test_relu_slope_at_zero_is_zero_like_jax():
  """A zero conv1 (kernel and bias) puts all its pre-activations exactly at relu's kink, where jax takes the slope 0."""
  config = _config()
  params, images, labels = _data(config)
  params['conv1'] = jax.tree.map(np.zeros_like, params['conv1'])
  _, grads = reference.loss_and_grads(params, config.model, images, labels)
  _, expected_grads = _flax_loss_and_grads(params, config, images, labels)
  jax.tree.map(_assert_close, grads, expected_grads)


def test_unknown_setting_is_not_implemented():
  config = _config()
  params, images, labels = _data(config, batch=1)
  with pytest.raises(NotImplementedError, match=r'does not implement config\.model\.dropout_rate'):
    reference.loss_and_grads(params, {**config.model.to_dict(), 'dropout_rate': 0.1}, images, labels)


@pytest.mark.parametrize(
  'settings, message',
  [
    ({'kernel_size': 9}, r"params\['conv1'\]\['kernel'\] has shape \(5, 5, 1, 3\), but .* give \(9, 9, 1, 3\)"),
    ({'hidden_features': (50,)}, r"params\['fc1'\]\['kernel'\] has shape \(150, 100\), but .* give \(150, 50\)"),
  ],
)
def test_params_of_another_network_are_refused(settings, message):
  config = _config()
  params, images, _ = _data(config, batch=1)
  with pytest.raises(ValueError, match=message):
    reference.forward(params, {**config.model.to_dict(), **settings}, images)


@pytest.mark.parametrize('layer, bias_shape', [('conv2', (1,)), ('fc2', ())])
def test_a_bias_of_another_shape_is_refused_rather_than_broadcast(layer, bias_shape):
  config = _config()
  params, images, _ = _data(config, batch=1)
  params = {**params, layer: {**params[layer], 'bias': np.zeros(bias_shape)}}
  expected = re.escape(f"params['{layer}']['bias'] has shape {bias_shape}, but config.model and the input give (")
  with pytest.raises(ValueError, match=expected):
    reference.forward(params, config.model.to_dict(), images)


def test_reference_same_padding_with_a_kernel_smaller_than_its_stride():
  rng = np.random.default_rng(0)
  x, kernel, bias = rng.normal(size=(2, 8, 7, 3)), rng.normal(size=(1, 1, 3, 2)), rng.normal(size=2)
  with jax.enable_x64(True):
    dimensions = ('NHWC', 'HWIO', 'NHWC')
    expected = np.asarray(jax.lax.conv_general_dilated(x, kernel, (3, 3), 'SAME', dimension_numbers=dimensions))
  np.testing.assert_allclose(reference.conv2d(x, kernel, bias, 3, 'SAME'), expected + bias, rtol=1e-12, atol=1e-12)
