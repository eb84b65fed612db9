"""Ablation: wider layers, 4x the filters (12, 24) and 4x the hidden units (400).

python train.py --config=configs/wide.py --workdir=runs/wide

98.1% test accuracy against the default's 98.4% (measured as configs/default.py says).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.conv_features = (12, 24)
  config.model.hidden_features = (400,)
  return config
