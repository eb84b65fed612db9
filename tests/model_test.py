"""The network's shapes, its two facts and its validation, checked against independent computations."""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax

import model
import reference
from configs import default

DEFAULT_LAYER_SHAPES_C1 = [
  ('input', (32, 32, 1)),
  ('conv1', (28, 28, 3)),
  ('pool1', (14, 14, 3)),
  ('conv2', (10, 10, 6)),
  ('pool2', (5, 5, 6)),
  ('flatten', (150,)),
  ('fc1', (100,)),
  ('fc2', (10,)),
]


def make_config(channels=1, **model_overrides):
  config = default.get_config()
  config.input_shape = (32, 32, channels)
  config.model.update(model_overrides)
  return config


def random_images(channels, batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, 32, 32, channels))


def shape_tree(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


class ShapesTest(parameterized.TestCase):
  def test_layer_shapes_c1(self):
    self.assertEqual(list(model.layer_shapes(make_config(1)).items()), DEFAULT_LAYER_SHAPES_C1)

  def test_layer_shapes_c3_differ_only_at_the_input(self):
    expected = [('input', (32, 32, 3))] + DEFAULT_LAYER_SHAPES_C1[1:]
    self.assertEqual(list(model.layer_shapes(make_config(3)).items()), expected)

  def test_params_are_float32_even_where_jax_defaults_to_float64(self):
    with jax.enable_x64(True):
      params = jax.eval_shape(lambda: model.init_params(make_config(1), jax.random.key(0)))
    self.assertEqual(set(leaf.dtype for leaf in jax.tree.leaves(params)), {jnp.dtype('float32')})

  @parameterized.parameters((1, 0), (3, 4))
  def test_init_params_compiled_are_flaxs_init_run_op_by_op(self, channels, seed):
    config = make_config(channels)
    images = jnp.zeros((1, *config.input_shape), jnp.float32)
    op_by_op = model.create_model(config).init(jax.random.key(seed), images)['params']
    # Bitwise on the CPU. XLA:GPU fuses the truncated normal's arithmetic into kernels that round differently from
    # the op-by-op ones: up to 1.5e-7 apart on an H200, for kernels of std 0.08-0.2.
    tolerance = 0 if jax.default_backend() == 'cpu' else 1e-6
    assert_close = functools.partial(np.testing.assert_allclose, rtol=0, atol=tolerance)
    jax.tree.map(assert_close, model.init_params(config, jax.random.key(seed)), op_by_op)

  def test_kernels_start_lecun_normal_and_biases_at_zero(self):
    # LeCun normal: a normal truncated at two standard deviations, scaled to variance 1 / fan_in, where fan_in is
    # what one output sums over (5*5*3 for conv1 at C=3: a filter spans all input channels).
    for name, layer in model.init_params(make_config(3), jax.random.key(0)).items():
      fan_in = np.prod(layer['kernel'].shape[:-1])
      scaled = np.asarray(layer['kernel']) * np.sqrt(fan_in)
      self.assertBetween(np.std(scaled), 0.9, 1.1, name)
      self.assertLessEqual(np.abs(scaled).max(), 2 / 0.87962566103423978, name)  # 0.8796: the truncated std.
      # A uniform of the same variance (lecun_uniform) stops at sqrt(3) = 1.73; this normal puts 7% beyond 1.8.
      self.assertGreater(np.mean(np.abs(scaled) > 1.8), 0.03, name)
      np.testing.assert_array_equal(layer['bias'], 0)

  @parameterized.parameters((1, 16_644), (3, 16_794))
  def test_param_shapes_and_count(self, channels, count):
    params = model.init_params(make_config(channels), jax.random.key(0))
    self.assertIsInstance(params, dict)
    self.assertEqual(
      shape_tree(params),
      {
        'conv1': {'kernel': (5, 5, channels, 3), 'bias': (3,)},
        'conv2': {'kernel': (5, 5, 3, 6), 'bias': (6,)},
        'fc1': {'kernel': (150, 100), 'bias': (100,)},
        'fc2': {'kernel': (100, 10), 'bias': (10,)},
      },
    )
    self.assertEqual(sum(leaf.size for leaf in jax.tree.leaves(params)), count)

  def test_apply_maps_images_to_logits(self):
    config = make_config(3)
    params = model.init_params(config, jax.random.key(0))
    logits = model.create_model(config).apply({'params': params}, random_images(3, batch=7))
    self.assertEqual((logits.shape, logits.dtype), ((7, 10), jnp.float32))

  def test_layer_outputs_match_layer_shapes(self):
    config = make_config(1)
    params = model.init_params(config, jax.random.key(0))
    outputs = model.create_model(config).apply({'params': params}, random_images(1), method=model.CNN.layer_outputs)
    self.assertEqual([(name, out.shape[1:]) for name, out in outputs.items()], DEFAULT_LAYER_SHAPES_C1[1:])

  def test_summary_counts_params_and_flops(self):
    table = model.summary(make_config(1))
    conv1_row = next(line for line in table.splitlines() if line.startswith('conv1'))
    # 28*28 positions x 3 filters, each a 5x5x1 dot product: 2 FLOPs per multiply-add.
    self.assertEqual(conv1_row.split()[-2:], ['78', f'{28 * 28 * 3 * 5 * 5 * 1 * 2:,}'])
    fc_rows = [line.split()[-2:] for line in table.splitlines() if line.startswith('fc')]
    self.assertEqual(fc_rows, [['15,100', f'{150 * 100 * 2:,}'], ['1,010', f'{100 * 10 * 2:,}']])
    total_flops = 28 * 28 * 3 * 5 * 5 * 1 * 2 + 10 * 10 * 6 * 5 * 5 * 3 * 2 + 150 * 100 * 2 + 100 * 10 * 2
    self.assertEqual(table.splitlines()[-1].split(), ['total', '16,644', f'{total_flops:,}'])


def lax_conv(x, kernel, strides, padding):
  """XLA's own convolution in the model's layouts (NHWC input, HWIO kernel), in full float32 precision."""
  return lax.conv_general_dilated(
    x, kernel, (strides, strides), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest'
  )


def numpy_conv_by_loops(x, kernel, bias):
  """The definition, one output value at a time: [B, H, W, C] x [kh, kw, C, F] -> [B, H-kh+1, W-kw+1, F]."""
  batch, height, width, channels = x.shape
  kh, kw, _, filters = kernel.shape
  out = np.zeros((batch, height - kh + 1, width - kw + 1, filters))
  for b, i, j, f in itertools.product(range(batch), range(height - kh + 1), range(width - kw + 1), range(filters)):
    total = bias[f]
    for c in range(channels):  # Every input channel feeds the same output map.
      total += np.sum(x[b, i : i + kh, j : j + kw, c] * kernel[:, :, c, f])
    out[b, i, j, f] = total
  return out


class ConvolutionTest(parameterized.TestCase):
  """Fact 1: a filter is a 3D volume over all input channels, summed into one 2D map per filter."""

  @parameterized.parameters(1, 3)
  def test_conv_layers_equal_explicit_loops_over_all_channels(self, channels):
    config = make_config(channels)
    params = model.init_params(config, jax.random.key(1))
    params = jax.tree.map(lambda p: p + 0.1, params)  # Nonzero biases, so they are checked too.
    x = np.asarray(random_images(channels, batch=1))
    outputs = model.create_model(config).apply({'params': params}, x, method=model.CNN.layer_outputs)
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    conv1 = relu(numpy_conv_by_loops(x, np.asarray(params['conv1']['kernel']), np.asarray(params['conv1']['bias'])))
    np.testing.assert_allclose(outputs['conv1'], conv1, atol=1e-5)
    pool1 = np.asarray(outputs['pool1'])
    conv2 = relu(numpy_conv_by_loops(pool1, np.asarray(params['conv2']['kernel']), np.asarray(params['conv2']['bias'])))
    np.testing.assert_allclose(outputs['conv2'], conv2, atol=1e-5)

  def test_conv_of_rgb_is_the_sum_of_per_channel_convs(self):
    # One map per filter, not one per (channel, filter) as if the 3 channels were 3 one-channel images: filter f's
    # map is the sum over c of the 2D cross-correlation of channel c with the kernel's slice [:, :, c, f].
    x = random_images(3)
    kernel = jax.random.normal(jax.random.key(2), (5, 5, 3, 4))
    y = model.conv2d(x, kernel, 1, 'VALID')
    self.assertEqual(y.shape, (2, 28, 28, 4))
    x, kernel = np.asarray(x), np.asarray(kernel)
    per_channel = [reference.conv2d(x[..., c : c + 1], kernel[:, :, c : c + 1], np.zeros(4)) for c in range(3)]
    expected = sum(per_channel)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())  # float32 sums of 75 terms.

  @parameterized.product(strides=(1, 2, 3), padding=('VALID', 'SAME'), size=(32, 13), kernel_size=(5, 2))
  def test_conv2d_equals_lax_conv(self, strides, padding, size, kernel_size):
    x = jax.random.normal(jax.random.key(3), (2, size, size, 3))
    kernel = jax.random.normal(jax.random.key(4), (kernel_size, kernel_size, 3, 5))
    expected = lax_conv(x, kernel, strides, padding)
    np.testing.assert_allclose(model.conv2d(x, kernel, strides, padding), expected, atol=1e-4, rtol=1e-5)

  @parameterized.product(
    strides=(1, 2), padding=('VALID', 'SAME'), pool_window=(1, 2, 4), channels=(1, 3), kernel_size=(5, 2)
  )
  def test_conv_windows_equals_lax_conv(self, strides, padding, pool_window, channels, kernel_size):
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, channels))
    kernel = jax.random.normal(jax.random.key(4), (kernel_size, kernel_size, channels, 3))
    bias = jax.random.normal(jax.random.key(5), (3,))
    expected = lax_conv(x, kernel, strides, padding)
    if expected.shape[1] % pool_window:
      self.skipTest(f'pool_window={pool_window} does not divide the {expected.shape[1]}-wide output')
    y = model.conv_windows(x, kernel, bias, strides, padding, pool_window)
    np.testing.assert_allclose(model.window_map(y), expected + bias, atol=1e-4, rtol=1e-5)

  @parameterized.product(strides=(1, 2), padding=('VALID', 'SAME'), channels=(1, 3))
  def test_conv_windows_gradients_equal_lax_conv(self, strides, padding, channels):
    # conv_windows computes its band gradient its own way (windows_matmul); the input, kernel and bias
    # gradients must still be those of the convolution.
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, channels))
    kernel = jax.random.normal(jax.random.key(4), (5, 5, channels, 3))
    bias = jax.random.normal(jax.random.key(5), (3,))
    size = model.conv_output_size(16, 5, strides, padding)
    weights = jax.random.normal(jax.random.key(6), (2, size, size, 3))

    def windows_loss(x, kernel, bias):
      return jnp.vdot(model.window_map(model.conv_windows(x, kernel, bias, strides, padding, 2)), weights)

    def lax_loss(x, kernel, bias):
      return jnp.vdot(lax_conv(x, kernel, strides, padding) + bias, weights)

    grads = jax.grad(windows_loss, argnums=(0, 1, 2))(x, kernel, bias)
    expected = jax.grad(lax_loss, argnums=(0, 1, 2))(x, kernel, bias)
    for name, grad, want in zip(('input', 'kernel', 'bias'), grads, expected, strict=True):
      np.testing.assert_allclose(grad, want, atol=1e-4, rtol=1e-5, err_msg=name)

  @parameterized.product(kind=('max', 'avg'), window=(2, 4))
  def test_pool_windows_equals_reduce_window(self, kind, window):
    x = random_images(3)
    y = model.conv_windows(x, jnp.eye(3).reshape(1, 1, 3, 3), jnp.zeros(3), 1, 'VALID', window)  # x itself.
    init, op = (-jnp.inf, lax.max) if kind == 'max' else (0.0, lax.add)
    expected = lax.reduce_window(model.window_map(y), init, op, (1, window, window, 1), (1, window, window, 1), 'VALID')
    expected = expected if kind == 'max' else expected / window**2
    np.testing.assert_allclose(model.pool_windows(y, kind), expected, atol=1e-5)

  @parameterized.product(activation=tuple(model.ACTIVATIONS), pool=model.POOLS)
  def test_pools_are_of_the_activated_maps(self, activation, pool):
    # The model pools max before a non-decreasing activation (the same values, a quarter of the activations); gelu,
    # which is not monotone, and avg pooling, which does not commute with any of them, must activate first.
    config = make_config(3, activation=activation, pool=pool)
    x = random_images(3) * 4  # Spread the pre-activations over gelu's dip below 0.
    outputs = model.create_model(config).apply(
      {'params': model.init_params(config, jax.random.key(1))}, x, method=model.CNN.layer_outputs
    )
    for i in (1, 2):
      expected = reference.pool2d(np.asarray(outputs[f'conv{i}']), pool, config.model.pool_window)
      # float32 means summed in another order differ by an ulp or so: the atol keeps values near 0 from failing rtol.
      atol = 1e-6 * np.abs(expected).max()
      np.testing.assert_allclose(outputs[f'pool{i}'], expected, rtol=1e-6, atol=atol, err_msg=f'pool{i}')

  @parameterized.named_parameters(
    # Each 2x2 window's maximum 3 is tied, so each 3 gets an equal share of the gradient. No window is symmetric,
    # so a gradient sent to transposed positions would show, and the ties lie in a column, a row and a diagonal.
    ('column', [[3, 1], [3, 0]], [[1 / 2, 0], [1 / 2, 0]]),
    ('row', [[3, 3], [1, 0]], [[1 / 2, 1 / 2], [0, 0]]),
    ('diagonal', [[0, 3], [3, 1]], [[0, 1 / 2], [1 / 2, 0]]),
    ('three', [[3, 3], [1, 3]], [[1 / 3, 1 / 3], [0, 1 / 3]]),
    ('all', [[3, 3], [3, 3]], [[1 / 4, 1 / 4], [1 / 4, 1 / 4]]),
  )
  def test_max_pool_gradient_splits_ties_like_the_reference(self, window, expected):
    # Beside a window with one maximum, in the same block of the conv_windows layout.
    x = jnp.array(np.hstack([window, [[0, 2], [1, 0]]]), jnp.float32).reshape(1, 2, 4, 1)
    expected = np.hstack([expected, [[0, 1], [0, 0]]])

    def pooled_sum(x):
      return model.pool_windows(model.conv_windows(x, jnp.ones((1, 1, 1, 1)), jnp.zeros(1), 1, 'VALID', 2), 'max').sum()

    np.testing.assert_allclose(jax.grad(pooled_sum)(x).squeeze(), expected, rtol=1e-7)
    by_hand = reference.pool2d_backward(np.asarray(x), np.ones((1, 1, 2, 1)), 'max', 2)
    np.testing.assert_allclose(by_hand.squeeze(), expected, rtol=1e-7)


class FlattenOrderTest(parameterized.TestCase):
  """Fact 2: flattening 5x5x6 in any fixed order, with fc1's rows permuted to match, is the same function."""

  def logits(self, config, params, x):
    return model.create_model(config).apply({'params': params}, x)

  @parameterized.parameters(('chw', 0), ('random', 0), ('random', 7))
  def test_permuting_fc1_rows_gives_identical_logits(self, order, seed):
    x = random_images(1, batch=4)
    params = model.init_params(make_config(), jax.random.key(5))
    perm = model.flatten_permutation(order, (5, 5, 6), seed)
    permuted = jax.tree.map(lambda p: p, params)
    permuted['fc1'] = {'kernel': params['fc1']['kernel'][perm], 'bias': params['fc1']['bias']}
    reordered = self.logits(make_config(flatten_order=order, flatten_seed=seed), permuted, x)
    # The same function, up to float32 rounding: fc1 adds its 150 products in another order.
    np.testing.assert_allclose(reordered, self.logits(make_config(), params, x), rtol=1e-5, atol=1e-6)

  def test_mismatched_permutation_gives_different_logits(self):
    x = random_images(1, batch=4)
    params = model.init_params(make_config(), jax.random.key(5))
    wrong = jax.tree.map(lambda p: p, params)
    wrong['fc1'] = {
      'kernel': params['fc1']['kernel'][model.flatten_permutation('random', (5, 5, 6), 1)],
      'bias': params['fc1']['bias'],
    }
    reordered = self.logits(make_config(flatten_order='chw'), wrong, x)
    self.assertGreater(float(jnp.max(jnp.abs(reordered - self.logits(make_config(), params, x)))), 1e-3)

  @parameterized.parameters('hwc', 'chw', 'random')
  def test_flatten_permutation_is_a_permutation_matching_the_layer(self, order):
    perm = model.flatten_permutation(order, (5, 5, 6), 3)
    np.testing.assert_array_equal(np.sort(perm), np.arange(150))
    config = make_config(flatten_order=order, flatten_seed=3)
    params = model.init_params(config, jax.random.key(0))
    out = model.create_model(config).apply({'params': params}, random_images(1), method=model.CNN.layer_outputs)
    np.testing.assert_array_equal(out['flatten'], np.asarray(out['pool2']).reshape(2, -1)[:, perm])

  def test_chw_is_pytorch_order(self):
    volume = np.arange(150).reshape(5, 5, 6)  # [h, w, c]
    perm = model.flatten_permutation('chw', (5, 5, 6))
    np.testing.assert_array_equal(volume.reshape(-1)[perm], volume.transpose(2, 0, 1).reshape(-1))

  def test_random_order_is_numpys_permutation_for_the_seed(self):
    perms = {seed: model.flatten_permutation('random', (5, 5, 6), seed) for seed in (3, 7)}
    for seed, perm in perms.items():
      np.testing.assert_array_equal(perm, np.random.default_rng(seed).permutation(150))
    self.assertFalse(np.array_equal(perms[3], perms[7]))  # model.flatten_seed picks the order.


class ValidationTest(parameterized.TestCase):
  @parameterized.parameters(
    ({'strides': 0}, r'config\.model\.strides=0 .* integer >= 1'),
    ({'kernel_size': 0}, r'config\.model\.kernel_size=0 .* integer >= 1'),
    # kernel_size and pool_window serve both stages: the valid values listed fit the whole network.
    (
      {'kernel_size': 33},
      r'config\.model\.kernel_size=33 is larger than the 32x32 input of conv1\..* pool_window=2: \[1, 5, 9\]',
    ),
    (
      {'kernel_size': 13},
      r'config\.model\.kernel_size=13 is larger than the 10x10 input of conv2\..* pool_window=2: \[1, 5, 9\]',
    ),
    ({'kernel_size': 10}, r'pool_window=2 does not divide the 23x23 output of conv1\..* pool_window=2: \[1, 5, 9\]'),
    (
      {'pool_window': 3},
      r'config\.model\.pool_window=3 does not divide the 28x28 output of conv1\..* kernel_size=5: \[1, 2\]',
    ),
    (
      {'pool_window': 4},
      r'config\.model\.pool_window=4 does not divide the 3x3 output of conv2\..* kernel_size=5: \[1, 2\]',
    ),
    ({'strides': 3}, r'does not divide the 1x1 output of conv2\. .*strides=3 .* valid strides with both: \[1, 2\]'),
    ({'flatten_seed': -1}, r'config\.model\.flatten_seed=-1 .* integer >= 0'),
    ({'strides': True}, r'config\.model\.strides=True .* integer >= 1'),
    ({'foo': 1}, r"config\.model has no setting foo; the settings are \['conv_features', 'kernel_size'"),
    ({'pool_window': 0}, r'config\.model\.pool_window=0 .* integer >= 1'),
    ({'activation': 'swish'}, r"model\.activation='swish' .* \('relu', 'tanh', 'sigmoid', 'gelu'\)"),
    ({'pool': 'min'}, r"model\.pool='min' .* \('max', 'avg'\)"),
    ({'padding': 'same'}, r"model\.padding='same' .* \('VALID', 'SAME'\)"),
    ({'flatten_order': 'wch'}, r"model\.flatten_order='wch' .* \('hwc', 'chw', 'random'\)"),
    ({'conv_features': (3, 0)}, r'config\.model\.conv_features=\(3, 0\) .* tuple of integers >= 1'),
    ({'conv_features': ()}, r'config\.model\.conv_features=\(\) .* non-empty tuple'),
    ({'hidden_features': (-1,)}, r'config\.model\.hidden_features=\(-1,\) .* integers >= 1'),
    ({'num_classes': 0}, r'config\.model\.num_classes=0 .* integer >= 1'),
  )
  def test_invalid_setting_names_itself_and_the_valid_range(self, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
      model.create_model(make_config(**overrides))
    # Raised before any JAX trace, which would print its note on hidden frames after the message.
    assert not getattr(error.value, '__notes__', None)

  @parameterized.parameters(
    ({'conv_features': 3}, r'config\.model\.conv_features=3 .* non-empty tuple of integers'),
    ({'conv_features': '36'}, r"config\.model\.conv_features='36' .* non-empty tuple of integers"),
    ({'hidden_features': None}, r'config\.model\.hidden_features=None .* tuple of integers >= 1'),
  )
  def test_widths_must_be_tuples_of_integers(self, settings, message):
    with pytest.raises(ValueError, match=message):
      model.CNN(**settings)

  @parameterized.parameters(
    ((32, 32),), ((32, 32, 0),), ((32, 32, 1.5),), ((32, 32, True),), (None,), (tuple(np.array([32, 32, 1])),)
  )
  def test_invalid_input_shape(self, shape):
    config = make_config()
    config.input_shape = shape
    with pytest.raises(ValueError, match=rf'config\.input_shape={re.escape(repr(shape))} is not valid; .* \(height'):
      model.layer_shapes(config)

  @parameterized.parameters(
    ((32, 34, 1), r'config\.model\.pool_window=2 does not divide the 10x11 output of conv2\.'),
    ((34, 32, 1), r'config\.model\.pool_window=2 does not divide the 11x10 output of conv2\.'),
    ((32, 4, 1), r'config\.model\.kernel_size=5 is larger than the 32x4 input of conv1\.'),
    ((4, 32, 1), r'config\.model\.kernel_size=5 is larger than the 4x32 input of conv1\.'),
  )
  def test_the_pool_window_and_kernel_must_fit_both_sides(self, shape, message):
    config = make_config()
    config.input_shape = shape
    with pytest.raises(ValueError, match=message) as error:
      model.layer_shapes(config)
    assert not getattr(error.value, '__notes__', None)

  @parameterized.parameters((32, 32, 1), (1, 1, 32, 32, 1))
  def test_images_must_be_a_batch(self, *shape):
    config = make_config()
    params = model.init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape(f'CNN expects images [B, H, W, C]; got an array of shape {shape}')):
      model.create_model(config).apply({'params': params}, jnp.zeros(shape))

  def test_non_square_input(self):
    config = make_config()
    config.input_shape = (32, 36, 1)
    # conv1 28x32, pool 14x16, conv2 10x12, pool 5x6: 5*6*6 = 180 inputs to fc1.
    self.assertEqual(model.layer_shapes(config)['flatten'], (180,))
    x = jax.random.normal(jax.random.key(0), (2, 32, 36, 1))
    logits = model.create_model(config).apply({'params': model.init_params(config, jax.random.key(1))}, x)
    self.assertEqual(logits.shape, (2, 10))

  def test_valid_non_default_geometry(self):
    config = make_config(strides=2, padding='SAME', pool='avg', conv_features=(4,), hidden_features=())
    # 32 -> conv stride 2 SAME -> 16 -> pool -> 8; 8*8*4 = 256 -> fc1 (logits).
    self.assertEqual(model.layer_shapes(config)['flatten'], (256,))
    self.assertEqual(model.layer_shapes(config)['fc1'], (10,))


@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
def test_conv_windows_on_a_non_square_input_and_kernel(strides, padding):
  # Height and width, kh and kw differ, so a height used for a width (or kh for kw) shows.
  x = jax.random.normal(jax.random.key(0), (2, 20, 13, 3))
  kernel = jax.random.normal(jax.random.key(1), (5, 2, 3, 4))
  bias = jax.random.normal(jax.random.key(2), (4,))
  conv = model.window_map(model.conv_windows(x, kernel, bias, strides, padding, 1))
  np.testing.assert_allclose(conv, lax_conv(x, kernel, strides, padding) + bias, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('strides', [2, 3])
def test_same_padding_with_a_kernel_smaller_than_its_stride(strides):
  # kernel_size=1, strides=2, padding='SAME' is a valid config; its padding would be negative without the clamp.
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  kernel = jax.random.normal(jax.random.key(1), (1, 1, 3, 2))
  conv = model.conv2d(x, kernel, strides, 'SAME')
  np.testing.assert_allclose(conv, lax_conv(x, kernel, strides, 'SAME'), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('size, padding, pool_window', [(40, 'SAME', 2), (64, 'VALID', 1)])
def test_strided_conv_over_several_column_blocks(size, padding, pool_window):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  kernel = jax.random.normal(jax.random.key(1), (5, 5, 3, 4))
  out_w = model.conv_output_size(size, 5, 2, padding)
  assert out_w // model._block_width(out_w, pool_window) > 1  # Each block starts at its own strided column.
  conv = model.window_map(model.conv_windows(x, kernel, jnp.zeros(4), 2, padding, pool_window))
  np.testing.assert_allclose(conv, lax_conv(x, kernel, 2, padding), atol=1e-4, rtol=1e-5)
