"""A PyTorch peer of tinycnn's training step, for throughput comparisons in the same process.

It measures training images per second of one step -- gathering a shuffled batch, forward, softmax cross-entropy,
backward and an SGD update with momentum 0.9 -- of the network that `model.CNN` builds by default, on random images
and labels held in memory as tensors:

    [B, C, 32, 32] -> conv1 5x5xCx3 VALID + relu -> maxpool 2x2 -> conv2 5x5x3x6 VALID + relu -> maxpool 2x2
                   -> flatten 150 (in tinycnn's 'hwc' order) -> fc1 100 + relu -> fc2 10 (logits)

The parameters have tinycnn's shapes and initialisers (LeCun-normal kernels, zero biases); `load_flax_params`
copies a tinycnn parameter pytree in, after which both compute the same function.

Variants (`VARIANTS`): 'eager' (NCHW), 'eager_channels_last', 'compile' (torch.compile of the model, default
mode) and 'compile_channels_last'. Torch uses `torch.set_num_threads(threads)` (2 by default). A variant that
fails (torch.compile needs a working C++ compiler) is reported in the result's 'error' rather than raised.

torch is a benchmark-only dependency, pinned to torch==2.13.0 (the CPU wheel) in benchmarks/requirements.txt;
nothing in tinycnn imports this module.

python benchmarks/torch_peer.py --batch_sizes=128,512 --channels=1,3
"""

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ('eager', 'eager_channels_last', 'compile', 'compile_channels_last')


class PeerCNN(nn.Module):
  """tinycnn's default CNN in PyTorch: NCHW images in, logits out."""

  def __init__(self, channels: int = 1, num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, 3, 5)
    self.conv2 = nn.Conv2d(3, 6, 5)
    self.fc1 = nn.Linear(150, 100)
    self.fc2 = nn.Linear(100, num_classes)
    for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
      # Flax's lecun_normal: a normal truncated to +-2 std, scaled so that the variance is 1 / fan_in.
      std = (1 / layer.weight[0].numel()) ** 0.5 / 0.87962566103423978
      nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
      nn.init.zeros_(layer.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = x.permute(0, 2, 3, 1).flatten(1)  # tinycnn flattens [5, 5, 6] in 'hwc' order.
    return self.fc2(F.relu(self.fc1(x)))


def load_flax_params(model: PeerCNN, params) -> PeerCNN:
  """Copies tinycnn's parameters (HWIO conv kernels, [in, out] dense kernels) into `model`."""
  with torch.no_grad():
    for name in ('conv1', 'conv2', 'fc1', 'fc2'):
      layer = getattr(model, name)
      kernel = np.asarray(params[name]['kernel'], np.float32)
      kernel = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T  # -> OIHW or [out, in].
      layer.weight.copy_(torch.tensor(kernel))
      layer.bias.copy_(torch.tensor(np.asarray(params[name]['bias'], np.float32)))
  return model


def make_step(
  batch_size: int, channels: int, variant: str, learning_rate: float = 0.01, seed: int = 0, device: str = 'cpu'
):
  """(model, step): `step(images, labels)` runs one training step in place and returns the loss tensor."""
  if variant not in VARIANTS:
    raise ValueError(f'variant={variant!r} is not one of {VARIANTS}.')
  torch.manual_seed(seed)
  model = PeerCNN(channels).to(device)  # Initialised on the CPU, so that the seed gives the same weights anywhere.
  channels_last = variant.endswith('channels_last')
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
  forward = torch.compile(model) if variant.startswith('compile') else model

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  return model, step


def prepare(
  batch_size: int,
  channels: int,
  variant: str,
  warmup_steps: int = 5,
  threads: int = 2,
  data: dict[str, np.ndarray] | None = None,
  learning_rate: float = 0.01,
  device: str = 'cpu',
) -> Callable[[int], float]:
  """Builds and warms up one variant; returns `run(steps) -> seconds` for `steps` timed training steps.

  Step i trains on batch i of a fixed shuffled order of `data` ({'image': [N, 32, 32, C] float32, 'label': [N]},
  held in memory on `device`, 'cpu' or 'cuda'; by default 4 batches of N(0, 1) images), gathered from it as the step
  begins: the work tinycnn's step does, and on the same arrays when the caller passes tinycnn's
  (benchmarks/throughput.py does).
  Callers that compare variants on a noisy machine can interleave the `run` calls of several variants.
  Raises whatever building or compiling the variant raises.
  """
  generator = torch.Generator().manual_seed(0)
  if data is None:
    num_examples = 4 * batch_size
    data = {
      'image': torch.randn(num_examples, 32, 32, channels, generator=generator).numpy(),
      'label': torch.randint(0, 10, (num_examples,), generator=generator).numpy(),
    }
  # [N, H, W, C] seen as [N, C, H, W]: channels_last already, so a gathered batch is too.
  images = torch.from_numpy(data['image']).to(device).permute(0, 3, 1, 2)
  if not variant.endswith('channels_last'):
    images = images.contiguous()
  labels = torch.from_numpy(data['label']).to(device).long()
  num_batches = len(labels) // batch_size
  order = torch.randperm(len(labels), generator=generator)[: num_batches * batch_size].reshape(num_batches, batch_size)
  order = order.to(device)
  _, step = make_step(batch_size, channels, variant, learning_rate, device=device)

  def run(steps: int) -> float:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      start = time.perf_counter()
      for i in range(steps):
        batch = order[i % num_batches]
        loss = step(images[batch], labels[batch])
      loss.item()  # Waits for the steps' work: CUDA's ops run asynchronously to Python, as XLA's do.
      return time.perf_counter() - start
    finally:
      torch.set_num_threads(previous_threads)

  run(warmup_steps)
  return run


def measure(
  batch_size: int,
  channels: int,
  variant: str,
  steps: int = 50,
  repeats: int = 5,
  warmup_steps: int = 5,
  threads: int = 2,
  learning_rate: float = 0.01,
  device: str = 'cpu',
) -> dict:
  """Training images/s of one variant: the median, min and max over `repeats` timings of `steps` steps each.

  Returns {'variant', 'batch_size', 'channels', 'threads', 'images_per_second_median', '..._min', '..._max',
  'step_ms_median', 'warmup_seconds' (including compilation), 'error' (None, or why the variant failed)}.
  """
  result = dict(variant=variant, batch_size=batch_size, channels=channels, threads=threads, error=None)
  try:
    start = time.perf_counter()
    run = prepare(batch_size, channels, variant, warmup_steps, threads, learning_rate=learning_rate, device=device)
    result['warmup_seconds'] = time.perf_counter() - start
    rates = [batch_size * steps / run(steps) for _ in range(repeats)]
  except Exception as e:  # torch.compile can fail in many ways (no compiler, dynamo errors).
    result['error'] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
    return result
  result.update(
    images_per_second_median=statistics.median(rates),
    images_per_second_min=min(rates),
    images_per_second_max=max(rates),
    step_ms_median=1e3 * batch_size / statistics.median(rates),
  )
  return result


def main(argv):
  del argv
  for channels in map(int, FLAGS.channels):
    for batch_size in map(int, FLAGS.batch_sizes):
      for variant in FLAGS.variants:
        steps = max(10, FLAGS.images_per_repeat // batch_size)
        r = measure(batch_size, channels, variant, steps, FLAGS.repeats, threads=FLAGS.threads, device=FLAGS.device)
        if r['error']:
          print(f'C={channels} B={batch_size:5} {variant:22} failed: {r["error"]}', flush=True)
          continue
        print(
          f'C={channels} B={batch_size:5} {variant:22} {r["images_per_second_median"]:9.0f} img/s '
          f'({r["images_per_second_min"]:.0f}-{r["images_per_second_max"]:.0f}), warm-up {r["warmup_seconds"]:.1f}s',
          flush=True,
        )


if __name__ == '__main__':
  import flag_checks
  from absl import app, flags

  flag_checks.define_positive_integers('batch_sizes', ['128', '512'], 'Batch sizes.')
  flag_checks.define_positive_integers('channels', ['1', '3'], 'Input channels.')
  flag_checks.define_choices('variants', list(VARIANTS), VARIANTS, 'Variants to measure.')
  flags.DEFINE_integer(
    'repeats', 5, 'Timed repeats per variant; the median is reported with min and max.', lower_bound=1
  )
  flags.DEFINE_integer('images_per_repeat', 8192, 'Images per timed repeat (at least 10 steps).', lower_bound=1)
  flags.DEFINE_integer('threads', 2, 'torch.set_num_threads.', lower_bound=1)
  flags.DEFINE_enum('device', 'cpu', ['cpu', 'cuda'], 'Where the peer trains (throughput.py chooses as jax runs).')
  FLAGS = flags.FLAGS
  app.run(main)
