"""Full MNIST from tfds (needs the prepared dataset; see README), digits padded 28 -> 32 like LeNet-5.

python train.py --config=configs/mnist.py --workdir=runs/mnist

No result is given yet: tinycnn was built on machines with no network to download the dataset.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'mnist'
  config.batch_size = 128
  config.num_epochs = 10
  config.eval_every_steps = config.checkpoint_every_steps = 0  # After every epoch, whatever its length.
  return config
