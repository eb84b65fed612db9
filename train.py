"""Trains and evaluates the tinycnn classifier.

    python train.py --config=configs/default.py --workdir=runs/default --config.num_epochs=5

Re-running the same command resumes from the latest checkpoint in the workdir, exactly: the batch order
is a function of (seed, step), so an interrupted and resumed run ends with the same parameters bit for bit.
The workdir holds, among others, `config.json`, `checkpoints/`, `metrics.jsonl` and TensorBoard event files.
"""

import ctypes
import difflib
import functools
import itertools
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

import input_pipeline
import model
import workdir as workdir_lib
from configs import default

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')
TRAIN_MODES = ('step', 'epoch')


class NonFiniteLossError(FloatingPointError):
  """The training loss, or the evaluation loss of parameters about to be evaluated or saved, became NaN or Inf."""


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The steps warmup_cosine spends warming up: config.warmup_epochs of them, rounded down."""
  return int(config.warmup_epochs * steps_per_epoch)


def create_learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, peak_learning_rate=None
) -> optax.Schedule:
  """Learning rate per step for `config.schedule`, peaking at `peak_learning_rate` (default config.learning_rate).

  The peak scales a unit-peak schedule, so it may be a traced value (one per model of a sweep).
  """
  peak = config.learning_rate if peak_learning_rate is None else peak_learning_rate
  total_steps = config.num_epochs * steps_per_epoch
  if config.schedule == 'constant':
    unit = optax.constant_schedule(1.0)
  elif config.schedule == 'cosine':
    unit = optax.cosine_decay_schedule(1.0, total_steps)
  else:
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps(config, steps_per_epoch), total_steps)
  return lambda step: peak * unit(step)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optax optimiser of `config.optimizer`, with optional global-norm clipping and weight decay.

  The peak learning rate is a hyperparameter in the optimiser state (`opt_state.hyperparams['learning_rate']`),
  so the models of a seed sweep can each carry their own.
  """

  def optimizer(learning_rate):
    schedule = create_learning_rate_schedule(config, steps_per_epoch, learning_rate)
    if config.optimizer == 'sgd':
      transform = optax.sgd(schedule)
    elif config.optimizer == 'momentum':
      transform = optax.sgd(schedule, momentum=config.momentum)
    elif config.optimizer == 'adam':
      transform = optax.adam(schedule)
    else:
      transform = optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.weight_decay and config.optimizer != 'adamw':
      # Coupled (L2) decay for the SGD family and adam; adamw decouples it itself.
      transform = optax.chain(optax.add_decayed_weights(config.weight_decay), transform)
    if config.grad_clip_norm:
      transform = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), transform)
    return transform

  return optax.inject_hyperparams(optimizer)(learning_rate=config.learning_rate)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid setting, config.model and input_shape included (through
  model.create_model), or a setting configs/default.py does not have or that `config` lacks. The checks that need a
  split's size are input_pipeline.split_size's (batch_size, validation_size) and `check_step_counts`'s."""

  def fail(name, valid):
    raise ValueError(f'config.{name}={config[name]!r} is not valid; {valid}.')

  # A config file's misspelt setting would otherwise pass unread, and its run train with the default value.
  defaults = default.get_config()
  settings = sorted(defaults.keys())
  unknown, missing = sorted(set(config.keys()) - set(settings)), sorted(set(settings) - set(config.keys()))
  if unknown:
    close = difflib.get_close_matches(unknown[0], settings, n=1)
    raise ValueError(
      f'config has no setting {unknown[0]}{f" (did you mean {close[0]}?)" if close else ""}; the settings are '
      f"configs/default.py's: {settings}."
    )
  if not missing and not isinstance(config.model, ml_collections.ConfigDict):  # A ConfigDict takes None anywhere.
    fail('model', "it must hold the model's settings, as configs/default.py's config.model does")
  # And one dropped from config.model would train with model.CNN's default, which the saved config would not record.
  missing = missing or [f'model.{name}' for name in sorted(set(defaults.model.keys()) - set(config.model.keys()))]
  if missing:
    raise ValueError(
      f'config.{missing[0]} is missing; a config needs every setting of configs/default.py, so build it from '
      'default.get_config() (as configs/*.py do) and change what differs.'
    )

  def is_number(value):  # bool is an int, but not a setting's number.
    return isinstance(value, (int, float)) and not isinstance(value, bool)

  def is_integer(value):
    return is_number(value) and isinstance(value, int)

  if config.optimizer not in OPTIMIZERS:
    fail('optimizer', f'choose one of {OPTIMIZERS}')
  if config.schedule not in SCHEDULES:
    fail('schedule', f'choose one of {SCHEDULES}')
  for name in ('batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps', 'max_checkpoints_to_keep'):
    if not is_integer(config[name]) or config[name] < 1:
      fail(name, 'it must be an integer >= 1')
  for name in ('eval_every_steps', 'checkpoint_every_steps'):
    if not is_integer(config[name]) or config[name] < 0:
      fail(name, 'it must be an integer >= 0 (0 means once per epoch)')
  if not is_integer(config.random_crop_padding) or config.random_crop_padding < 0:
    fail('random_crop_padding', 'it must be an integer >= 0, the most pixels an image moves (0: no shifts)')
  if not isinstance(config.random_flip, bool):
    fail('random_flip', 'it must be True or False')
  if not is_integer(config.validation_size) or config.validation_size < 0:
    fail('validation_size', 'it must be an integer >= 0, the train examples held out (0: evaluate on test)')

  def is_learning_rate(value):  # Stored as float32, where 1e39 is already inf.
    return is_number(value) and 0 < value <= float(np.finfo(np.float32).max)

  if not is_learning_rate(config.learning_rate):
    fail('learning_rate', 'it must be a finite float32 number > 0')

  for name in ('weight_decay', 'grad_clip_norm', 'warmup_epochs'):
    if not (is_number(config[name]) and 0 <= config[name] < math.inf):  # NaN fails both.
      fail(name, 'it must be a finite number >= 0')
  if not (is_number(config.momentum) and 0 <= config.momentum < 1):
    fail('momentum', 'it must be in [0, 1)')
  if config.optimizer != 'momentum' and config.momentum != defaults.momentum:  # Not adam's b1, say: it is unread.
    fail('momentum', f"only optimizer='momentum' reads it, not {config.optimizer!r}; leave it at {defaults.momentum}")
  if config.schedule == 'warmup_cosine' and not 0 < config.warmup_epochs < config.num_epochs:
    fail('warmup_epochs', f'warmup_cosine needs more than 0 and less than num_epochs={config.num_epochs}')
  if config.schedule != 'warmup_cosine' and config.warmup_epochs:
    fail('warmup_epochs', f"only schedule='warmup_cosine' warms up, not {config.schedule!r}")
  if config.train_mode not in TRAIN_MODES:
    fail('train_mode', f'choose one of {TRAIN_MODES}')
  if not is_integer(config.num_models) or config.num_models < 1:
    fail('num_models', 'it must be an integer >= 1 (the number of models trained side by side with vmap)')
  if not is_integer(config.seed) or not 0 <= config.seed <= 2**32 - config.num_models:
    # A JAX key takes 32 bits of its seed: seed 2**32 would quietly repeat seed 0's run.
    fail(
      'seed',
      f'it must be an integer from 0 to 2**32 - num_models = {2**32 - config.num_models} (model k of a sweep takes '
      'seed + k)',
    )
  if config.learning_rates and (
    config.num_models == 1
    or len(config.learning_rates) != config.num_models
    or not all(map(is_learning_rate, config.learning_rates))
  ):
    fail(
      'learning_rates',
      f'give none, or one finite learning rate > 0 per model of a sweep (num_models={config.num_models}; a single '
      'model takes config.learning_rate)',
    )
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % jax.device_count():
      fail(name, f'it must divide evenly over the {jax.device_count()} devices (a multiple of {jax.device_count()})')
  # Were it ignored, a run meant for tfds data would train on the embedded digits unawares.
  if config.dataset == 'embedded_mnist' and config.get('data_dir'):
    fail(
      'data_dir',
      f'dataset embedded_mnist ships in data/ and reads none; set config.dataset to one of '
      f'{input_pipeline.DATASETS[1:]} (or --config=configs/mnist.py) to read it, or leave it unset',
    )
  model.create_model(config)  # Checks config.input_shape too.
  side = min(config.input_shape[:2])
  if config.random_crop_padding >= side:
    fail('random_crop_padding', f'it must be below the {side}-pixel side of the images, or a shift could move one out')


def check_step_counts(config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """Raises ValueError for a warmup under one step, or an epoch-mode cadence that is not whole epochs: the checks
  that need the number of steps in an epoch, which `check_config` cannot know."""
  if config.schedule == 'warmup_cosine' and warmup_steps(config, steps_per_epoch) < 1:
    least = math.ceil(1e4 / steps_per_epoch) / 1e4
    advice = (
      f'use at least 1/{steps_per_epoch} of an epoch, {least:g} rounded up'
      if least < config.num_epochs  # check_config wants warmup_epochs < num_epochs.
      else f"the run's {config.num_epochs * steps_per_epoch} step(s) leave none after a warmup step: raise "
      'num_epochs or use schedule cosine'
    )
    raise ValueError(
      f'config.warmup_epochs={config.warmup_epochs} is less than one of the {steps_per_epoch} steps of an epoch, '
      f'so there would be no warmup; {advice}.'
    )
  if config.train_mode == 'epoch':
    for name in ('eval_every_steps', 'checkpoint_every_steps'):
      if config[name] % steps_per_epoch:  # 0, once per epoch, passes.
        raise ValueError(
          f'config.{name}={config[name]} is not valid with train_mode=epoch; it must be 0 or a multiple of the '
          f'{steps_per_epoch} steps of an epoch, since the state exists only between epochs.'
        )


def create_train_state(
  config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int
) -> train_state.TrainState:
  """Initial parameters and optimiser state; `steps_per_epoch` sets the schedule's length."""
  cnn = model.create_model(config)
  return train_state.TrainState.create(
    apply_fn=cnn.apply,
    params=model.init_params(config, rng),
    tx=create_optimizer(config, steps_per_epoch),
  )


def model_seeds(config: ml_collections.ConfigDict) -> np.ndarray:
  """The seed of each of the config.num_models models: model k is the single run with seed config.seed + k."""
  return config.seed + np.arange(config.num_models)


def create_sweep_state(config: ml_collections.ConfigDict, steps_per_epoch: int) -> train_state.TrainState:
  """config.num_models independent TrainStates stacked on a leading axis [K, ...], for `jax.vmap`.

  Model k starts from seed config.seed + k and peaks at config.learning_rates[k] (default config.learning_rate).
  """
  learning_rates = jnp.asarray(config.learning_rates or [config.learning_rate] * config.num_models, jnp.float32)

  def create(seed, learning_rate):
    state = create_train_state(config, jax.random.key(seed), steps_per_epoch)
    hyperparams = {**state.opt_state.hyperparams, 'learning_rate': learning_rate}
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))

  return jax.vmap(create)(model_seeds(config), learning_rates)


def create_initial_state(config: ml_collections.ConfigDict, steps_per_epoch: int) -> train_state.TrainState:
  """The state a run of `config` starts from: one model with seed config.seed, or the stacked sweep of num_models."""
  if config.num_models > 1:
    return create_sweep_state(config, steps_per_epoch)
  return create_train_state(config, jax.random.key(config.seed), steps_per_epoch)


def compute_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums over the batch, [B, K] x [B] -> {'loss_sum', 'correct', 'count'}; `mask` drops padding examples."""
  mask = jnp.ones(labels.shape, bool) if mask is None else mask
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  predicted = jnp.argmax(logits, -1)  # int64 with jax_enable_x64, where strict promotion refuses int32 labels.
  return {
    'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
    'correct': jnp.sum(mask & (predicted == labels.astype(predicted.dtype))),
    'count': jnp.sum(mask),
  }


def summarize_metrics(metric_sums: list[dict]) -> dict[str, np.ndarray]:
  """Metric sums of several batches -> {'loss', 'accuracy'} over all their examples, per model for a sweep."""
  totals = jax.tree.map(lambda *xs: np.sum(np.asarray(xs, np.float64), axis=0), *jax.device_get(metric_sums))
  return {'loss': totals['loss_sum'] / totals['count'], 'accuracy': totals['correct'] / totals['count']}


def train_step(state: train_state.TrainState, batch: dict) -> tuple[train_state.TrainState, dict]:
  """One optimiser step on a batch {'image': [B, H, W, C], 'label': [B]}."""

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean(), logits

  grads, logits = jax.grad(loss_fn, has_aux=True)(state.params)
  with jax.named_scope('optimizer'):  # Names the update's ops in profiles (benchmarks/profile_step.py).
    state = state.apply_gradients(grads=grads)
  return state, compute_metrics(logits, batch['label'])


def eval_step(params: dict, batch: dict, *, apply_fn) -> dict:
  """Metric sums of a padded eval batch {'image', 'label', 'mask'}."""
  logits = apply_fn({'params': params}, batch['image'])
  return compute_metrics(logits, batch['label'], batch['mask'])


def train_step_on_data(
  state: train_state.TrainState,
  data: dict,
  indices: jax.Array,
  augment_key: jax.Array,
  step,
  *,
  crop_padding: int,
  flip: bool,
  fill: np.ndarray,
  batch_sharding: NamedSharding,
) -> tuple[train_state.TrainState, dict]:
  """`train_step` on batch `step` of the epoch ordered by `indices` [S, B] and augmented with `augment_key`.

  The batch is gathered from `data` on the device and split over the devices' batch axis; step-by-step and
  whole-epoch training both run exactly this.
  """
  batch = input_pipeline.train_batch(data, indices, augment_key, step, crop_padding, flip, fill)
  return train_step(state, jax.lax.with_sharding_constraint(batch, batch_sharding))


class TrainingFunctions(NamedTuple):
  """The pure functions of a training run; the caller jits them (the state donated)."""

  epoch_order: Callable  # epoch -> (augmentation keys, indices [S, B]), with a leading [K] for a sweep.
  train_step: Callable  # (state, data, indices, keys, step) -> (state, metrics): one step on batch `step`.
  train_epoch: Callable  # (state, data, epoch) -> (state, metrics [S], or [S, K] for a sweep): one lax.scan.
  eval_step: Callable  # (params, padded batch) -> metric sums, per model for a sweep.


def training_functions(
  config: ml_collections.ConfigDict, num_examples: int, batch_sharding: NamedSharding, fill: np.ndarray | None = None
) -> TrainingFunctions:
  """Per-step and whole-epoch training on a split of `num_examples` held on the device, and evaluation of a batch,
  vmapped for a sweep.

  Random shifts fill what they uncover with `fill` [C], a black pixel normalised: by default config.dataset's
  (`input_pipeline.black`); data normalised otherwise passes its own.
  """
  sweep = config.num_models > 1
  seeds = model_seeds(config) if sweep else config.seed

  def epoch_order(epoch):
    def order(seed):
      shuffle_key, augment_key = input_pipeline.epoch_keys(seed, epoch)
      return augment_key, input_pipeline.shuffled_batch_indices(shuffle_key, num_examples, config.batch_size)

    return jax.vmap(order)(seeds) if sweep else order(seeds)

  step = functools.partial(
    train_step_on_data,
    crop_padding=config.random_crop_padding,
    flip=config.random_flip,
    fill=input_pipeline.black(config.dataset) if fill is None else fill,
    batch_sharding=batch_sharding,
  )
  if sweep:
    step = jax.vmap(step, in_axes=(0, None, 0, 0, None))

  def train_epoch(state, data, epoch):
    keys, indices = epoch_order(epoch)
    steps = jnp.arange(input_pipeline.steps_per_epoch(num_examples, config.batch_size))
    return jax.lax.scan(lambda state, i: step(state, data, indices, keys, i), state, steps)

  evaluate_batch = functools.partial(eval_step, apply_fn=model.create_model(config).apply)
  if sweep:
    evaluate_batch = jax.vmap(evaluate_batch, in_axes=(0, None))

  def eval_step_on_batch(params, batch):
    return evaluate_batch(params, jax.lax.with_sharding_constraint(batch, batch_sharding))

  return TrainingFunctions(epoch_order, step, train_epoch, eval_step_on_batch)


def evaluation_batch_size(num_examples: int, batch_size: int) -> int:
  """`batch_size` (a multiple of the device count), but no larger than `num_examples` rounded up to one: padding a
  1,000-example split to a batch of 100,000 would cost 100x the compute, for the same metrics."""
  num_devices = jax.device_count()
  return min(batch_size, -(-num_examples // num_devices) * num_devices)


def evaluate(
  eval_fn, params: dict, data: dict, batch_size: int, num_batches: int | None = None
) -> dict[str, np.ndarray]:
  """Exact loss and accuracy over every example of `data` ([K] arrays for a sweep of K models), or of its first
  `num_batches` batches, in batches of `evaluation_batch_size`."""
  batch_size = evaluation_batch_size(len(data['label']), batch_size)
  batches = itertools.islice(input_pipeline.eval_batches(data, batch_size), num_batches)
  return summarize_metrics([eval_fn(params, batch) for batch in batches])


def _restore_target(tree, sharding: NamedSharding):
  """Shapes and dtypes of `tree` placed with `sharding`: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def device_mesh() -> jax.sharding.Mesh:
  """All devices on one 'batch' axis: batches are split over it, parameters replicated."""
  return jax.make_mesh((jax.device_count(),), ('batch',), axis_types=(jax.sharding.AxisType.Auto,))


def place_replicated(tree, mesh: jax.sharding.Mesh):
  """`tree`'s arrays placed whole on every device of `mesh`, each host's devices taking that host's own copy.

  The hosts must hold the same copies (the splits and initial state are functions of the config, given the same
  data and software on each). `jax.device_put` onto devices of several hosts would check that by gathering every
  host's copy to each host, P copies of the training split per host; here the hosts compare a checksum per array.
  """
  arrays = jax.tree.map(np.asarray, tree)
  if jax.process_count() > 1:
    checksums = np.array([zlib.crc32(x.tobytes()) for x in jax.tree.leaves(arrays)], np.uint32)
    multihost_utils.assert_equal(
      checksums, 'The hosts hold different data or initial parameters; give every host the same dataset files, '
      'jax version and config'
    )  # fmt: skip
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), arrays)


def load_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, int] | None:
  """(params, step) of the latest checkpoint in `workdir` for `config`'s model, or None if there is none.

  The whole TrainState is restored, so `config` must have the run's optimiser settings too: the config the run
  saved, `workdir.load_config(workdir)`, has them.

  For a sweep (config.num_models > 1) every parameter has a leading [K] axis: model k is `params[...][k]`.
  """
  # Only the parameters are returned, so the schedule's length (steps per epoch) in this state does not matter.
  state = jax.eval_shape(lambda: create_initial_state(config, steps_per_epoch=1))
  abstract_state = _restore_target(state, NamedSharding(device_mesh(), PartitionSpec()))
  with workdir_lib.checkpoint_manager(workdir) as manager:
    state = workdir_lib.restore_checkpoint(manager, abstract_state, workdir, set_aside_corrupt=False)
  return None if state is None else (state.params, int(np.max(state.step)))


# What a resumed run must share with the run that made its checkpoint: the examples that make batch N, and the
# function its parameters compute (a model of other settings with the same parameter shapes would load silently).
RESUME_SETTINGS = ('dataset', 'validation_size', 'batch_size', 'seed', 'model')
# What the schedule's shape depends on: a resumed run may change them (to run longer, say), with a warning.
SCHEDULE_SETTINGS = ('schedule', 'num_epochs', 'warmup_epochs')


def _changed_settings(
  config: ml_collections.ConfigDict, previous: ml_collections.ConfigDict, names: Sequence[str]
) -> list[tuple[str, Any, Any]]:
  """(setting, value, that run's value) for each of `names` that `config` sets otherwise than `previous`.

  A nested ConfigDict (config.model) is compared field by field; a name or field `previous` lacks (saved by older
  code) is skipped.
  """
  changed = []
  for name in names:
    if name not in previous:
      continue
    if isinstance(config[name], ml_collections.ConfigDict):
      fields = sorted(previous[name].keys())
      pairs = [(f'{name}.{field}', config[name].get(field), previous[name].get(field)) for field in fields]
    else:
      pairs = [(name, config[name], previous[name])]
    changed += [(setting, value, before) for setting, value, before in pairs if value != before]
  return changed


def _describe_changes(changed: list[tuple[str, Any, Any]]) -> str:
  return ', '.join(f'config.{setting}={value!r} (that run: {before!r})' for setting, value, before in changed)


def _check_resumable(
  config: ml_collections.ConfigDict, previous: ml_collections.ConfigDict, workdir: str, step: int
) -> None:
  """Raises ValueError if resuming at `step` would change the batches or the model (RESUME_SETTINGS).

  A checkpoint counts steps, so a run resumed with another batch size, split or seed would repeat or skip data and
  end at another epoch; another config.model setting of the same parameter shapes would load the parameters into
  another function. They are compared with `previous`, the config of the run that made the checkpoint.
  """
  changed = _changed_settings(config, previous, RESUME_SETTINGS)
  if changed:
    raise ValueError(
      f'Resuming the checkpoint at step {step} in {workdir} needs the batches and model of the run that made it, but '
      f'{_describe_changes(changed)}. Set them back to resume, or use a new --workdir; nothing was changed.'
    )


def _warn_if_the_schedule_moves(
  config: ml_collections.ConfigDict, previous: ml_collections.ConfigDict | None, steps_per_epoch: int, step: int
) -> None:
  """Logs a warning if `config`'s schedule is at another fraction of its peak at `step` than `previous`'s was.

  A cosine schedule spans config.num_epochs, so resuming a finished run with more epochs takes its learning rate
  from about 0 back up: allowed, since that is how a run is extended, but said. A new peak alone moves nothing.
  `previous` is the config of the run that made the checkpoint at `step` (None, or without these settings: no check).
  """
  if previous is None or any(name not in previous for name in SCHEDULE_SETTINGS):
    return
  now, before = (float(create_learning_rate_schedule(c, steps_per_epoch, 1.0)(step)) for c in (config, previous))
  changed = _changed_settings(config, previous, SCHEDULE_SETTINGS)
  if changed and abs(now - before) > 1e-3:
    logging.warning(
      'Resuming at step %d with %s moves the learning-rate schedule: at this step it is %.1f%% of the peak, where '
      'that run had %.1f%%.',
      step, _describe_changes(changed), 100 * now, 100 * before,
    )  # fmt: skip


def _check_latest_checkpoint(config: ml_collections.ConfigDict, workdir: str, steps_per_epoch: int) -> None:
  """Raises ValueError, having read only the checkpoints' metadata and the saved configs, if the latest checkpoint
  in `workdir` cannot be resumed with `config`: made with other batches or another model (`_check_resumable`), past
  config.num_epochs (the run would end before it and return its state as if it had trained), or holding another
  model's or optimiser's arrays (IncompatibleCheckpointError)."""
  with workdir_lib.checkpoint_manager(workdir) as manager:  # Without max_to_keep: it makes and deletes nothing.
    latest_step = manager.latest_step()
    if latest_step is None:
      return
    previous = workdir_lib.load_config(workdir, latest_step)
    if previous is not None:
      _check_resumable(config, previous, workdir, latest_step)
    total_steps = config.num_epochs * steps_per_epoch
    if latest_step > total_steps:
      raise ValueError(
        f'The latest checkpoint in {workdir} is at step {latest_step}, past the {total_steps} steps of '
        f'config.num_epochs={config.num_epochs}; set config.num_epochs >= {-(-latest_step // steps_per_epoch)} to '
        'resume it (its parameters can be loaded with train.load_params), or use a new --workdir; nothing was changed.'
      )
    workdir_lib.check_compatible(manager, jax.eval_shape(lambda: create_initial_state(config, steps_per_epoch)))


def _resume_or_start(
  config: ml_collections.ConfigDict,
  workdir: str,
  manager,
  initial_state: train_state.TrainState,
  steps_per_epoch: int,
) -> tuple[train_state.TrainState, ml_collections.ConfigDict | None]:
  """(The latest readable checkpoint's state in `workdir`, the saved config of the run that made it), or
  (`initial_state`, None); `_check_latest_checkpoint` has checked that the latest can be resumed.

  The restored state takes its static fields (apply_fn, and tx with the schedule) and its peak learning rate from
  `initial_state`: the peak is a hyperparameter in the optimiser state, so that a resumed run can lower it
  (config_step<N>.json records the change).
  """
  if jax.process_count() > 1:  # Every host has listed the checkpoints before any could set a corrupt one aside.
    multihost_utils.sync_global_devices('tinycnn: checkpoints listed')
  target = _restore_target(initial_state, NamedSharding(device_mesh(), PartitionSpec()))
  restored = workdir_lib.restore_checkpoint(manager, target, workdir, set_aside_corrupt=True)
  if restored is None:  # No checkpoint, or every one was corrupt and set aside.
    return initial_state, None
  state = restored.replace(opt_state=restored.opt_state._replace(hyperparams=initial_state.opt_state.hyperparams))
  step = int(np.max(state.step))
  logging.info('Resumed from the checkpoint at step %d.', step)
  trained_by = workdir_lib.load_config(workdir, step)
  _warn_if_the_schedule_moves(config, trained_by, steps_per_epoch, step)
  return state, trained_by


def _warn_of_changes_to_a_finished_run(
  config: ml_collections.ConfigDict, trained_by: ml_collections.ConfigDict, workdir: str, step: int
) -> None:
  """Logs a warning if `config` differs from `trained_by`, the config of the run that finished at `step`.

  A finished run is only evaluated, and a changed config is not saved: it would claim a training that did not happen.
  """
  changed = _changed_settings(config, trained_by, sorted(trained_by.keys()))
  if changed:
    logging.warning(
      'The run in %s finished at step %d, so it is only evaluated, and its saved config stays its record: %s '
      'train nothing. Raise config.num_epochs to train on with them, or use a new --workdir.',
      workdir, step, _describe_changes(changed),
    )  # fmt: skip


def _check_finite(
  losses_by_step: Iterable[tuple[int, np.ndarray]],
  config: ml_collections.ConfigDict,
  learning_rates: np.ndarray,
  steps_per_epoch: int,
  loss_name: str = 'training loss',
) -> None:
  """Raises NonFiniteLossError at the first (step, loss) whose loss (of any model, for a sweep's [K]) is NaN or Inf,
  with advice in settings a run of `config` would accept (a warmup of one step or more, ending before the run)."""
  for step, loss in losses_by_step:
    losses = np.reshape(np.asarray(loss), -1)
    for k in np.flatnonzero(~np.isfinite(losses)):
      which = f' of model {k} (learning rate {learning_rates[k]:g})' if len(losses) > 1 else ''
      smaller_rate = (
        f'a smaller learning rate for model {k} in --config.learning_rates'
        if config.learning_rates
        else 'a smaller --config.learning_rate'
      )
      warmup_epochs = min(1.0, config.num_epochs / 2)  # check_config wants it below num_epochs.
      warmup = (
        f'--config.schedule=warmup_cosine --config.warmup_epochs={warmup_epochs:g}, or '
        if warmup_epochs * steps_per_epoch >= 1
        else ''  # Half of a one-step run is no step of warmup: it has no room for one.
      )
      raise NonFiniteLossError(
        f'The {loss_name}{which} became {losses[k]} at step {step}; any checkpoints before it were kept. Likely '
        f'causes: the learning rate is too high (resume with {smaller_rate}, or start a new --workdir with '
        f'{warmup}--config.grad_clip_norm=1.0), or the input data contain NaN/Inf.'
      )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> tuple[train_state.TrainState, dict]:
  """Trains per `config`, checkpointing and logging into `workdir`; returns (final state, final metrics).

  config.train_mode 'step' runs one jitted step per batch; 'epoch' runs each whole epoch as one jitted
  `lax.scan`. config.num_models = K > 1 trains K models side by side with `jax.vmap` (state and metrics get a
  leading [K] axis). With several devices the batch is split over them and the parameters replicated.
  """
  setup_start = time.perf_counter()
  check_config(config)
  workdir_lib.check_directory_path(workdir, 'workdir', 'name a directory for the run, new or one it resumes')
  workdir_lib.check_checkpoints_directory(workdir)
  eval_split = 'validation' if config.validation_size else 'test'
  # The checks that need the splits' sizes take them from the dataset's index: no image is read before they pass.
  # (The evaluation split's too: a tfds test split not prepared is found before the train split is read.)
  num_train = input_pipeline.split_size(config, 'train')
  input_pipeline.split_size(config, eval_split)
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
  check_step_counts(config, steps_per_epoch)
  _check_latest_checkpoint(config, workdir, steps_per_epoch)

  workdir_lib.make_directory(workdir, 'workdir')
  logging.info('Config:\n%s', config)
  logging.info('Model (per example):\n%s', model.summary(config))

  mesh = device_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec('batch'))
  # On the devices once: every epoch and every evaluation gathers its batches there.
  train_data = place_replicated(input_pipeline.load_split(config, 'train'), mesh)
  eval_data = place_replicated(input_pipeline.load_split(config, eval_split), mesh)
  sweep = config.num_models > 1
  state = place_replicated(create_initial_state(config, steps_per_epoch), mesh)
  manager = workdir_lib.checkpoint_manager(workdir, config.max_checkpoints_to_keep)
  state, trained_by = _resume_or_start(config, workdir, manager, state, steps_per_epoch)
  start_step = int(np.max(state.step))
  if start_step < total_steps or trained_by is None:
    workdir_lib.save_config(config, workdir, start_step)
  else:  # A finished run, only evaluated: the config it was trained with stays its record.
    workdir_lib.set_aside_configs_after(workdir, start_step)
    _warn_of_changes_to_a_finished_run(config, trained_by, workdir, start_step)
  learning_rates = np.asarray(jax.device_get(state.opt_state.hyperparams['learning_rate'])).reshape(-1)

  functions = training_functions(config, num_train, batch_sharding)
  jitted_eval = jit_with_xla_options(functions.eval_step)
  # Placed as the compiled step takes it, rather than on one device and moved at every step.
  epoch_order = jax.jit(functions.epoch_order, out_shardings=replicated)
  compile_start = time.perf_counter()
  setup_seconds = compile_start - setup_start
  if start_step < total_steps:  # A finished run is only evaluated.
    if config.train_mode == 'epoch':
      jitted_epoch = jit_with_xla_options(functions.train_epoch, donate_argnums=0)
      compiled_epoch = jitted_epoch.lower(state, train_data, 0).compile()
    # A resumed epoch-mode run may start mid-epoch (from a step-mode checkpoint): it finishes that epoch by steps.
    if config.train_mode == 'step' or start_step % steps_per_epoch:
      keys, indices = epoch_order(start_step // steps_per_epoch)
      jitted_step = jit_with_xla_options(functions.train_step, donate_argnums=0)
      compiled_step = jitted_step.lower(state, train_data, indices, keys, 0).compile()
  # The evaluation's program too: an evaluation is then timed running, not compiling, and the ETA estimates each
  # evaluation to come by the latest one's time.
  eval_batch = next(
    input_pipeline.eval_batches(eval_data, evaluation_batch_size(len(eval_data['label']), config.eval_batch_size))
  )
  eval_fn = jitted_eval.lower(state.params, eval_batch).compile()
  compile_seconds = time.perf_counter() - compile_start

  writer = workdir_lib.MetricWriter(workdir, config.num_models, start_step)
  pending = []  # (step, metrics) not yet checked for NaN, logged or checkpointed.
  eval_seconds = 0.0
  latest_full_evaluation_seconds = None  # The ETA's estimate of each evaluation to come.
  last_log_time, last_log_step, last_log_eval_seconds = time.perf_counter(), start_step, eval_seconds

  def checked_evaluation(step, params, num_batches=None):
    """`evaluate` of `params`, the parameters after `step`, timed as evaluation; a NaN or Inf loss stops the run."""
    nonlocal eval_seconds, latest_full_evaluation_seconds
    jax.block_until_ready(params)  # Dispatch runs ahead: count the queued training steps as training.
    eval_start = time.perf_counter()
    eval_metrics = evaluate(eval_fn, params, eval_data, config.eval_batch_size, num_batches)
    seconds = time.perf_counter() - eval_start
    eval_seconds += seconds
    if num_batches is None:
      latest_full_evaluation_seconds = seconds
    _check_finite([(step, eval_metrics['loss'])], config, learning_rates, steps_per_epoch, f'{eval_split} loss')
    return eval_metrics

  def log_progress(step, train_metrics, evaluates_now=False):
    """The progress line: steps/s and images/s of training alone, and an ETA of the steps left at that speed plus
    the evaluations still to come (`evaluates_now`: one after `step` itself; the final one too) at the time the
    latest took (none before the first)."""
    nonlocal last_log_time, last_log_step, last_log_eval_seconds
    now = time.perf_counter()
    steps = step - last_log_step
    steps_per_second = steps / (now - last_log_time - (eval_seconds - last_log_eval_seconds))
    evaluations_left = len(range((step // eval_every + 1) * eval_every, total_steps, eval_every)) + evaluates_now + 1
    eta = (total_steps - step) / steps_per_second + evaluations_left * (latest_full_evaluation_seconds or 0.0)
    logging.info(
      'step %d/%d epoch %d  train loss %s accuracy %s  %.1f steps/s %.0f images/s  ETA %.0f s%s',
      step, total_steps, -(-step // steps_per_epoch), _fmt(train_metrics['loss']),
      _fmt(train_metrics['accuracy']), steps_per_second,
      steps_per_second * config.batch_size * config.num_models, eta,
      f'  (compiled in {compile_seconds:.2f} s)' if last_log_step == start_step else '',
    )  # fmt: skip
    last_log_time, last_log_step, last_log_eval_seconds = now, step, eval_seconds

  def finish_step(step, metrics, state, by_step):
    """Logs, evaluates and checkpoints after `step` as the config's cadences ask (`by_step`: run as its own call).

    Nothing non-finite is logged, evaluated or saved. The training loss of step s comes from the parameters before
    its update, so the parameters after it are checked by their own evaluation loss before they are saved.
    """
    nonlocal pending
    pending.append((step, metrics))
    is_last = step == total_steps
    logs = step % config.log_every_steps == 0 or is_last
    evaluates = step % eval_every == 0 and not is_last
    checkpoints = step % checkpoint_every == 0 or is_last
    if logs or evaluates or checkpoints:
      _check_finite([(s, m['loss_sum']) for s, m in pending], config, learning_rates, steps_per_epoch)
    if logs:
      train_metrics = summarize_metrics([m for _, m in pending])
      writer.write(step, 'train', train_metrics)
      pending = []
      if by_step:
        log_progress(step, train_metrics, evaluates_now=evaluates)
    if evaluates:
      eval_metrics = checked_evaluation(step, state.params)
      writer.write(step, eval_split, eval_metrics)
      logging.info(
        'step %d  %s loss %s accuracy %s', step, eval_split, _fmt(eval_metrics['loss']), _fmt(eval_metrics['accuracy'])
      )
    if checkpoints:
      if not evaluates:  # One batch shows parameters that overflow, at a fraction of an evaluation's cost.
        checked_evaluation(step, state.params, num_batches=1)
      writer.sync()  # A run resumed from this checkpoint logs only the steps after it.
      workdir_lib.save_checkpoint(manager, step, state)

  loop_start = time.perf_counter()
  try:
    for epoch in range(start_step // steps_per_epoch, config.num_epochs):
      first_step = epoch * steps_per_epoch
      if config.train_mode == 'epoch' and start_step <= first_step:
        state, epoch_metrics = compiled_epoch(state, train_data, epoch)
        epoch_metrics = jax.device_get(epoch_metrics)
        for i in range(steps_per_epoch):
          finish_step(first_step + i + 1, jax.tree.map(lambda m, i=i: m[i], epoch_metrics), state, by_step=False)
        # A whole epoch is one call, with no time between its steps: its progress line is once per epoch.
        log_progress(first_step + steps_per_epoch, summarize_metrics([jax.tree.map(lambda m: m.sum(0), epoch_metrics)]))
      else:
        keys, indices = epoch_order(epoch)
        for i in range(max(start_step - first_step, 0), steps_per_epoch):
          state, metrics = compiled_step(state, train_data, indices, keys, i)
          finish_step(first_step + i + 1, metrics, state, by_step=True)
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - loop_start - eval_seconds
    eval_metrics = checked_evaluation(total_steps, state.params)
    # A finished run run again writes no second row, but one killed after its last checkpoint writes the missing one.
    if start_step < total_steps or not any(
      (row['step'], row['split']) == (total_steps, eval_split) for row in workdir_lib.read_metrics(workdir)
    ):
      writer.write(total_steps, eval_split, eval_metrics)
    logging.info('Final %s loss %s accuracy %s', eval_split, _fmt(eval_metrics['loss']), _fmt(eval_metrics['accuracy']))
  finally:
    try:
      manager.wait_until_finished()  # Raises what a background save met.
    finally:  # Even so: the process would wait at exit for the threads of a manager or writer left open.
      writer.close()
      manager.close()
  logging.info(
    'Time: setup %.1f s (data, initial state, checkpoint), compile %.1f s, train %.1f s (with logging and '
    'checkpoints), eval %.1f s.',
    setup_seconds, compile_seconds, train_seconds, eval_seconds,
  )  # fmt: skip
  return state, {f'{eval_split}_{name}': (value if sweep else float(value)) for name, value in eval_metrics.items()}


def xla_compiler_options() -> dict[str, str]:
  """XLA options for the training and evaluation programs: on the CPU, no YNNPACK fusions; elsewhere none.

  XLA:CPU (jaxlib 0.10) hands dots, with the elementwise ops and reductions around them, to YNNPACK by default.
  For this network's narrow matmuls (24 columns for conv1's band) XLA's own dots and loop fusions ran a training
  step 1.14-1.26x faster at B=32 and 128, and 0.99-1.08x at B=512 and 2048, step and epoch mode alike (paired in
  one process on a 2-vCPU AMD EPYC, Zen 3; other CPUs not measured; benchmarks/README.md). Set per compile, unlike
  XLA_FLAGS, so other programs in the process keep XLA's defaults. The option is experimental: should a later
  jaxlib drop it, compiling fails with an unknown-option error (requirements.txt pins jax below 0.11, and
  tests/train_test.py checks that the option still takes effect).
  """
  return {'xla_cpu_experimental_ynn_fusion_type': ''} if jax.default_backend() == 'cpu' else {}


def jit_with_xla_options(fun: Callable, **jit_kwargs) -> Callable:
  """jax.jit with `xla_compiler_options()`: how the training and evaluation programs are compiled."""
  return jax.jit(fun, compiler_options=xla_compiler_options(), **jit_kwargs)


def tune_cpu_runtime() -> None:
  """Makes jitted steps on the CPU run on the calling thread and reuse freed memory (GPU/TPU steps are unaffected).

  Each call of a compiled step on the CPU allocates its temporary buffers afresh (41 MB for C=3 at B=512). By
  default glibc maps a block that large from the OS on every call and unmaps it when freed, so every step
  page-faults its way through fresh pages: 10,000 faults per step, and step mode ran at 0.6-0.7x the rate of the
  same steps inside one lax.scan. Two settings fix that:
  - glibc's mmap and trim thresholds at 1 GiB, so that smaller blocks come from the heap and stay there when freed;
  - no asynchronous dispatch on the CPU, so that the calling (main) thread allocates those buffers, from the main
    heap: a block over 64 MB from one of XLA's worker threads, in an arena of its own, is always mapped afresh.
    XLA's threads keep their own arenas for their small blocks: one arena shared by all, the earlier way to the
    same reuse, cost 26-126 lock waits per step against 10-22, and step mode now runs 1.07-1.22x faster than it
    did then at B=128 and 512 (medians of four alternating runs, benchmarks/README.md).
  They change the whole process, so only entry points call this (main below, explain.py, the benchmarks), before
  the first computation: JAX reads the dispatch setting when it creates its CPU client. The malloc thresholds are
  set only when the CPU runs the steps: a GPU or TPU run's host memory is returned to the OS as usual. Finding the
  backend starts it, so a multi-host run calls this after `jax.distributed.initialize`.
  """
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  if jax.default_backend() == 'cpu' and sys.platform.startswith('linux'):
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)  # glibc's; musl's is a no-op.
    if mallopt is not None:
      trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD from <malloc.h>.
      mallopt(mmap_threshold, 1 << 30)
      mallopt(trim_threshold, 1 << 30)


def _fmt(value: np.ndarray) -> str:
  return np.array2string(np.asarray(value), precision=4, floatmode='fixed', separator=' ')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a --config file that is not there, given twice or has no get_config(), or a
  --config.<field> the config lacks, reported as a usage error, not a traceback."""
  # A --flagfile's flags count as if given in its place, as absl reads them. (ml_collections has read the flag
  # files once already, when the --config flag was defined, so they can be opened.)
  args = [argv[0], *flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)]
  config_values = []  # absl takes -config too.
  for before, arg in itertools.pairwise(args[: args.index('--')] if '--' in args else args):  # '--' ends the flags.
    if arg.startswith(('--config=', '-config=')):
      config_values.append(arg.partition('=')[2])
    elif before in ('--config', '-config'):
      config_values.append(arg)
  if len(config_values) > 1:
    # ml_collections loads a later file into the earlier one's module, so a file without get_config() would run the
    # earlier config unannounced, and each --config.<field> would be defined twice.
    sys.exit(
      f'FATAL Flags parsing error: --config is given {len(config_values)} times ({", ".join(config_values)}); give '
      'one config file, and change its fields with --config.<field>=value.'
    )
  config_value = config_values[0] if config_values else None
  config_file = None if config_value is None else config_value.split(':', 1)[0]  # path:argument, as ml_collections.
  if config_file is not None and not os.path.isfile(config_file):
    # ml_collections would report it at the config's first use, or call each --config.<field> an unknown flag.
    configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
    sys.exit(f'FATAL Flags parsing error: --config={config_value}: there is no file {config_file}; see {configs}/.')
  try:
    return app.parse_flags_with_usage(argv)
  except AttributeError as error:
    missing_key = error.args[0] if error.args else None
    if isinstance(missing_key, KeyError):  # ml_collections' error for a missing field.
      # Its text names the field, and the nearest one the config has: "'pol'\nDid you mean "pool" instead of "pol"?"
      sys.exit(f'FATAL Flags parsing error: the config has no field {missing_key.args[0]}')
    if error.name == 'get_config':  # A Python file, but not a config: model.py, say.
      sys.exit(
        f'FATAL Flags parsing error: --config={config_value}: {config_file} has no get_config(); a config file '
        'returns its ConfigDict from get_config(), as configs/*.py do.'
      )
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir_lib.quiet_orbax_logging()
  launch = {name: flags.FLAGS[name].value for name in ('coordinator_address', 'num_processes', 'process_id')}
  if flags.FLAGS.multihost:
    try:
      jax.distributed.initialize(**launch)  # Unset ones are found on Cloud TPU, SLURM, Open MPI or Kubernetes.
    except ValueError as error:
      raise app.UsageError(
        f'--multihost could not join a cluster ({error}); give --coordinator_address, --num_processes and '
        '--process_id (from 0 to num_processes - 1), or launch where JAX finds them (Cloud TPU, SLURM, Open MPI, '
        'Kubernetes).'
      ) from None
  elif any(value is not None for value in launch.values()):
    raise app.UsageError(f'--{"/--".join(launch)} join the processes of a --multihost run; add --multihost.')
  tune_cpu_runtime()
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Defined here rather than at import, so that tools and notebooks importing train get no required flags.
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the saved config.')
  config_flags.DEFINE_config_file('config', None, 'Path to a config file, e.g. configs/default.py.', lock_config=True)
  flags.DEFINE_bool('multihost', False, 'Run one process per host, joined by jax.distributed.initialize().')
  flags.DEFINE_string('coordinator_address', None, 'With --multihost: host:port of process 0, the same on every host.')
  flags.DEFINE_integer('num_processes', None, 'With --multihost: how many processes the run has.', lower_bound=1)
  flags.DEFINE_integer('process_id', None, 'With --multihost: this process, 0 to num_processes - 1.', lower_bound=0)
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
