"""Ablation: tanh activations instead of ReLU."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.activation = 'tanh'
  return config
