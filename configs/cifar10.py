"""CIFAR-10 from tfds (needs the prepared dataset; see README): RGB, so conv1's filters are 5x5x3 volumes.

python train.py --config=configs/cifar10.py --workdir=runs/cifar10

No result is given yet: tinycnn was built on machines with no network to download the dataset.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'cifar10'
  config.input_shape = (32, 32, 3)
  config.random_crop_padding = 4
  config.random_flip = True
  config.batch_size = 128
  config.num_epochs = 30
  config.eval_every_steps = config.checkpoint_every_steps = 0  # After every epoch, whatever its length.
  return config
