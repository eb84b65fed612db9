"""Ablation: flatten 5x5x6 channel-major (PyTorch's order); the same function family as 'hwc'."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.flatten_order = 'chw'
  return config
