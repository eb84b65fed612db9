"""Every file in configs/ loads, builds its model and passes the training checks."""

import glob
import importlib.util
import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

import model
import train

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')))
# Each ablation changes exactly one thing about the default experiment.
ABLATIONS = {
  'avg_pool': {'model.pool': 'avg'},
  'tanh': {'model.activation': 'tanh'},
  'flatten_chw': {'model.flatten_order': 'chw'},
  'flatten_random': {'model.flatten_order': 'random'},
  'wide': {'model.conv_features': (12, 24), 'model.hidden_features': (400,)},
}
CHANNELS = {'embedded_mnist': 1, 'mnist': 1, 'fashion_mnist': 1, 'cifar10': 3}


def load(name):
  spec = importlib.util.spec_from_file_location(f'configs.{name}', os.path.join(CONFIG_DIR, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def flat_items(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from flat_items(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def test_every_config_file_is_tested():
  names = {os.path.basename(path)[:-3] for path in CONFIG_FILES}
  assert names == {'default', 'mnist', 'fashion_mnist', 'cifar10', *ABLATIONS}


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_builds_its_model(path):
  config = load(os.path.basename(path)[:-3])
  train.check_config(config)
  shapes = model.layer_shapes(config)
  assert shapes['input'] == (32, 32, CHANNELS[config.dataset])
  assert shapes[f'fc{len(config.model.hidden_features) + 1}'] == (config.model.num_classes,)


@pytest.mark.parametrize('name', sorted(ABLATIONS))
def test_ablation_changes_one_thing(name):
  base, ablation = dict(flat_items(load('default'))), dict(flat_items(load(name)))
  assert ablation.keys() == base.keys()
  assert {key: value for key, value in ablation.items() if base[key] != value} == ABLATIONS[name]


def test_cifar10_is_rgb_with_augmentation():
  config = load('cifar10')
  assert (config.input_shape, config.random_crop_padding, config.random_flip) == ((32, 32, 3), 4, True)
  params = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
  assert params['conv1']['kernel'].shape == (5, 5, 3, 3)  # Each filter is a 5x5x3 volume.


REAL_VALUED = ('grad_clip_norm', 'learning_rate', 'momentum', 'warmup_epochs', 'weight_decay')


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections' config file loader.
@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_setting_can_be_set_from_the_command_line(path):
  """--config.<name>=<value> sets each field to a new value of its kind.

  A plain None field would refuse any value, having no type; a real-valued setting written as an int (0, not 0.0)
  would refuse a fraction, hence a fraction for each of them.
  """
  for name, value in flat_items(load(os.path.basename(path)[:-3])):
    if name in REAL_VALUED:
      new_value = value + 0.5
    else:
      new_value = changed(value) if value is not None else '/data/tfds'  # data_dir, None until set.
    argv = ['train.py', f'--config={path}', f'--config.{name}={new_value}']
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert dict(flat_items(flag_values.config))[name] == new_value != value


def changed(value):
  """Another value of the same kind as `value`."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + (1 if isinstance(value, int) else 0.5)
  if isinstance(value, str):
    return value + '_changed'
  return (*value, value[-1]) if value else (0.5,)  # A tuple.
