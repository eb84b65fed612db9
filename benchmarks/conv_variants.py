"""Why model.conv_windows computes the convolution in blocks: the same training epoch with each way of writing it.

    python benchmarks/conv_variants.py
    python benchmarks/conv_variants.py --batch_sizes=128 --channels=3 --repeats=3

Each formulation is first checked against reference.conv2d (NumPy, float64) to 1e-5, then swapped in for
model.conv_windows and timed as a whole-epoch lax.scan of train.training_functions (workload.py: momentum SGD,
random data in memory). The others compute the [B, H', W', C_out] map, which is then rearranged into the layout
conv_windows returns, so pooling and everything after it is the model's own.
Rows are images/s, median of `--repeats`, interleaved so that machine noise hits all alike:
  windows        model.conv_windows: each block's input window copied once, one matmul with a band matrix
  patches        kh*kw shifted slices concatenated into [B, H', W', kh*kw*C_in] patches, one matmul
  shifted_sum    the sum over the kh*kw offsets of (shifted slice) @ kernel[i, j], [C_in, C_out] each
  lax_conv       jax.lax.conv_general_dilated, what flax.linen.Conv lowers to
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flag_checks  # noqa: E402
import workload  # noqa: E402

import model  # noqa: E402
import reference  # noqa: E402
import train  # noqa: E402

FLAGS = flags.FLAGS
flag_checks.define_positive_integers('batch_sizes', ['32', '128', '512'], 'Batch sizes B.')
flag_checks.define_positive_integers('channels', ['1', '3'], 'Input channels C.')
flags.DEFINE_integer('repeats', 5, 'Timed repeats per formulation.', lower_bound=1)
flags.DEFINE_integer('images_per_repeat', 8192, 'Training images per timed repeat.', lower_bound=1)


def shifted_slices(x: jax.Array, kernel_shape: tuple[int, ...], strides: int, padding: str) -> list[jax.Array]:
  """The kh*kw inputs [B, H', W', C_in] that kernel taps (0, 0), (0, 1), ..., (kh-1, kw-1) multiply."""
  assert padding == 'VALID', 'the default network has no padding'
  kh, kw, _, _ = kernel_shape
  out_h = model.conv_output_size(x.shape[1], kh, strides, padding)
  out_w = model.conv_output_size(x.shape[2], kw, strides, padding)
  span_h, span_w = (out_h - 1) * strides + 1, (out_w - 1) * strides + 1
  return [x[:, i : i + span_h : strides, j : j + span_w : strides, :] for i in range(kh) for j in range(kw)]


def patches(x: jax.Array, kernel: jax.Array, strides: int, padding: str) -> jax.Array:
  """[B, H, W, C_in] x [kh, kw, C_in, C_out] -> [B, H', W', C_out] as one [kh*kw*C_in]-long patch per output."""
  kh, kw, c_in, c_out = kernel.shape
  columns = shifted_slices(x, kernel.shape, strides, padding)
  return jnp.concatenate(columns, axis=-1) @ kernel.reshape(kh * kw * c_in, c_out)


def shifted_sum(x: jax.Array, kernel: jax.Array, strides: int, padding: str) -> jax.Array:
  """[B, H, W, C_in] x [kh, kw, C_in, C_out] -> [B, H', W', C_out] as kh*kw accumulated [C_in, C_out] matmuls."""
  kh, kw, c_in, c_out = kernel.shape
  taps = kernel.reshape(kh * kw, c_in, c_out)
  return sum(part @ tap for part, tap in zip(shifted_slices(x, kernel.shape, strides, padding), taps, strict=True))


def lax_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: str) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, (strides, strides), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


FORMULATIONS = {'windows': model.conv2d, 'patches': patches, 'shifted_sum': shifted_sum, 'lax_conv': lax_conv}


def in_windows_layout(conv):
  """An [B, H', W', C_out] convolution as a drop-in for model.conv_windows (bias added, grouped by pooling window)."""

  def conv_windows(x, kernel, bias, strides, padding, pool_window):
    y = conv(x, kernel, strides, padding) + bias
    b, h, w, c_out = y.shape
    p, n = pool_window, model._block_width(w, pool_window)
    return y.reshape(b, h // p, p, w // n, n // p, p, c_out).transpose(0, 1, 3, 2, 5, 4, 6)

  return conv_windows


def check_against_reference(conv, channels: int) -> None:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 32, 32, channels)).astype(np.float32)
  kernel = rng.normal(size=(5, 5, channels, 3)).astype(np.float32)
  expected = reference.conv2d(x.astype(np.float64), kernel.astype(np.float64), np.zeros(3))
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(conv(jnp.asarray(x), jnp.asarray(kernel), 1, 'VALID'), expected, atol=1e-5, rtol=1e-5)


def prepare_epoch(batch_size: int, channels: int):
  """Whole-epoch training with the current model.conv_windows, compiled and warmed up: (run() -> seconds, images)."""
  steps = max(10, FLAGS.images_per_repeat // batch_size)
  train_epoch, _, _ = workload.training_epoch(batch_size, channels, steps, 'epoch')

  def run():
    start = time.perf_counter()
    train_epoch()
    return time.perf_counter() - start

  run()
  return run, steps * batch_size


def main(argv):
  del argv
  train.tune_cpu_runtime()
  model_conv_windows = model.conv_windows
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; images/s, median (min-max)')
  for channels in map(int, FLAGS.channels):
    for conv in FORMULATIONS.values():
      check_against_reference(conv, channels)
    for batch_size in map(int, FLAGS.batch_sizes):
      runners = {}
      for name, conv in FORMULATIONS.items():
        # Conv looks model.conv_windows up when it is traced, so swapping the module attribute swaps the formulation.
        model.conv_windows = model_conv_windows if name == 'windows' else in_windows_layout(conv)
        runners[name] = prepare_epoch(batch_size, channels)
      model.conv_windows = model_conv_windows
      rates = {name: [] for name in runners}
      for _ in range(FLAGS.repeats):
        for name, (run, images) in runners.items():
          rates[name].append(images / run())
      cells = []
      for name, r in rates.items():
        ratio = statistics.median(r) / statistics.median(rates['windows'])
        cells.append(f'{name} {statistics.median(r):7.0f} ({min(r):.0f}-{max(r):.0f}) x{ratio:.2f}')
      print(f'C={channels} B={batch_size:4}  ' + '  '.join(cells), flush=True)


if __name__ == '__main__':
  app.run(main)
