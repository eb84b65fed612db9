"""Trains and evaluates the tinycnn classifier.

    python train.py --config=configs/default.py --workdir=runs/default --config.num_epochs=5

Re-running the same command resumes from the latest checkpoint in the workdir, exactly: the batch order
is a function of (seed, step), so an interrupted and resumed run ends with the same parameters bit for bit.
The workdir holds `config.json`, `checkpoints/`, `metrics.jsonl` and TensorBoard event files.
"""

import functools
import json
import logging as std_logging
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX
from absl import app, flags, logging
from flax.training import train_state
from ml_collections import config_flags

import input_pipeline
import model

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


class IncompatibleCheckpointError(ValueError):
  """A workdir's checkpoint has parameters of other shapes than the config's model."""


def create_learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate per step for `config.schedule`, peaking at `config.learning_rate`."""
  total_steps = config.num_epochs * steps_per_epoch
  if config.schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  if config.schedule == 'cosine':
    return optax.cosine_decay_schedule(config.learning_rate, total_steps)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup_steps, total_steps)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optax optimiser of `config.optimizer`, with optional global-norm clipping and weight decay."""
  learning_rate = create_learning_rate_schedule(config, steps_per_epoch)
  if config.optimizer == 'sgd':
    optimizer = optax.sgd(learning_rate)
  elif config.optimizer == 'momentum':
    optimizer = optax.sgd(learning_rate, momentum=config.momentum)
  elif config.optimizer == 'adam':
    optimizer = optax.adam(learning_rate)
  else:
    optimizer = optax.adamw(learning_rate, weight_decay=config.weight_decay)
  if config.weight_decay and config.optimizer != 'adamw':
    # Coupled (L2) decay for the SGD family and adam; adamw decouples it itself.
    optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay), optimizer)
  if config.grad_clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
  return optimizer


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid training setting (the model checks its own)."""

  def fail(name, valid):
    raise ValueError(f'config.{name}={config[name]!r} is not valid; {valid}.')

  if config.optimizer not in OPTIMIZERS:
    fail('optimizer', f'choose one of {OPTIMIZERS}')
  if config.schedule not in SCHEDULES:
    fail('schedule', f'choose one of {SCHEDULES}')
  for name in ('batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps', 'max_checkpoints_to_keep'):
    if not isinstance(config[name], int) or config[name] < 1:
      fail(name, 'it must be an integer >= 1')
  for name in ('eval_every_steps', 'checkpoint_every_steps'):
    if not isinstance(config[name], int) or config[name] < 0:
      fail(name, 'it must be an integer >= 0 (0 means once per epoch)')
  if (
    not (isinstance(config.learning_rate, (int, float)) and math.isfinite(config.learning_rate))
    or config.learning_rate <= 0
  ):
    fail('learning_rate', 'it must be a finite number > 0')
  for name in ('weight_decay', 'grad_clip_norm', 'warmup_epochs'):
    if not config[name] >= 0:
      fail(name, 'it must be a number >= 0')
  if not 0 <= config.momentum < 1:
    fail('momentum', 'it must be in [0, 1)')
  if config.warmup_epochs >= config.num_epochs and config.schedule == 'warmup_cosine':
    fail('warmup_epochs', f'it must be less than num_epochs={config.num_epochs}')
  model.create_model(config)


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


def compute_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums over the batch, [B, K] x [B] -> {'loss_sum', 'correct', 'count'}; `mask` drops padding examples."""
  mask = jnp.ones(labels.shape, bool) if mask is None else mask
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
    'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
    'correct': jnp.sum(mask & (jnp.argmax(logits, -1) == labels)),
    'count': jnp.sum(mask),
  }


def summarize_metrics(metric_sums: list[dict]) -> dict[str, float]:
  """Metric sums of several batches -> {'loss', 'accuracy'} over all their examples."""
  totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(metric_sums))
  return {'loss': totals['loss_sum'] / totals['count'], 'accuracy': totals['correct'] / totals['count']}


def train_step(state: train_state.TrainState, batch: dict) -> tuple[train_state.TrainState, dict]:
  """One optimiser step on a batch {'image': [B, H, W, C], 'label': [B]}."""

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean(), logits

  grads, logits = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), compute_metrics(logits, batch['label'])


def eval_step(params: dict, batch: dict, *, apply_fn) -> dict:
  """Metric sums of a padded eval batch {'image', 'label', 'mask'}."""
  logits = apply_fn({'params': params}, batch['image'])
  return compute_metrics(logits, batch['label'], batch['mask'])


def evaluate(eval_fn, params: dict, data: dict, batch_size: int) -> dict[str, float]:
  """Exact loss and accuracy over every example of `data`."""
  return summarize_metrics([eval_fn(params, batch) for batch in input_pipeline.eval_batches(data, batch_size)])


class MetricWriter:
  """Writes scalars to TensorBoard and as JSON lines to workdir/metrics.jsonl (appending on resume)."""

  def __init__(self, workdir: str):
    path = os.path.join(workdir, 'metrics.jsonl')
    ends_mid_line = False
    if os.path.exists(path) and os.path.getsize(path):
      with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        ends_mid_line = f.read(1) != b'\n'
    self._jsonl = open(path, 'a')
    if ends_mid_line:
      self._jsonl.write('\n')  # A run killed mid-write left a partial line; start on a fresh one.
    self._tensorboard = tensorboardX.SummaryWriter(workdir)

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    self._jsonl.write(json.dumps({'step': step, 'split': split, **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f'{split}/{name}', value, step)

  def close(self) -> None:
    self._jsonl.close()
    self._tensorboard.close()


def _shapes(tree) -> dict:
  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def checkpoint_manager(workdir: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
  """Orbax manager of workdir/checkpoints/<step>, each holding one TrainState."""
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=max_to_keep is not None),
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def _check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
  """Raises IncompatibleCheckpointError unless checkpoint `step` has the parameter shapes of `abstract_params`."""
  expected, found = _shapes(abstract_params), _shapes(manager.item_metadata(step)['params'])
  if expected != found:
    differences = [
      f'  {name}: checkpoint {found.get(name)}, config {expected.get(name)}'
      for name in sorted(expected.keys() | found.keys())
      if expected.get(name) != found.get(name)
    ]
    raise IncompatibleCheckpointError(
      f'The checkpoint at step {step} in {manager.directory} belongs to a different model:\n'
      + '\n'.join(differences)
      + '\nUse a new --workdir for this config; the existing checkpoints were left untouched.'
    )


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, workdir: str):
  """The latest readable checkpoint as a TrainState, or None when there is none.

  A checkpoint of a different model is refused. A latest checkpoint that cannot be read is moved to
  workdir/corrupt_checkpoints/ (never deleted) and the previous one is used.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      _check_compatible(manager, step, abstract_state.params)
      return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except IncompatibleCheckpointError:
      raise
    except Exception as error:  # noqa: BLE001 -- any read failure means this checkpoint is unusable.
      quarantine = os.path.join(workdir, 'corrupt_checkpoints', str(step))
      logging.error(
        'Checkpoint %d cannot be read (%s: %s); moving it to %s.', step, type(error).__name__, error, quarantine
      )
      os.makedirs(os.path.dirname(quarantine), exist_ok=True)
      shutil.move(os.path.join(manager.directory, str(step)), quarantine)
      manager.reload()
  return None


def load_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, int] | None:
  """(params, step) of the latest readable checkpoint in `workdir` for `config`'s model, or None if there is none."""
  # The schedule's length (steps per epoch) does not change the state's structure, so any value restores it.
  abstract_state = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0), steps_per_epoch=1))
  with checkpoint_manager(workdir) as manager:
    state = restore_checkpoint(manager, abstract_state, workdir)
  return None if state is None else (state.params, int(state.step))


def save_config(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Saves config.json; a resumed run with a changed config adds config_step<N>.json beside it."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    path = os.path.join(workdir, f'config_step{step}.json')
    logging.warning('The config differs from %s/config.json; saving this one as %s.', workdir, path)
  with open(path, 'w') as f:
    f.write(text)


def _check_finite(pending: list[tuple[int, dict]]) -> None:
  """Raises NonFiniteLossError at the first step in `pending` whose loss is NaN or Inf."""
  for step, metrics in pending:
    loss = float(metrics['loss_sum'])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
        f'The training loss became {loss} at step {step}. Likely causes: the learning rate is too high '
        '(try a smaller --config.learning_rate, a warmup_cosine schedule, or --config.grad_clip_norm=1.0), '
        'or the input data contain NaN/Inf. The last good checkpoint was kept.'
      )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> tuple[train_state.TrainState, dict]:
  """Trains per `config`, checkpointing and logging into `workdir`; returns (final state, final metrics)."""
  check_config(config)
  # On the device once: every epoch and every evaluation gathers its batches there.
  train_data = jax.device_put(input_pipeline.load_split(config, 'train'))
  test_data = jax.device_put(input_pipeline.load_split(config, 'test'))
  num_train = len(train_data['label'])
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint_every_steps or steps_per_epoch

  os.makedirs(workdir, exist_ok=True)
  logging.info('Config:\n%s', config)
  logging.info('Model (per example):\n%s', model.summary(config))

  state = create_train_state(config, jax.random.key(config.seed), steps_per_epoch)
  manager = checkpoint_manager(workdir, config.max_checkpoints_to_keep)
  restored = restore_checkpoint(manager, jax.eval_shape(lambda: state), workdir)
  if restored is not None:
    state = restored
    logging.info('Resumed from the checkpoint at step %d.', int(state.step))
  start_step = int(state.step)
  save_config(config, workdir, start_step)

  compile_start = time.perf_counter()
  first_batch = next(input_pipeline.train_batches(train_data, config, epoch=0))
  train_step_fn = jax.jit(train_step, donate_argnums=0).lower(state, first_batch).compile()
  eval_fn = jax.jit(functools.partial(eval_step, apply_fn=state.apply_fn))
  compile_seconds = time.perf_counter() - compile_start

  writer = MetricWriter(workdir)
  pending = []  # (step, device metrics) not yet checked for NaN, logged or checkpointed.
  last_log_time, last_log_step = time.perf_counter(), start_step
  step = start_step
  try:
    for epoch in range(start_step // steps_per_epoch, config.num_epochs):
      batches = input_pipeline.train_batches(train_data, config, epoch, start_step=step - epoch * steps_per_epoch)
      for batch in batches:
        state, metrics = train_step_fn(state, batch)
        step += 1
        pending.append((step, metrics))
        is_last = step == total_steps
        if step % config.log_every_steps == 0 or is_last:
          _check_finite(pending)
          train_metrics = summarize_metrics([m for _, m in pending])
          writer.write(step, 'train', train_metrics)
          now = time.perf_counter()
          steps_per_second = (step - last_log_step) / (now - last_log_time)
          logging.info(
            'step %d/%d epoch %d  train loss %.4f accuracy %.4f  %.1f steps/s %.0f images/s  ETA %.0f s%s',
            step, total_steps, epoch + 1, train_metrics['loss'], train_metrics['accuracy'], steps_per_second,
            steps_per_second * config.batch_size, (total_steps - step) / steps_per_second,
            f'  (compiled in {compile_seconds:.2f} s)' if last_log_step == start_step else '',
          )  # fmt: skip
          pending, last_log_time, last_log_step = [], now, step
        if step % eval_every == 0 and not is_last:
          test_metrics = evaluate(eval_fn, state.params, test_data, config.eval_batch_size)
          writer.write(step, 'test', test_metrics)
          logging.info('step %d  test loss %.4f accuracy %.4f', step, test_metrics['loss'], test_metrics['accuracy'])
        if step % checkpoint_every == 0 or is_last:
          _check_finite(pending)
          manager.save(step, args=ocp.args.StandardSave(state))
    test_metrics = evaluate(eval_fn, state.params, test_data, config.eval_batch_size)
    if start_step < total_steps:
      writer.write(total_steps, 'test', test_metrics)
    logging.info('Final test loss %.4f accuracy %.4f', test_metrics['loss'], test_metrics['accuracy'])
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return state, {f'test_{name}': value for name, value in test_metrics.items()}


FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the saved config.')
config_flags.DEFINE_config_file('config', None, 'Path to a config file, e.g. configs/default.py.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax narrates every checkpoint at INFO; keep its warnings, drop the chatter from the progress log.
  logging.get_absl_handler().addFilter(lambda r: r.levelno >= std_logging.WARNING or '/orbax/' not in r.pathname)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
