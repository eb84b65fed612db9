"""The training workload the benchmarks time: train.py's own training functions on random data held on the device.

Imported by the scripts beside it, which put the repository root on sys.path first.
"""

import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import train
from configs import default


def random_examples(num_examples: int, channels: int) -> dict[str, np.ndarray]:
  """{'image': [N, 32, 32, C] float32 N(0, 1), 'label': [N] int32 in [0, 10)}, the same for the same arguments."""
  rng = np.random.default_rng(0)
  return {
    'image': rng.normal(size=(num_examples, 32, 32, channels)).astype(np.float32),
    'label': rng.integers(0, 10, num_examples).astype(np.int32),
  }


def benchmark_config(batch_size: int, channels: int, num_models: int = 1) -> ml_collections.ConfigDict:
  """configs/default.py with the PyTorch peer's optimiser (SGD, momentum 0.9, learning rate 0.01) and without the
  default's random shifts, which the peer does not make. Raises ValueError naming a setting train.py would refuse."""
  config = default.get_config()
  config.update(
    input_shape=(32, 32, channels), batch_size=batch_size, optimizer='momentum', momentum=0.9, learning_rate=0.01,
    schedule='constant', num_models=num_models, random_crop_padding=0,
  )  # fmt: skip
  train.check_config(config)  # As train.py does: a bad batch size, channels or num_models is named before any work.
  return config


def training_epoch(
  batch_size: int, channels: int, steps: int, mode: str, num_models: int = 1
) -> tuple[Callable[[], dict], jax.stages.Compiled, float]:
  """One epoch of `steps` batches of `random_examples`, compiled as train_mode `mode` ('step' or 'epoch').

  The config is `benchmark_config`'s. Returns (run, compiled, compile seconds): run() trains the next epoch, one jitted
  call per step or one for the whole epoch, and returns its last metrics once they are ready; `compiled` is the
  program XLA runs (train_step's or train_epoch's).
  """
  config = benchmark_config(batch_size, channels, num_models)
  mesh = train.device_mesh()
  data = train.place_replicated(random_examples(steps * batch_size, channels), mesh)
  functions = train.training_functions(config, steps * batch_size, NamedSharding(mesh, PartitionSpec('batch')))
  state = train.place_replicated(train.create_initial_state(config, steps), mesh)
  keys, indices = jax.jit(functions.epoch_order)(0)
  start = time.perf_counter()
  if mode == 'epoch':
    compiled = train.jit_with_xla_options(functions.train_epoch, donate_argnums=0).lower(state, data, 0).compile()
  else:
    compiled = (
      train.jit_with_xla_options(functions.train_step, donate_argnums=0).lower(state, data, indices, keys, 0).compile()
    )
  compile_seconds = time.perf_counter() - start

  def run() -> dict:
    nonlocal state
    if mode == 'epoch':
      state, metrics = compiled(state, data, 0)
    else:
      for step in range(steps):
        state, metrics = compiled(state, data, indices, keys, step)
    return jax.block_until_ready(metrics)

  return run, compiled, compile_seconds
