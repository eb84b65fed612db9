"""Fixtures shared by the tests of more than one module, and the session's compilation cache."""

import os
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache for the session, named before jax is imported so that this process and every
# run a test starts as a subprocess share it. Much of the tests' time went to compiling the same programs again:
# train_and_evaluate jits afresh on each run, and each subprocess starts cold. A program read from the cache is the
# executable a fresh compile would give (its key covers the program, compile options and XLA flags), so no result
# changes. A fresh directory, not the user's cache: the tests neither depend on nor fill one. Under `pytest -n`
# (pytest-xdist) the controlling process names it, and its workers, started with its environment, share it.
_IS_XDIST_WORKER = 'PYTEST_XDIST_WORKER' in os.environ
if not _IS_XDIST_WORKER:
  os.environ.update(
    JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix='tinycnn_test_jax_cache_'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
  )
# Each test process, and each run a test starts, then takes only the GPU memory it uses, not 75% of it each.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

import input_pipeline  # noqa: E402 -- after the cache is named.


def pytest_unconfigure(config):
  if not _IS_XDIST_WORKER:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


@pytest.fixture
def image_reads(monkeypatch):
  """The (dataset, split, data_dir, rows) of each read of stored images from here on, in order."""
  open_split, reads = input_pipeline._open_split, []

  def counting_reads(*args):
    num_examples, read = open_split(*args)
    return num_examples, lambda rows: reads.append((*args, rows)) or read(rows)

  monkeypatch.setattr(input_pipeline, '_open_split', counting_reads)
  return reads


@pytest.fixture
def tensorboard_scalars():
  """A reader (logdir, tag) -> [(step, value)] of one scalar as TensorBoard shows it (without the steps of an earlier
  run that a resumed run's event files purge)."""

  def read(logdir, tag: str) -> list[tuple[int, float]]:
    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]

  return read
