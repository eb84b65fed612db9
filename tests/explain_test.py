"""The three experiments of explain.py with tiny settings: the facts they show hold, and each writes its PNG."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

import explain
import input_pipeline
import model

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# One epoch of the 4,000 embedded training digits at batch 64.
STEPS = 62


@pytest.fixture(autouse=True, scope='module')
def fast_compiles():
  """Most XLA optimisations off, as flax's tests do: these tests spend far more time compiling than running."""
  previous = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  # Both ways: no test here runs a program compiled with the optimisations, nor a later test one compiled without.
  # A sweep's initial parameters equal its single runs' bitwise only when both are compiled alike.
  jax.clear_caches()
  yield
  jax.config.update('jax_disable_most_optimizations', previous)
  jax.clear_caches()


def assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  assert np.std(matplotlib.image.imread(path)[..., :3]) > 0.05


def test_a_picture_of_an_earlier_run_is_kept(tmp_path):
  paths = []
  for colour in ('red', 'blue'):
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], color=colour)
    paths.append(explain._save(fig, str(tmp_path / 'flatten.png')))
  assert paths == [str(tmp_path / 'flatten.png'), str(tmp_path / 'flatten_2.png')]
  assert not np.array_equal(*(matplotlib.image.imread(path) for path in paths))


@pytest.mark.parametrize(
  'out_dir, message',
  [
    ('notes', "notes' is not a directory; name a directory."),  # Before any training.
    ('', "--out_dir='' is empty; name a directory."),
    ('notes/explain', 'cannot be made ([Errno 20] Not a directory'),  # Before any training.
    # A directory in which no file can be made: the PNG could not be saved after the training.
    pytest.param(
      '/proc',
      "--out_dir='/proc' cannot be written to",
      marks=pytest.mark.skipif(not sys.platform.startswith('linux'), reason="Linux's /proc"),
    ),
  ],
)
def test_an_out_dir_that_cannot_be_a_directory_is_refused_before_any_training(tmp_path, out_dir, message):
  (tmp_path / 'notes').write_text('mine')
  script = os.path.join(os.path.dirname(explain.__file__), 'explain.py')
  command = [sys.executable, script, '--experiment=flatten', f'--out_dir={tmp_path / out_dir if out_dir else ""}']
  result = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and message in result.stderr and 'Traceback' not in result.stderr
  assert os.listdir(tmp_path) == ['notes'] and (tmp_path / 'notes').read_text() == 'mine'


def test_a_device_count_that_does_not_divide_the_batch_is_refused_by_name_before_any_training(tmp_path):
  # explain.py has no batch-size flag: the advice is about the devices, not config.batch_size.
  script = os.path.join(os.path.dirname(explain.__file__), 'explain.py')
  command = [sys.executable, script, '--experiment=flatten', f'--out_dir={tmp_path / "explain"}']
  environment = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=6')
  result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert "the default config's batch of 64, which does not divide over the 6 devices" in result.stderr
  assert os.listdir(tmp_path) == []


def test_flatten_orders_follow_one_loss_curve(tmp_path, monkeypatch):
  test_data = input_pipeline.load_split(explain.make_config(1), 'test')
  images = test_data['image'][:16]
  fit, runs, trained_from_one_start = explain.fit, [], {}

  def recording_fit(config, state, data, fill=None):
    # Before the fit, which takes the state's arrays (donated).
    logits = np.asarray(state.apply_fn({'params': state.params}, images)) if config.num_models == 1 else None
    runs.append((config.model.flatten_order, config.num_models, logits, np.asarray(state.params['fc1']['kernel'])))
    trained, losses = fit(config, state, data, fill)
    if config.num_models == 1:
      trained_from_one_start[config.model.flatten_order] = config, trained
    return trained, losses

  monkeypatch.setattr(explain, 'fit', recording_fit)
  results = explain.flatten(str(tmp_path), num_epochs=1, num_seeds=2)
  # Each order trains once from the shared start and once as a sweep of 2 seeds of its own.
  assert [run[:2] for run in runs] == [(order, k) for order in explain.ORDERS for k in (1, 2)]
  (_, _, hwc_logits, hwc_kernel), *others = (run for run in runs if run[1] == 1)
  for order, _, logits, kernel in others:  # Another flatten order, fc1's rows permuted: the same function.
    assert not np.array_equal(kernel, hwc_kernel), order
    np.testing.assert_allclose(logits, hwc_logits, rtol=0, atol=1e-5, err_msg=order)
  for order, (config, trained) in trained_from_one_start.items():  # Each same-init run's own test accuracy.
    assert results['same_init_test_accuracy'][order] == explain.accuracy(config, trained, test_data)[0]
  # The fact: the same initial function, trained on the same batches and shifts, follows one loss curve whatever the
  # flatten order: to float32 rounding at first (fc1 sums its 150 products in another order), and a wrong
  # permutation would differ from the first step. Rounding differences then compound, and can tip a near-tie (a
  # max-pool or ReLU choice, most likely) and grow. Measured on a 2-core CPU: in one run every order stayed within
  # 4.8e-7; in another 'random' was 1.4e-6 off at step 5, 1.6e-5 at step 9 and at most 7.6e-4 over the epoch.
  assert results['max_abs_loss_difference'] < 1e-2
  assert set(results['loss_curves']) == {'hwc', 'chw', 'random'}
  curves = results['loss_curves'].values()
  assert results['max_abs_loss_difference'] == max(np.max(np.abs(c - results['loss_curves']['hwc'])) for c in curves)
  for order, curve in results['loss_curves'].items():
    assert curve.shape == (STEPS,)
    np.testing.assert_allclose(curve[:4], results['loss_curves']['hwc'][:4], rtol=0, atol=1e-6)
    assert curve[-1] < curve[0] / 3, order  # It did learn: the loss starts near ln(10) = 2.3.
    assert len(results['test_accuracy'][order]) == 2
    assert min(results['test_accuracy'][order]) > 0.6  # Chance is 0.1.
  # Independent runs: each order's sweep has seeds of its own.
  assert results['seeds'] == {'hwc': [0, 1], 'chw': [2, 3], 'random': [4, 5]}
  assert_png(results['png'])


def test_channels_real_conv_and_misreading_are_different_functions(tmp_path):
  results = explain.channels(str(tmp_path), num_epochs=1, num_seeds=2)
  # real: conv1 5*5*3*3 + 3 = 228, conv2 5*5*3*6 + 6 = 456, fc1 150*100 + 100 = 15,100, fc2 100*10 + 10 = 1,010.
  # misreading: conv1's shared 2D filters are 5*5*1*3 + 3 = 78; the rest is the same.
  assert results['params'] == {'real': 228 + 456 + 15_100 + 1_010, 'misread': 78 + 456 + 15_100 + 1_010}
  assert results['params'] == {'real': 16_794, 'misread': 16_644}
  difference = results['max_logit_difference']
  assert difference['grey'] < 1e-4  # The matched weights agree where all channels are equal ...
  assert difference['tinted'] > 1e-2  # ... and not once the channels differ.
  assert difference['mixed'] > 0.1
  assert results['same_class']['grey'] == 1.0  # Each grey digit gets one class from both.
  for accuracy in results['test_accuracy'].values():
    assert len(accuracy) == 2
    assert min(accuracy) > 0.5
  assert results['test_accuracy']['real'] != results['test_accuracy']['misread']  # Each network's own.
  assert_png(results['png'])


def test_a_sweeps_models_are_unstacked_as_the_single_runs_of_their_seeds():
  sweep = explain.make_config(1, num_models=3)
  stacked = explain.initial_state(sweep, 4000).params
  for k, params in enumerate(explain.unstack(sweep, stacked)):
    jax.tree.map(np.testing.assert_array_equal, params, model.init_params(explain.make_config(1), jax.random.key(k)))
  assert explain.unstack(explain.make_config(1), stacked) == [stacked]


def test_matched_inputs_are_grey_tinted_and_mixed_from_three_digits():
  tinted = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  inputs = explain.matched_inputs(tinted)
  assert list(inputs) == list(explain.MATCHED_INPUTS)
  np.testing.assert_allclose(inputs['grey'], np.repeat(np.mean(tinted, -1, keepdims=True), 3, -1), rtol=1e-6)
  np.testing.assert_array_equal(inputs['tinted'], tinted)
  for i in range(4):  # Red of digit i, green of digit i - 1, blue of digit i - 2.
    for c in range(3):
      np.testing.assert_array_equal(inputs['mixed'][i, ..., c], tinted[(i - c) % 4, ..., c])


def test_per_channel_logits_of_a_grey_image_are_the_one_channel_networks():
  config = explain.make_config(1)
  cnn = model.create_model(config)
  params = model.init_params(config, jax.random.key(0))
  grey = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  misread = explain.per_channel_logits(cnn, {'params': params}, jnp.repeat(grey, 3, axis=-1))
  np.testing.assert_allclose(misread, cnn.apply({'params': params}, grey), atol=1e-5)


def test_colourise_tints_the_ink_and_keeps_the_background_black():
  images = np.zeros((5, 32, 32, 1), np.float32) - 0.4  # Background at the minimum, as after normalisation.
  images[:, 10:20, 12, 0] = 3.0
  rgb, colours = explain.colourise(images, seed=0)
  assert rgb.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(rgb[:, 0, 0], 0)
  np.testing.assert_allclose(rgb[:, 15, 12], colours)
  np.testing.assert_allclose(colours.max(axis=1), 1)
  assert len(np.unique(colours, axis=0)) == 5  # A colour per image,
  np.testing.assert_array_equal(explain.colourise(images, seed=0)[1], colours)  # drawn from the seed alone.
  assert not np.allclose(explain.colourise(images, seed=1)[1], colours)


def test_tinted_splits_are_normalised_per_channel_with_fresh_test_colours():
  digits = np.full((40, 32, 32, 1), -0.4, np.float32)  # Background at the minimum, as after normalisation.
  digits[:, 8:24, 14:18] = np.linspace(0.5, 3.0, 40)[:, None, None, None]
  grey = {'image': digits, 'label': np.arange(40) % 10}
  train, test, black, rgb_test = explain.tinted_splits(grey, grey, seed=0)
  # Each channel has its own mean and std: a channel's statistics follow its own colour draws.
  np.testing.assert_allclose(train['image'].mean(axis=(0, 1, 2)), 0, atol=1e-3)
  np.testing.assert_allclose(train['image'].std(axis=(0, 1, 2)), 1, atol=1e-3)
  np.testing.assert_allclose(train['image'][:, 0, 0], np.broadcast_to(black, (40, 3)), atol=1e-6)
  np.testing.assert_array_equal(test['label'], grey['label'])
  np.testing.assert_allclose(test['image'][:, 0, 0], np.broadcast_to(black, (40, 3)), atol=1e-6)
  assert rgb_test.shape == (40, 32, 32, 3) and rgb_test.min() == 0 and rgb_test.max() == 1
  # The same grey digits are tinted with other colours in the test split: its colours are draws of their own.
  assert not np.allclose(test['image'][:, 16, 16], train['image'][:, 16, 16], atol=0.1)


def test_shift_images_moves_within_the_frame_without_wrapping():
  images = jnp.arange(16.0).reshape(1, 4, 4, 1)
  right = explain.shift_images(images, 0, 1, fill=-1.0)[0, ..., 0]
  np.testing.assert_array_equal(right[:, 0], -1)
  np.testing.assert_array_equal(right[:, 1:], images[0, :, :3, 0])
  up = explain.shift_images(images, -2, 0, fill=-1.0)[0, ..., 0]
  np.testing.assert_array_equal(up[:2], images[0, 2:, :, 0])
  np.testing.assert_array_equal(up[2:], -1)


def test_cosine_similarity_of_each_pair():
  a = jnp.array([[1.0, 0.0], [1.0, 2.0], [1.0, 0.0]])
  b = jnp.array([[3.0, 4.0], [-2.0, -4.0], [0.0, 5.0]])
  np.testing.assert_allclose(explain._cosine(a, b), [3 / 5, -1, 0], atol=1e-6)


def test_ink_lost_past_the_frame_per_digit_and_direction():
  assert sorted(explain.DIRECTIONS) == [(-1, 0), (0, -1), (0, 1), (1, 0)]  # One pixel up, left, right and down.
  background = -0.5
  images = np.full((4, 8, 8, 1), background, np.float32)
  images[0, 2:6, 7] = 1.0  # A stroke on the right edge,
  images[1, 3:5, 3:5] = 1.0  # a blob in the middle,
  images[2, 0, 2:6] = 1.0  # a stroke on the top edge,
  images[3, 2:6, 6:8] = 1.0  # a stroke two columns wide at the right edge.
  moved = [explain.shift_images(images, dy, dx, background) for dy, dx in explain.DIRECTIONS]
  share, digits = explain.ink_lost(images, moved, background)
  # Of the 16 (digit, direction) pairs, digit 0 loses all its ink moving right, digit 2 moving up, and digit 3 half
  # of it moving right; any loss counts its digit.
  assert share == pytest.approx(2.5 / 16)
  assert digits == pytest.approx(3 / 4)


def test_the_tables_and_plots_state_what_was_measured():
  flatten = {
    'loss_curves': {order: np.array([2.0, 1.0]) for order in explain.ORDERS},
    'same_init_test_accuracy': dict.fromkeys(explain.ORDERS, 0.9),
    'test_accuracy': dict.fromkeys(explain.ORDERS, [0.9, 0.91, 0.92, 0.93, 0.94]),
    'seeds': {order: list(range(5)) for order in explain.ORDERS},
  }
  assert '  hwc     seeds 0-4     0.9200 ± 0.0141' in explain._flatten_table(flatten, 1, 4000, 1000)
  # rel = (similarity - other) / (1 - other): (0.75 - 0.5) / 0.5, halfway between identical and another digit.
  invariance = {
    'shifts': [0, 1],
    'ink_lost': [0.0, 0.01],
    'digits_losing_ink': [0.0, 0.1],
    'test_accuracy': 0.95,
    'similarity': {name: dict.fromkeys(explain.INVARIANCE_LAYERS, [1.0, 0.75]) for name in ('trained', 'untrained')},
    'other_digit': {
      name: {**dict.fromkeys(explain.INVARIANCE_LAYERS, 0.5), 'agree': 0.1} for name in ('trained', 'untrained')
    },
    'agreement': {name: [1.0, 0.8] for name in ('trained', 'untrained')},
  }
  assert f'  {"conv1":15}   1.000   0.750   0.500   0.500' in explain._invariance_table(invariance, 1, 100).splitlines()
  ax = Figure().subplots()
  explain._plot_runs(ax, {'hwc': [0.1, 0.2, 0.9]})
  (errorbar,) = ax.containers
  assert errorbar.lines[0].get_ydata() == pytest.approx([0.4])  # The mean, not the median 0.2.


def test_invariance_similarities(tmp_path):
  results = explain.invariance(str(tmp_path), num_epochs=1, max_shift=3, num_images=100)
  assert results['shifts'] == [0, 1, 2, 3]
  similarity, other = results['similarity'], results['other_digit']
  for name in ('trained', 'untrained'):
    assert set(similarity[name]) == set(explain.INVARIANCE_LAYERS)
    for layer, values in similarity[name].items():
      assert values[0] == pytest.approx(1, abs=1e-5), (name, layer)
      assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in values), (name, layer)
      assert -1 - 1e-6 <= other[name][layer] <= 1 + 1e-6
      # A shifted digit overlaps its original less the further it moves, and no layer of this network is exactly
      # shift-invariant (conv and pool maps move with the input; the dense layers see positions), so similarity falls
      # strictly with the shift. The smallest step measured over 7 seeds/settings: 0.019 (trained fc1, s=0 to 1).
      assert np.all(np.diff(values) < 0), (name, layer, values)
      # A 1-pixel shift of the same digit keeps every layer more alike than a different digit does (the smallest
      # margin measured: 0.10, untrained fc1).
      assert values[1] > other[name][layer] + 0.05, (name, layer, values[1], other[name][layer])
    for k in (1, 2):
      # Max pooling over 2x2 windows absorbs 1-pixel moves: a window's max is unchanged while the peak stays inside
      # it, so pool_k is more alike than the conv_k it pools, at every shift and with or without training (the
      # smallest margins measured: 0.027 at s=1, trained pool2 - conv2; 0.071 at s=2; 0.044 at s=3 over 3 seeds).
      for pool, conv in zip(similarity[name][f'pool{k}'][1:], similarity[name][f'conv{k}'][1:], strict=True):
        assert pool > conv, (name, k, pool, conv)
    assert results['agreement'][name][0] == 1
  # The input row is the cosine of each digit's ink with its moved copy, which no weight enters: here moved with
  # np.roll, the s rows or columns it wraps round set to 0 (no ink), in float64.
  images = input_pipeline.load_split(explain.make_config(1), 'test')['image'][:100]
  ink = np.asarray(images - images.min(), np.float64)

  def moved_ink(s, dy, dx):
    moved = np.roll(ink, (s * dy, s * dx), (1, 2))
    wrapped_rows = slice(None, s) if dy > 0 else slice(32 - s, None) if dy < 0 else slice(0, 0)
    wrapped_columns = slice(None, s) if dx > 0 else slice(32 - s, None) if dx < 0 else slice(0, 0)
    moved[:, wrapped_rows] = moved[:, :, wrapped_columns] = 0
    return moved

  def mean_cosine(moved):
    a, b = ink.reshape(100, -1), moved.reshape(100, -1)
    return np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))

  shifts = (0, 1, 2, 3)
  expected = [np.mean([mean_cosine(moved_ink(s, dy, dx)) for dy, dx in explain.DIRECTIONS]) for s in shifts]
  for name in ('trained', 'untrained'):
    np.testing.assert_allclose(similarity[name]['input'], expected, rtol=1e-5)
    assert other[name]['input'] == pytest.approx(mean_cosine(np.roll(ink, 1, 0)), rel=1e-5)  # The next digit.
  # Training separates the classes: a fresh network's logits are much alike for any two digits (0.67-0.81 measured)
  # and a trained one's are not (0.14-0.55), while a 1-pixel shift keeps both near 1 (0.92-0.98) and keeps the
  # trained prediction for most digits (0.82-0.91 of them; a different digit shares it for 0.04-0.08).
  assert other['trained']['logits'] < other['untrained']['logits'] - 0.1
  assert results['agreement']['trained'][1] > other['trained']['agree'] + 0.5
  # The ink a move of s pixels takes past the frame is what lay in the s outer rows or columns on that side. The
  # digits have a 2-pixel zero border, so up to 2 pixels lose none, and 3 pixels take the 5 of these 100 digits that
  # reach their 28x28 frame's edge.
  ink_sums = ink.sum(axis=(1, 2, 3))
  for s in shifts:
    strips = [ink[:, 32 - s :], ink[:, :s], ink[:, :, 32 - s :], ink[:, :, :s]]  # Down, up, right, left.
    lost = np.stack([strip.sum(axis=(1, 2, 3)) / ink_sums for strip in strips])  # [directions, digits]
    assert results['ink_lost'][s] == pytest.approx(lost.mean(), abs=1e-12)
    assert results['digits_losing_ink'][s] == np.mean(np.any(lost > 0, axis=0))
  assert results['digits_losing_ink'][:3] == [0, 0, 0] and results['digits_losing_ink'][3] > 0
  assert_png(results['png'])
