"""Fixtures shared by the tests of more than one module."""

import pytest

import input_pipeline


@pytest.fixture
def image_reads(monkeypatch):
  """The (dataset, split, data_dir) of each read of stored images from here on, in order."""
  open_split, reads = input_pipeline._open_split, []

  def counting_reads(*args):
    num_examples, read = open_split(*args)
    return num_examples, lambda rows: reads.append(args) or read(rows)

  monkeypatch.setattr(input_pipeline, '_open_split', counting_reads)
  return reads
