"""Input pipeline: each split is loaded into memory once, and batch order is a pure function of (seed, epoch).

`load_split` returns a whole split as normalised float32 arrays (`load_example` reads one example of it).
`train_batch` gathers batch `step` of an epoch from it on the device, in the order
`shuffled_batch_indices(shuffle_key, N, B)` and augmented with `augment_key`, the two keys of
`epoch_keys(seed, epoch)`, so a resumed run continues mid-epoch exactly and a whole epoch can run inside one jitted
loop; `eval_batches` covers a split exactly once.

Datasets: 'embedded_mnist' (the default: 5,000 real MNIST digits shipped in data/, see data/README.md) and the tfds
datasets 'mnist', 'fashion_mnist' and 'cifar10', read through tfds' random-access data source. tfds is imported only
when one of those is asked for. 28x28 digits are zero-padded to 32x32, the input LeNet-5 saw, before normalising.
"""

import functools
import math
import pathlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

DATASETS = ('embedded_mnist', 'mnist', 'fashion_mnist', 'cifar10')
SPLITS = ('train', 'validation', 'test')
EMBEDDED_PATH = pathlib.Path(__file__).resolve().parent / 'data' / 'embedded_mnist.npz'
IMAGE_SIZE = 32
NUM_CLASSES = 10  # Of every dataset here: labels 0-9.

# Per-channel (mean, std) of each training split on the [0, 1] scale, over the images as stored (28x28 for the
# MNIST-style sets). mnist, fashion_mnist and cifar10: the well-known values for their full training sets (as in the
# PyTorch examples; cifar10's std is the per-pixel one, not the often-copied 0.2023/0.1994/0.2010). embedded_mnist:
# its 4,000 train digits, as printed by scripts/make_embedded_mnist.py. `load_split` converts the 28x28 values to
# the zero-padded 32x32 images with `padded_stats`, so the normalised training inputs have mean 0 and std 1, as in
# LeNet-5.
TRAIN_STATS = {
  'embedded_mnist': ((0.1311,), (0.3083,)),
  'mnist': ((0.1307,), (0.3081,)),
  'fashion_mnist': ((0.2860,), (0.3530,)),
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
STORED_SIZES = {'embedded_mnist': 28, 'mnist': 28, 'fashion_mnist': 28, 'cifar10': 32}  # Height and width.


def padded_stats(mean: np.ndarray, std: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std [C] after zero-padding images whose original pixels are `fraction` of the padded ones."""
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  padded_mean = fraction * mean
  return padded_mean, np.sqrt(fraction * (std**2 + mean**2) - padded_mean**2)


def normalisation(dataset: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) [C] of `dataset`'s training images once padded to 32x32: what `load_split` removes."""
  return padded_stats(*TRAIN_STATS[dataset], fraction=STORED_SIZES[dataset] ** 2 / IMAGE_SIZE**2)


def black(dataset: str) -> np.ndarray:
  """float32 [C]: a black pixel (0 on the [0, 1] scale) normalised, as `load_split` normalises `dataset`.

  The digits' background and the border of their padding to 32x32; `augment` fills what a shift uncovers with it.
  """
  mean, std = normalisation(dataset)
  return -(mean / std).astype(np.float32)


def load_split(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
  """{'image': float32 [N, 32, 32, C] normalised, 'label': int32 [N]} for split 'train', 'validation' or 'test'.

  With config.validation_size > 0 (default 0), 'validation' is the last validation_size examples of the train
  split and 'train' is the rest. Raises a ValueError for an invalid setting (for 'train', a config.batch_size larger
  than the split, say) before any image is read, and a FileNotFoundError, without touching the network, when a tfds
  dataset is not prepared in config.data_dir.
  """
  rows, read = _checked_split(config, split)
  return _normalised(config.dataset, *read(rows))


def split_size(config: ml_collections.ConfigDict, split: str) -> int:
  """The number of examples `load_split` gives for `split`, after its checks, with no image read."""
  rows, _ = _checked_split(config, split)
  return len(rows)


def _checked_split(config: ml_collections.ConfigDict, split: str):
  """`_open`, and for 'train' the check of config.batch_size against the examples it leaves."""
  rows, read = _open(config, split)
  if split == 'train':
    check_batch_size(config.batch_size, len(rows), config.get('validation_size', 0))
  return rows, read


def load_example(config: ml_collections.ConfigDict, split: str, index: int) -> tuple[np.ndarray, int]:
  """(float32 [32, 32, C] normalised, label) of example `index` of a split, as `load_split` gives it.

  An `index` outside the split is refused before any image is read; a tfds dataset then reads only that example
  (its data sources are random-access), the embedded one its small array.
  """
  rows, read = _open(config, split)
  if not 0 <= index < len(rows):
    raise ValueError(
      f'index={index} is not valid; the {config.dataset} {split} split has examples 0 to {len(rows) - 1}.'
    )
  example = _normalised(config.dataset, *read(rows[index : index + 1]))
  return example['image'][0], int(example['label'][0])


def _open(
  config: ml_collections.ConfigDict, split: str
) -> tuple[range, Callable[[range], tuple[np.ndarray, np.ndarray]]]:
  """(the rows of the stored split that make up `split`, a function reading uint8 images [R, H, W, C] and labels
  [R] of some of them), after checking the config against the dataset: nothing is read here."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is not one of {SPLITS}.')
  if config.dataset not in DATASETS:
    raise ValueError(f'config.dataset={config.dataset!r} is not one of {DATASETS}.')
  validation_size = config.get('validation_size', 0)
  if split == 'validation' and validation_size < 1:
    raise ValueError(f"split='validation' needs config.validation_size >= 1; it is {validation_size}.")

  # Every dataset here is 32x32 once its 28x28 digits are padded: a mismatch is found before any data is read.
  image_shape = (IMAGE_SIZE, IMAGE_SIZE, len(TRAIN_STATS[config.dataset][0]))
  if tuple(config.input_shape) != image_shape:
    raise ValueError(
      f'config.input_shape={tuple(config.input_shape)} does not match the {config.dataset} images, '
      f'{image_shape} after padding; set config.input_shape = {image_shape}.'
    )
  if config.model.num_classes < NUM_CLASSES:  # Labels the logits cannot index would make the loss NaN.
    raise ValueError(
      f'config.model.num_classes={config.model.num_classes} is fewer than the {NUM_CLASSES} classes of '
      f'{config.dataset} (labels 0-{NUM_CLASSES - 1}); set config.model.num_classes = {NUM_CLASSES}.'
    )
  num_examples, read = _open_split(config.dataset, 'test' if split == 'test' else 'train', config.get('data_dir'))
  if split == 'test':
    return range(num_examples), read
  if not 0 <= validation_size < num_examples:
    raise ValueError(
      f'config.validation_size={validation_size} is not valid; it must be from 0 to {num_examples - 1}, '
      f'less than the {num_examples} examples of the {config.dataset} train split.'
    )
  cut = num_examples - validation_size
  return (range(cut, num_examples) if split == 'validation' else range(cut)), read


def _normalised(dataset: str, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """uint8 [N, H, W, C] as stored -> load_split's {'image': float32 [N, 32, 32, C], 'label': int32 [N]}."""
  size = STORED_SIZES[dataset]
  if images.shape[1:3] != (size, size):
    raise ValueError(f'The {dataset} images read are {images.shape[1:3]}, not the {size}x{size} it stores.')
  pad = (IMAGE_SIZE - size) // 2
  images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  mean, std = normalisation(dataset)
  normalised = images.astype(np.float32)  # In place from here: cifar10's train split is 600 MB as float32.
  normalised *= (1 / (255 * std)).astype(np.float32)
  normalised -= (mean / std).astype(np.float32)
  return {'image': normalised, 'label': labels.astype(np.int32)}


def _open_split(
  dataset: str, split: str, data_dir: str | None
) -> tuple[int, Callable[[range], tuple[np.ndarray, np.ndarray]]]:
  """(N, a function reading the uint8 images [R, H, W, C] and labels [R] of some rows) of a stored split."""
  if dataset == 'embedded_mnist':
    with np.load(EMBEDDED_PATH) as npz:  # Each array is decompressed when first indexed: the labels alone here.
      labels = npz[f'y_{split}']

    def read_embedded(rows: range):
      with np.load(EMBEDDED_PATH) as npz:
        return npz[f'x_{split}'][rows.start : rows.stop, ..., None], labels[rows.start : rows.stop]

    return len(labels), read_embedded
  source = _tfds_source(dataset, split, data_dir)

  def read(rows: range):
    examples = [source[i] for i in rows]
    return np.stack([ex['image'] for ex in examples]), np.array([ex['label'] for ex in examples], np.int32)

  return len(source), read


def _tfds_source(name: str, split: str, data_dir: str | None):
  """The random-access data source of a prepared tfds split."""
  import tensorflow_datasets as tfds  # Here, not at the top: the embedded default must not import tfds or TensorFlow.

  try:
    # download=False: otherwise tfds would go to the network (and, with none, retry for minutes) and prepare the
    # data as tfrecord, which has no random access.
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, FileNotFoundError, KeyError):  # KeyError: no split found in tfds' default dirs.
    where = data_dir or 'the tfds default, $TFDS_DATA_DIR or ~/tensorflow_datasets'
    raise FileNotFoundError(
      f'{name} is not prepared in a random-access format (array_record) in data_dir={where}. With a network, '
      f"prepare it once: python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DIR', "
      f"file_format='array_record').download_and_prepare()\" (the `tfds build` command needs apache-beam), then set "
      f'config.data_dir=DIR. Data prepared by tfds.load is tfrecord, which cannot be used. Or use the default '
      f"config.dataset='embedded_mnist', which needs no download."
    ) from None


def epoch_keys(seed: int, epoch) -> tuple[jax.Array, jax.Array]:
  """(shuffle key, augmentation key) of epoch `epoch`, two independent keys; `epoch` may be traced."""
  shuffle_key, augment_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), epoch))
  return shuffle_key, augment_key


@functools.partial(jax.jit, static_argnums=(1, 2))
def shuffled_batch_indices(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """int32 [num_examples // batch_size, batch_size]: a random permutation of the split, remainder dropped."""
  num_batches = num_examples // batch_size
  permutation = jax.random.permutation(key, num_examples)
  return permutation[: num_batches * batch_size].reshape(num_batches, batch_size).astype(jnp.int32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches in one epoch; the remainder is dropped."""
  return num_examples // batch_size


def check_batch_size(batch_size: int, num_examples: int, validation_size: int = 0) -> None:
  """Raises a ValueError unless 1 <= batch_size <= num_examples, the training examples left after `validation_size`
  were held out."""
  if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= num_examples:
    held_out = f' left after validation_size={validation_size} held out' if validation_size else ''
    raise ValueError(
      f'config.batch_size={batch_size!r} is not valid; it must be an integer from 1 to {num_examples}, '
      f'the number of training examples{held_out}.'
    )


def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, padding: int, fill) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C]: each image padded by `padding` pixels of colour `fill` [C] and cropped to H x W.

  offsets: int [B, 2], the (row, column) of each crop in 0..2*padding; flips: bool [B], mirror left-right.
  Offsets (padding, padding) without a flip return the image unchanged.
  """
  _, h, w, c = images.shape
  margins = ((padding, padding), (padding, padding))
  inside = np.pad(np.ones((h, w, 1), bool), (*margins, (0, 0)))
  padded = jnp.where(inside, jnp.pad(images, ((0, 0), *margins, (0, 0))), jnp.asarray(fill, images.dtype))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], jnp.zeros_like(offset[0])), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)


def augment(images: jax.Array, key: jax.Array, crop_padding: int, flip: bool, fill) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C]: each image moved by up to `crop_padding` pixels each way (a random crop of the
  image padded with `fill` [C]) and, with `flip`, mirrored left-right with probability 1/2.

  Pure and jittable. `fill` is `black(dataset)`, so that a shifted digit's uncovered pixels are background, as in
  every test image (0, the training set's mean, would add a grey edge no test image has).
  """
  crop_key, flip_key = jax.random.split(key)
  # 32-bit draws, whatever the default dtypes: with jax_enable_x64 the defaults would draw other numbers from the
  # same key, and the same seed would train another run.
  offsets = jax.random.randint(crop_key, (images.shape[0], 2), 0, 2 * crop_padding + 1, dtype=jnp.int32)
  flips = jax.random.bernoulli(flip_key, jnp.float32(0.5), shape=(images.shape[0],)) & flip
  return crop_and_flip(images, offsets, flips, crop_padding, fill)


def train_batch(
  data: dict, indices: jax.Array, augment_key: jax.Array, step, crop_padding: int = 0, flip: bool = False, fill=None
) -> dict[str, jax.Array]:
  """Batch `step` of an epoch ordered by `indices` [S, B]: {'image': [B, ...], 'label': [B]}.

  Augmented (see `augment`, which fills with `fill`) with fold_in(augment_key, step) when crop_padding > 0 or flip.
  Pure and jittable (`step` may be traced): the one definition of a training batch, used per step and inside a
  whole-epoch `lax.scan` alike.
  """
  batch = {'image': data['image'][indices[step]], 'label': data['label'][indices[step]]}
  if crop_padding or flip:
    if fill is None:
      raise ValueError('train_batch needs `fill` (black(dataset)) to augment: the colour a shift uncovers.')
    batch['image'] = augment(batch['image'], jax.random.fold_in(augment_key, step), crop_padding, flip, fill)
  return batch


@functools.partial(jax.jit, static_argnames='batch_size')
def _eval_batch(images, labels, start, batch_size: int) -> dict[str, jax.Array]:
  position = start + jnp.arange(batch_size)
  mask = position < len(labels)
  index = jnp.minimum(position, len(labels) - 1)
  return {
    'image': jnp.where(mask[:, None, None, None], images[index], 0),
    'label': jnp.where(mask, labels[index], 0),
    'mask': mask,
  }


def eval_batches(data: dict, batch_size: int) -> Iterator[dict[str, jax.Array]]:
  """Every example exactly once, in order: {'image': [B, 32, 32, C], 'label': int32 [B], 'mask': bool [B]}.

  The last batch is zero-padded to batch_size and its mask is False on the padding, so masked metrics are exact.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} is not valid for evaluation; it must be an integer >= 1.')
  images, labels = jnp.asarray(data['image']), jnp.asarray(data['label'])
  for i in range(math.ceil(len(labels) / batch_size)):
    yield _eval_batch(images, labels, i * batch_size, batch_size)
