"""Ablation: flatten 5x5x6 in a fixed random order (seeded); fc1 does not care."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.flatten_order = 'random'
  config.model.flatten_seed = 0
  return config
