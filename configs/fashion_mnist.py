"""Fashion-MNIST from tfds (needs the prepared dataset; see README), padded 28 -> 32.

python train.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

No result is given yet: tinycnn was built on machines with no network to download the dataset.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'fashion_mnist'
  config.batch_size = 128
  config.num_epochs = 15
  config.eval_every_steps = config.checkpoint_every_steps = 0  # After every epoch, whatever its length.
  return config
