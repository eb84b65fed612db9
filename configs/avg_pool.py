"""Ablation: average pooling instead of max pooling."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.pool = 'avg'
  return config
