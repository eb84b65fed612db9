"""Tests for input_pipeline: the embedded set, the tfds path under mock data, batch order, augmentation and errors."""

import functools
import hashlib
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import input_pipeline
from configs import default

TFDS_SHAPES = {'mnist': (32, 32, 1), 'fashion_mnist': (32, 32, 1), 'cifar10': (32, 32, 3)}
# The published per-channel mean and std of each training set's pixels on the [0, 1] scale, as stored (28x28 digits,
# 32x32 CIFAR-10, whose std is often quoted as (0.2023, 0.1994, 0.2010), a mean of per-image stds): the reference
# that the normalisation of the tfds datasets is held to.
PUBLISHED_STATS = {
  'mnist': ((0.1307,), (0.3081,)),
  'fashion_mnist': ((0.2860,), (0.3530,)),
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _border() -> np.ndarray:
  """bool [32, 32]: the 2-pixel frame added around 28x28 digits."""
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  return border


def _config(**overrides):
  config = default.get_config()
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def train_split():
  return input_pipeline.load_split(_config(), 'train')


@pytest.fixture(scope='module')
def test_split():
  return input_pipeline.load_split(_config(), 'test')


def test_embedded_set_is_normalised_and_balanced(train_split, test_split):
  for data, per_class in ((train_split, 400), (test_split, 100)):
    assert data['image'].shape == (10 * per_class, 32, 32, 1) and data['image'].dtype == np.float32
    assert data['label'].dtype == np.int32
    np.testing.assert_array_equal(np.bincount(data['label']), [per_class] * 10)
  # 32x32 inputs with mean 0 and std 1 over the train split, as LeNet-5 had.
  assert abs(train_split['image'].mean()) < 1e-3 and abs(train_split['image'].std() - 1) < 1e-3
  mean, std = input_pipeline.padded_stats(*input_pipeline.TRAIN_STATS['embedded_mnist'], fraction=784 / 1024)
  background, white = -mean[0] / std[0], (1 - mean[0]) / std[0]
  np.testing.assert_array_equal(test_split['image'][:, _border()], np.float32(background))
  np.testing.assert_array_equal(input_pipeline.black('embedded_mnist'), [np.float32(background)])
  assert test_split['image'].min() == pytest.approx(background) and test_split['image'].max() == pytest.approx(white)
  with np.load(input_pipeline.EMBEDDED_PATH) as npz:  # The stored digits of each split, in order, framed by 2 pixels.
    for data, split in ((train_split, 'train'), (test_split, 'test')):
      digits = data['image'][:, 2:30, 2:30, 0] * std[0] + mean[0]
      np.testing.assert_allclose(digits, npz[f'x_{split}'] / 255, rtol=0, atol=1e-6)
      np.testing.assert_array_equal(data['label'], npz[f'y_{split}'])


def test_embedded_stats_are_those_of_the_shipped_train_split():
  with np.load(input_pipeline.EMBEDDED_PATH) as npz:
    x28 = npz['x_train'].astype(np.float64) / 255
  (mean,), (std,) = input_pipeline.TRAIN_STATS['embedded_mnist']
  assert x28.mean() == pytest.approx(mean, abs=5e-5) and x28.std() == pytest.approx(std, abs=5e-5)
  x32 = np.pad(x28, ((0, 0), (2, 2), (2, 2)))
  padded_mean, padded_std = input_pipeline.padded_stats(x28.mean(), x28.std(), fraction=784 / 1024)
  assert padded_mean == pytest.approx(x32.mean()) and padded_std == pytest.approx(x32.std())


def test_embedded_train_and_test_share_no_image():
  with np.load(input_pipeline.EMBEDDED_PATH) as npz:
    train_hashes = {hashlib.sha256(x.tobytes()).digest() for x in npz['x_train']}
    test_hashes = {hashlib.sha256(x.tobytes()).digest() for x in npz['x_test']}
    assert npz['split_seed'] == 0
  assert len(train_hashes) == 4000 and len(test_hashes) == 1000 and not train_hashes & test_hashes


def test_validation_is_the_held_out_tail_of_train(train_split):
  config = _config(validation_size=500)
  held_in, validation = input_pipeline.load_split(config, 'train'), input_pipeline.load_split(config, 'validation')
  np.testing.assert_array_equal(held_in['image'], train_split['image'][:3500])
  np.testing.assert_array_equal(held_in['label'], train_split['label'][:3500])
  np.testing.assert_array_equal(validation['image'], train_split['image'][3500:])
  np.testing.assert_array_equal(validation['label'], train_split['label'][3500:])
  assert np.bincount(validation['label']).min() >= 30  # The train split is shuffled, not grouped by class.


def test_split_sizes_are_those_of_the_splits_with_no_image_read(image_reads, monkeypatch):
  arrays_read, getitem = [], np.lib.npyio.NpzFile.__getitem__
  monkeypatch.setattr(
    np.lib.npyio.NpzFile, '__getitem__', lambda npz, key: arrays_read.append(key) or getitem(npz, key)
  )
  config = _config(validation_size=500)
  sizes = [input_pipeline.split_size(config, split) for split in ('train', 'validation', 'test')]
  assert sizes == [3500, 500, 1000]
  assert image_reads == []
  assert sorted(set(arrays_read)) == ['y_test', 'y_train']  # Only the labels were decompressed, not the images.


@pytest.mark.parametrize(
  'split, index', [('test', 0), ('test', 999), ('train', 3499), ('validation', 0), ('validation', 499)]
)
def test_one_example_is_that_row_of_its_split(split, index):
  config = _config(validation_size=500)
  image, label = input_pipeline.load_example(config, split, index)
  data = input_pipeline.load_split(config, split)
  np.testing.assert_array_equal(image, data['image'][index])
  assert label == data['label'][index] and isinstance(label, int)


def test_one_tfds_example_is_that_row_of_its_split(tmp_path, image_reads):
  config = _config(dataset='cifar10', data_dir=str(tmp_path), input_shape=TFDS_SHAPES['cifar10'])
  with tfds.testing.mock_data(num_examples=6):
    image, label = input_pipeline.load_example(config, 'test', 4)
    data = input_pipeline.load_split(config, 'test')
  # The example alone is read (and decoded): a real split holds 10,000 images.
  assert image_reads == [('cifar10', 'test', str(tmp_path), range(4, 5)), ('cifar10', 'test', str(tmp_path), range(6))]
  np.testing.assert_array_equal(image, data['image'][4])
  assert label == data['label'][4]


@pytest.mark.parametrize('split, index, last', [('test', 1000, 999), ('test', -1, 999), ('validation', 500, 499)])
def test_an_example_outside_its_split_is_refused_before_any_image_is_read(image_reads, split, index, last):
  message = rf'index={index} is not valid; the embedded_mnist {split} split has examples 0 to {last}\.'
  with pytest.raises(ValueError, match=message):
    input_pipeline.load_example(_config(validation_size=500), split, index)
  assert image_reads == []


def test_embedded_default_imports_neither_tensorflow_nor_tfds():
  # In a fresh interpreter, since other tests in this process import tfds. The mock tfds path must not need
  # TensorFlow either.
  code = textwrap.dedent("""
    import sys, tempfile
    import input_pipeline
    from configs import default
    input_pipeline.load_split(default.get_config(), 'train')
    assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules, 'imported at the default'
    import tensorflow_datasets as tfds
    config = default.get_config()
    config.dataset, config.data_dir, config.batch_size = 'mnist', tempfile.mkdtemp(), 2
    with tfds.testing.mock_data(num_examples=2):
      input_pipeline.load_split(config, 'train')
    assert 'tensorflow' not in sys.modules, 'imported by the tfds path'
  """)
  repo = pathlib.Path(input_pipeline.__file__).parent
  result = subprocess.run([sys.executable, '-c', code], cwd=repo, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize('name', TFDS_SHAPES)
def test_tfds_datasets_load_under_mock_data(name, tmp_path):
  config = _config(dataset=name, data_dir=str(tmp_path), input_shape=TFDS_SHAPES[name])
  with tfds.testing.mock_data(num_examples=6):
    data = input_pipeline.load_split(config, 'test')
  assert data['image'].shape == (6, *TFDS_SHAPES[name]) and data['image'].dtype == np.float32
  assert data['label'].dtype == np.int32 and set(data['label']) <= set(range(10))
  if name != 'cifar10':  # 28x28 digits, zero-padded: the 2-pixel border is the normalised background.
    mean, std = input_pipeline.padded_stats(*input_pipeline.TRAIN_STATS[name], fraction=784 / 1024)
    background = np.float32(-mean[0] / std[0])
    np.testing.assert_array_equal(data['image'][:, _border()], background)
    assert np.any(data['image'][:, 2:30, 2:30] != background)
  # Mock images are uniform over 0-255, so each channel holds 0s (a miss has probability 1e-10): black.
  low = data['image'].min(axis=(0, 1, 2))
  np.testing.assert_array_equal(low, input_pipeline.black(name))
  # ... and 1s, so the two lowest values give the mean and std removed: the published ones, once the digits are
  # zero-padded to 32x32 (a share f = 784/1024 of the pixels keeps its values: mean f*m, mean square f*(s^2 + m^2)).
  channels = data['image'].reshape(-1, data['image'].shape[-1]).T
  removed_std = np.array([1 / 255 / np.diff(np.unique(values)[:2])[0] for values in channels])
  mean, std = (np.array(stats) for stats in PUBLISHED_STATS[name])
  f = 1.0 if name == 'cifar10' else 784 / 1024
  np.testing.assert_allclose(-low * removed_std, f * mean, rtol=1e-5)
  np.testing.assert_allclose(removed_std, np.sqrt(f * (std**2 + mean**2) - (f * mean) ** 2), rtol=1e-5)


@pytest.mark.parametrize('in_config', [True, False], ids=['config.data_dir', 'TFDS_DATA_DIR'])
def test_missing_tfds_data_fails_fast_with_instructions(in_config, tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(tmp_path))  # tfds read the variable when imported.
  start = time.monotonic()
  # The command tfds' own `tfds build` would need apache-beam, which tfds does not install.
  command = "tfds.builder('fashion_mnist', data_dir='DIR', file_format='array_record').download_and_prepare()"
  message = rf"array_record.*{re.escape(command)}.*config.data_dir=DIR.*config.dataset='embedded_mnist'"
  with pytest.raises(FileNotFoundError, match=message):
    input_pipeline.load_split(_config(dataset='fashion_mnist', data_dir=str(tmp_path) if in_config else None), 'train')
  assert time.monotonic() - start < 10
  assert not list(tmp_path.iterdir())  # Nothing downloaded or half-prepared.


def test_an_impossible_validation_size_or_batch_size_is_refused_before_any_image_is_read(image_reads, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    for validation_size in (6, -1):
      config = _config(dataset='mnist', data_dir=str(tmp_path), validation_size=validation_size)
      message = rf'validation_size={validation_size} is not valid; it must be from 0 to 5, less than the 6 examples'
      with pytest.raises(ValueError, match=message):
        input_pipeline.load_split(config, 'train')
    config = _config(dataset='mnist', data_dir=str(tmp_path), validation_size=2, batch_size=5)
    message = (
      'config.batch_size=5 is not valid; .* from 1 to 4, the number of training examples left after validation_size=2'
    )
    with pytest.raises(ValueError, match=message):
      input_pipeline.load_split(config, 'train')  # 6 examples, 2 of them held out.
    assert image_reads == []  # A split of 50,000 images would be read and decoded first.
    config = _config(dataset='mnist', data_dir=str(tmp_path), validation_size=5)
    assert len(input_pipeline.load_split(config, 'validation')['label']) == 5
  assert image_reads == [('mnist', 'train', str(tmp_path), range(1, 6))]  # The held-out tail of train.


def _epoch(data, seed=0, epoch=0):
  """Every unaugmented batch of an epoch at B=128, as train.py gathers them."""
  shuffle_key, augment_key = input_pipeline.epoch_keys(seed, epoch)
  indices = input_pipeline.shuffled_batch_indices(shuffle_key, len(data['label']), 128)
  return [jax.device_get(input_pipeline.train_batch(data, indices, augment_key, step)) for step in range(len(indices))]


def test_batch_order_is_a_pure_function_of_seed_and_epoch(train_split):
  data = jax.device_put(train_split)
  first, again, other_seed, next_epoch = _epoch(data), _epoch(data), _epoch(data, seed=1), _epoch(data, epoch=1)
  assert len(first) == input_pipeline.steps_per_epoch(4000, 128) == 31
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(first[0]['label'], other_seed[0]['label'])
  assert not np.array_equal(first[0]['label'], next_epoch[0]['label'])
  shuffle_key, _ = input_pipeline.epoch_keys(0, 0)
  indices = np.asarray(input_pipeline.shuffled_batch_indices(shuffle_key, 4000, 128))
  assert indices.dtype == np.int32 and indices.shape == (31, 128) and len(np.unique(indices)) == 31 * 128
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in first]), train_split['label'][indices.reshape(-1)])
  np.testing.assert_array_equal(first[-1]['image'], train_split['image'][indices[-1]])
  # The epoch may be traced, for an epoch run inside jit.
  traced = jax.jit(lambda e: input_pipeline.shuffled_batch_indices(input_pipeline.epoch_keys(0, e)[0], 4000, 128))(0)
  np.testing.assert_array_equal(traced, indices)


def test_shuffle_and_augmentation_keys_are_split_from_the_epoch_key():
  # A key is used once: the shuffle does not also seed the augmentations (step 0's flips drew from the
  # permutation's second round when both came from one key).
  for seed, epoch in [(0, 0), (0, 1), (3, 0)]:
    epoch_key = jax.random.fold_in(jax.random.key(seed), epoch)
    expected = jax.random.split(epoch_key)
    keys = input_pipeline.epoch_keys(seed, epoch)
    np.testing.assert_array_equal(jax.random.key_data(jnp.stack(keys)), jax.random.key_data(expected))


# (0, False) is no augmentation, (1, False) the digits' default, (4, True) cifar10's.
@pytest.mark.parametrize('crop_padding, flip', [(0, False), (1, False), (0, True), (4, True)])
def test_augmented_batches_follow_the_documented_keys(train_split, crop_padding, flip):
  step = 3
  shuffle_key, augment_key = input_pipeline.epoch_keys(0, 0)
  indices = input_pipeline.shuffled_batch_indices(shuffle_key, 4000, 128)
  black = input_pipeline.black('embedded_mnist')
  batch = input_pipeline.train_batch(train_split, indices, augment_key, step, crop_padding, flip, black)
  images = train_split['image'][indices[step]]
  np.testing.assert_array_equal(batch['label'], train_split['label'][indices[step]])
  if not (crop_padding or flip):
    np.testing.assert_array_equal(batch['image'], images)
    return
  expected = input_pipeline.augment(
    jnp.asarray(images), jax.random.fold_in(augment_key, step), crop_padding, flip, black
  )
  np.testing.assert_array_equal(batch['image'], expected)
  assert not np.array_equal(batch['image'], images)
  if crop_padding <= 2:  # A shifted digit keeps a background frame, as every test digit has: filling with 0 (the
    # mean colour) gave shifted digits a grey edge.
    frame = np.ones((32, 32), bool)
    frame[2 - crop_padding : 30 + crop_padding, 2 - crop_padding : 30 + crop_padding] = False
    np.testing.assert_array_equal(batch['image'][:, frame], black[0])


@pytest.mark.parametrize('n', [1000, 999, 50])
def test_eval_batches_cover_the_split_exactly_once(test_split, n):
  data = {'image': test_split['image'][:n], 'label': test_split['label'][:n]}
  batches = [jax.device_get(b) for b in input_pipeline.eval_batches(data, 100)]
  assert len(batches) == -(-n // 100) and all(b['image'].shape == (100, 32, 32, 1) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == n and mask[:n].all()
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[mask], data['label'])
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in batches])[mask], data['image'])
  assert not np.concatenate([b['image'] for b in batches])[~mask].any()


def test_augment():
  images = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32, 32, 3)), jnp.float32)
  p = 4
  no_flip = jnp.zeros(16, bool)
  centre = jnp.full((16, 2), p)
  fill = np.array([-1.5, 0.25, 2], np.float32)  # One colour per channel.
  crop_and_flip = functools.partial(input_pipeline.crop_and_flip, padding=p, fill=fill)
  np.testing.assert_array_equal(crop_and_flip(images, centre, no_flip), images)
  np.testing.assert_array_equal(crop_and_flip(images, centre, ~no_flip), images[:, :, ::-1])
  corner = crop_and_flip(images, jnp.zeros((16, 2), int), no_flip)  # Shifted down-right by p.
  np.testing.assert_array_equal(corner[:, p:, p:], images[:, :-p, :-p])
  np.testing.assert_array_equal(corner[:, :p], np.broadcast_to(fill, (16, p, 32, 3)))
  np.testing.assert_array_equal(corner[:, :, :p], np.broadcast_to(fill, (16, 32, p, 3)))

  key = jax.random.key(1)
  augment = functools.partial(input_pipeline.augment, crop_padding=p, flip=True, fill=0)
  augmented = augment(images, key)
  assert augmented.shape == images.shape
  np.testing.assert_array_equal(jax.jit(augment)(images, key), augmented)
  assert np.any(augmented != images, axis=(1, 2, 3)).sum() >= 14  # Only 1 draw in 162 is the identity.
  assert not np.array_equal(augment(images, jax.random.key(2)), augmented)

  # One lit pixel at (16, 10) in 1000 copies: where it lands shows each draw's crop and flip.
  dot = jnp.zeros((1000, 32, 32, 1)).at[:, 16, 10].set(1)
  _, rows, cols, _ = np.nonzero(np.asarray(jax.jit(augment)(dot, key)))
  assert len(rows) == 1000 and set(rows) == set(range(16 - p, 16 + p + 1))
  flipped = cols > 15
  assert set(cols[~flipped]) == set(range(10 - p, 10 + p + 1)) and 0.4 < flipped.mean() < 0.6
  # The digits' setting: shifts of up to 1 pixel, never mirrored.
  _, rows, cols, _ = np.nonzero(np.asarray(input_pipeline.augment(dot, key, crop_padding=1, flip=False, fill=0)))
  assert set(rows) == {15, 16, 17} and set(cols) == {9, 10, 11}


@pytest.mark.parametrize(
  'overrides, split, message',
  [
    ({'dataset': 'imagenet'}, 'train', r"config.dataset='imagenet' is not one of \('embedded_mnist'"),
    ({'input_shape': (32, 32, 3)}, 'train', r'config.input_shape=\(32, 32, 3\) does not match .* \(32, 32, 1\)'),
    ({'input_shape': (28, 28, 1)}, 'test', r'config.input_shape=\(28, 28, 1\)'),
    # Found before reading anything: there is no cifar10 in this data_dir.
    ({'dataset': 'cifar10', 'data_dir': '/nonexistent'}, 'train', r'\(32, 32, 1\) does not match the cifar10 images'),
    ({}, 'valid', r"split='valid' is not one of \('train', 'validation', 'test'\)"),
    ({}, 'validation', r'config.validation_size >= 1'),
    ({'validation_size': 4000}, 'train', r'config.validation_size=4000 is not valid'),
    ({'batch_size': 4001}, 'train', r'config.batch_size=4001 .* from 1 to 4000, the number of training examples\.'),
  ],
)
def test_load_split_errors(overrides, split, message):
  with pytest.raises(ValueError, match=message):
    input_pipeline.load_split(_config(**overrides), split)


@pytest.mark.parametrize('num_classes', [5, 9])
def test_fewer_classes_than_the_labels_is_an_error(train_split, test_split, num_classes):
  assert {train_split['label'].max(), test_split['label'].max()} == {input_pipeline.NUM_CLASSES - 1}
  config = _config()
  config.model.num_classes = num_classes
  message = rf'config.model.num_classes={num_classes} is fewer than the 10 classes of embedded_mnist'
  with pytest.raises(ValueError, match=message):
    input_pipeline.load_split(config, 'train')


@pytest.mark.parametrize('batch_size', [0, -1, 1001, 64.0])
def test_bad_batch_size(batch_size):
  with pytest.raises(ValueError, match=f'config.batch_size={batch_size} is not valid.*from 1 to 1000'):
    input_pipeline.check_batch_size(batch_size, 1000)


def test_batches_are_the_documented_permutation():
  key = jax.random.key(0)
  indices = np.asarray(input_pipeline.shuffled_batch_indices(key, 4000, 128))
  np.testing.assert_array_equal(indices, np.asarray(jax.random.permutation(key, 4000))[:3968].reshape(31, 128))
  assert not (np.diff(indices[0]) > 0).all()  # Shuffled, not in index order.


def test_crop_offsets_are_row_then_column():
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  p = 4
  offsets = jnp.tile(jnp.array([[0, 2 * p]]), (4, 1))  # The top row, the rightmost column.
  moved = input_pipeline.crop_and_flip(images, offsets, jnp.zeros(4, bool), p, 0)
  np.testing.assert_array_equal(moved[:, p:, : 32 - p], images[:, : 32 - p, p:])  # Down p rows, left p columns.


def test_augment_draws_crops_and_flips_from_split_keys():
  images = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32, 32, 1)), jnp.float32)
  key, p = jax.random.key(3), 2
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (64, 2), 0, 2 * p + 1)
  flips = jax.random.bernoulli(flip_key, shape=(64,))
  expected = input_pipeline.crop_and_flip(images, offsets, flips, p, 0)
  np.testing.assert_array_equal(input_pipeline.augment(images, key, p, True, 0), expected)


def test_the_batch_order_and_augmentation_of_a_seed_do_not_depend_on_jax_enable_x64():
  # With x64 JAX's default int and float are 64-bit, and random draws of those dtypes take other bits from the key:
  # a run would train otherwise, and one resumed under the other setting would change course at its checkpoint.
  images = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32, 32, 1)), jnp.float32)
  key = jax.random.key(3)

  def draw():
    return input_pipeline.augment(images, key, 2, True, 0.0), input_pipeline.shuffled_batch_indices(key, 1000, 64)

  default = draw()
  with jax.enable_x64(True):
    wide = draw()
  for a, b in zip(default, wide, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('batch_size', [0, 64.0])
def test_bad_eval_batch_size(batch_size):
  data = {'image': np.ones((50, 32, 32, 1), np.float32), 'label': np.full(50, 7, np.int32)}
  with pytest.raises(ValueError, match=f'batch_size={batch_size} is not valid for evaluation; .* integer >= 1'):
    next(input_pipeline.eval_batches(data, batch_size))


def test_eval_padding_has_zero_labels():
  data = {'image': np.ones((50, 32, 32, 1), np.float32), 'label': np.full(50, 7, np.int32)}
  (batch,) = list(input_pipeline.eval_batches(data, 64))
  assert not np.asarray(batch['label'])[~np.asarray(batch['mask'])].any()


def test_a_batch_may_be_the_whole_split_or_one_example():
  input_pipeline.check_batch_size(1000, 1000)
  input_pipeline.check_batch_size(1, 1000)


@pytest.mark.parametrize('height, width', [(32, 32), (28, 32)])
def test_images_of_another_size_than_the_dataset_stores_are_refused(monkeypatch, height, width):
  # The normalisation and the black a shift fills with are those of the stored size (28x28 digits, padded to 32).
  uint8_images = np.zeros((4, height, width, 1), np.uint8)
  monkeypatch.setattr(
    input_pipeline, '_open_split', lambda *args: (4, lambda rows: (uint8_images, np.zeros(4, np.int32)))
  )
  with pytest.raises(ValueError, match=rf'The mnist images read are \({height}, {width}\), not the 28x28 it stores'):
    input_pipeline.load_split(_config(dataset='mnist'), 'test')
