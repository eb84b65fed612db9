"""A run's workdir: orbax checkpoints of its TrainState, its saved config and its metrics.

    workdir/config.json         the first run's config (a run with another adds config_step<N>[_<i>].json)
    workdir/checkpoints/<step>  orbax checkpoints, the newest config.max_checkpoints_to_keep
    workdir/metrics.jsonl       {"step", "split", "loss", "accuracy"} per line (and "model" in a sweep)
    workdir/superseded_metrics.jsonl  the lines an earlier run logged after the step a later run started from
    workdir/events.out.*        the same scalars for TensorBoard (workdir/model_<k>/ per model of a sweep)

Nothing a user wrote is overwritten or deleted: an unreadable checkpoint is moved to workdir/corrupt_checkpoints/,
the config of a run whose checkpoints are gone, once a run starts before it, to workdir/superseded_configs/, and the
metrics an earlier run logged after the step a run starts from to workdir/superseded_metrics.jsonl.
"""

import itertools
import json
import logging as std_logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorboardX
from absl import logging
from jax.experimental import multihost_utils


def quiet_orbax_logging() -> None:
  """Keeps orbax's warnings in the absl log but drops the INFO lines it writes for every checkpoint read or write.

  For a program's `main`: it changes the process-wide absl handler.
  """
  logging.get_absl_handler().addFilter(lambda r: r.levelno >= std_logging.WARNING or '/orbax/' not in r.pathname)


class IncompatibleCheckpointError(ValueError):
  """A workdir's checkpoint holds a state of another structure than the config's: another model or optimiser."""


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


def check_checkpoints_directory(workdir: str) -> None:
  """Raises ValueError when workdir/checkpoints, or an entry in it named like a step, is not a directory: orbax would
  fail to save into the one (after training, its threads then never ending) and replace the other."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
    raise ValueError(
      f'{checkpoints} is not a directory, and the run keeps its checkpoints there; move it, or name another workdir.'
    )
  names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
  for name in sorted(name for name in names if name.isdigit()):
    if not os.path.isdir(os.path.join(checkpoints, name)):
      raise ValueError(
        f'{os.path.join(checkpoints, name)} is not a checkpoint (a directory), and saving step {name} would replace '
        'it; move it out of the checkpoints directory.'
      )


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` as checkpoint `step` (in the background; `manager.wait_until_finished()` waits for it)."""
  manager.save(step, args=ocp.args.StandardSave(state))


def _check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state) -> None:
  """Raises IncompatibleCheckpointError unless checkpoint `step` has the leaves and shapes of `abstract_state`."""
  expected, found = _shapes(abstract_state), _shapes(manager.item_metadata(step))
  if not found:  # Orbax returns no tree when the checkpoint's _METADATA file is missing: it cannot be read.
    raise ValueError(f'checkpoint {step} lists no arrays (its _METADATA file is missing or empty)')
  differences = [name for name in sorted(expected.keys() | found.keys()) if expected.get(name) != found.get(name)]
  if not differences:
    return
  if expected.get('step') != found.get('step'):  # A sweep's state has a leading [K] axis, its step too.
    found_models, expected_models = ((shapes.get('step') or (1,))[0] for shapes in (found, expected))
    cause = f'holds {found_models} model(s) side by side, not config.num_models={expected_models}'
    # config.learning_rates, if given, must have one entry per model (check_config): the advice says so.
    rates = 'no config.learning_rates' if found_models == 1 else f'{found_models} config.learning_rates or none'
    cause += f' (set --config.num_models={found_models} with {rates} to resume it)'
  elif any(name.startswith('params/') for name in differences):
    cause = 'belongs to a different model'
  else:
    cause = 'has the optimiser state of other settings (config.optimizer, weight_decay or grad_clip_norm)'
  shown = 8
  raise IncompatibleCheckpointError(
    f'The checkpoint at step {step} in {manager.directory} {cause}:\n'
    + '\n'.join(f'  {name}: checkpoint {found.get(name)}, config {expected.get(name)}' for name in differences[:shown])
    + (f'\n  ... and {len(differences) - shown} more' if len(differences) > shown else '')
    + '\nTrain this config in a new --workdir, or read these checkpoints with the config their run saved '
    '(workdir.load_config); the existing checkpoints were left untouched.'
  )


def unused_path(stem: str, suffix: str = '', taken: Callable[[str], bool] = os.path.exists) -> str:
  """stem + suffix, or the first of stem_2 + suffix, stem_3 + suffix, ... that is not `taken` (by default, that
  does not exist): how nothing a run or a drawing wrote is overwritten."""
  candidates = itertools.chain([stem], (f'{stem}_{i}' for i in itertools.count(2)))
  return next(path for path in (candidate + suffix for candidate in candidates) if not taken(path))


def check_directory_path(path: str, setting: str, advice: str, error: type[Exception] = ValueError) -> None:
  """Raises `error` naming the `setting` (train's workdir, a script's --out_dir) when `path` is empty or names
  something other than a directory: a check before any work, with `advice` on what to give instead."""
  if not path or (os.path.lexists(path) and not os.path.isdir(path)):
    raise error(f'{setting}={path!r} {"is not a directory" if path else "is empty"}; {advice}.')


def make_directory(path: str, setting: str, error: type[Exception] = ValueError) -> None:
  """os.makedirs(path), raising `error` that names the `setting` when the path cannot be a directory or a file cannot
  be written in it, so that it is refused before any work rather than as an OSError after it."""
  check_directory_path(path, setting, 'name a directory', error)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as reason:
    raise error(f'{setting}={path!r} cannot be made ({reason}); name a directory that can.') from None
  try:
    with tempfile.TemporaryFile(dir=path):  # Removed on closing: nothing is left in the directory.
      pass
  except OSError as reason:
    raise error(f'{setting}={path!r} cannot be written to ({reason}); name a directory that can.') from None


def check_compatible(manager: ocp.CheckpointManager, abstract_state) -> None:
  """Raises IncompatibleCheckpointError if the checkpoints hold another model or optimiser state than
  `abstract_state` (shapes and dtypes suffice). A run's checkpoints share one structure, so the newest that lists its
  arrays speaks for all; unreadable ones are skipped, for `restore_checkpoint` to deal with."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      _check_compatible(manager, step, abstract_state)
    except IncompatibleCheckpointError:
      raise
    except Exception:  # noqa: BLE001 -- unreadable: not this function's to judge.
      continue
    return


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, workdir: str, *, set_aside_corrupt: bool):
  """The latest checkpoint as a TrainState, or None when there is none.

  Checkpoints of another model, or whose optimiser state has another structure, are refused and left in place,
  with nothing set aside. With `set_aside_corrupt`, a latest checkpoint that cannot be read is moved to
  workdir/corrupt_checkpoints/ (never deleted) and the previous one is used (with none, the run starts again from
  step 0); a second unreadable one stops the run, since that points to a cause other than an interrupted write.
  Running out of memory or lacking permission to read is raised, with nothing moved: the checkpoint may be sound.
  """
  check_compatible(manager, abstract_state)  # Before an unreadable checkpoint could be set aside.
  steps = sorted(manager.all_steps(), reverse=True)
  set_aside = []
  for step in steps:
    try:
      _check_compatible(manager, step, abstract_state)
      return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (IncompatibleCheckpointError, MemoryError, PermissionError):
      raise  # Another model's, or a process that cannot read it now: no sign the checkpoint itself is damaged.
    except Exception as error:  # noqa: BLE001 -- judged by the error at its root.
      root = _root_cause(error)
      cause = f'{type(root).__name__}: {(str(root).splitlines() or [""])[0]}'[:300]  # The raises chain it whole.
      if isinstance(root, (MemoryError, PermissionError)) or str(root).startswith(CANNOT_READ_NOW):
        raise RuntimeError(  # The same as above, as TensorStore reports it under orbax's error.
          f'The checkpoint at step {step} in {manager.directory} cannot be read by this process ({cause}); it was '
          'left where it is, since the checkpoint itself may be sound.'
        ) from error
      # Any other read failure means this checkpoint is unusable.
      older = sorted(s for s in steps if s < step)
      if not set_aside_corrupt or set_aside:
        untried = f' Older checkpoints, not tried: {older}.' if older else ' There is no older checkpoint.'
        if set_aside:
          advice = (
            f' Checkpoint {set_aside[0]} was unreadable too and is in {workdir}/corrupt_checkpoints: two in a row '
            f'point to a cause other than an interrupted write (a full disk, say), to mend first.{untried}'
          )
          if older:
            advice += f' Then move checkpoint {step} there too, and train.py resumes from checkpoint {older[-1]}.'
        elif older:  # Reading a workdir moves nothing: say how training would recover.
          advice = (
            f'{untried} train.py on this workdir would move this one to corrupt_checkpoints/ and resume from '
            f'checkpoint {older[-1]}, if that one reads.'
          )
        else:
          advice = untried
        raise RuntimeError(
          f'The checkpoint at step {step} in {manager.directory} cannot be read ({cause}).' + advice
        ) from error
      # The same step may have been set aside before, by a run that then made it again.
      quarantine = unused_path(os.path.join(workdir, 'corrupt_checkpoints', str(step)))
      logging.error(
        'Checkpoint %d cannot be read (%s); moving it to %s and %s.',
        step, cause, quarantine,
        f'resuming from checkpoint {older[-1]}' if older else 'starting again from step 0: there is no older one',
      )  # fmt: skip
      if jax.process_index() == 0:  # The workdir is shared by all hosts: one moves, the others wait for it.
        os.makedirs(os.path.dirname(quarantine), exist_ok=True)
        shutil.move(os.path.join(manager.directory, str(step)), quarantine)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
      manager.reload()
      set_aside.append(step)
  return None


# TensorStore's status codes for a read that this process cannot make now, of a checkpoint that may be sound.
CANNOT_READ_NOW = ('PERMISSION_DENIED:', 'RESOURCE_EXHAUSTED:')


def _root_cause(error: BaseException) -> BaseException:
  """The innermost error that `error` was raised from (`raise ... from`).

  Orbax wraps TensorStore's error, which names the array and what is wrong with it ('OUT_OF_RANGE: Error reading
  "params.fc1.kernel/0.0" ...' or 'PERMISSION_DENIED: ...'), in one whose first line names a slice and then starts
  a 60-line repr of the array's spec.
  """
  seen = {id(error)}
  while error.__cause__ is not None and id(error.__cause__) not in seen:
    error = error.__cause__
    seen.add(id(error))
  return error


CONFIG_NAME = re.compile(r'config(?:_step(\d+)(?:_(\d+))?)?\.json')


def _saved_order(path: str) -> tuple[int, int]:
  """(the step its run started from, i) of config.json (0, 0) or config_step<N>[_<i>].json (N, i or 1)."""
  step, index = CONFIG_NAME.fullmatch(os.path.basename(path)).groups()
  return (0, 0) if step is None else (int(step), int(index or 1))


def saved_configs(workdir: str) -> list[str]:
  """Paths of the configs the runs in workdir saved, the latest last: config.json, then config_step<N>[_<i>].json
  by N (the step the run started from) and i."""
  names = [name for name in os.listdir(workdir) if CONFIG_NAME.fullmatch(name)] if os.path.isdir(workdir) else []
  return sorted((os.path.join(workdir, name) for name in names), key=_saved_order)


def _tuples(value):
  """JSON turns the config's tuples (input_shape, conv_features, ...) into lists; the model needs them back."""
  if isinstance(value, dict):
    return {key: _tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(item) for item in value)
  return value


def load_config(workdir: str, checkpoint_step: int | None = None) -> ml_collections.ConfigDict | None:
  """The config of the latest run in workdir (the last one saved), or None when there is none.

  With `checkpoint_step`, the config of the run that made that checkpoint: the latest that started before it (a
  later run may have saved its config and stopped before its first checkpoint).
  """
  saved = [
    path for path in saved_configs(workdir) if checkpoint_step is None or _saved_order(path)[0] < checkpoint_step
  ]
  if not saved:
    return None
  with open(saved[-1]) as f:
    try:
      return ml_collections.ConfigDict(_tuples(json.load(f)))
    except ValueError as error:  # json's JSONDecodeError is one.
      raise ValueError(
        f'{saved[-1]} cannot be read as a saved config ({error}); it was left untouched. Repair it: visualize.py '
        "needs it to know the run's model. (Moved out of the workdir, it lets train.py resume, without comparing the "
        'config with the run that made the checkpoint.)'
      ) from error


def save_config(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Saves the config of a run starting at `step`: config.json for a workdir's first run, and
  config_step<N>[_<i>].json for a later run whose config differs from the last one saved.

  Overwrites none, so every change of config is on record and the last file is the config of the latest run. The
  configs of runs that started after `step` (their checkpoints deleted, or set aside as corrupt) would be taken for
  this run's: they are moved to workdir/superseded_configs/. In a multi-host run only process 0 writes.
  """
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  saved = set_aside_configs_after(workdir, step)
  if saved:
    with open(saved[-1]) as f:
      if f.read() == text:
        return
  if step == 0 and not saved:  # config.json is the first run's alone: it sorts before every config_step<N>.json.
    path = os.path.join(workdir, 'config.json')
  else:
    path = unused_path(os.path.join(workdir, f'config_step{step}'), '.json')
  if saved:
    logging.warning('The config differs from %s; saving this one as %s.', saved[-1], path)
  _write_atomically(path, text.encode())


def set_aside_configs_after(workdir: str, step: int) -> list[str]:
  """Moves the configs of runs that started after `step` to workdir/superseded_configs/ (in a multi-host run, only
  process 0); returns the saved configs left (`saved_configs`).

  A run starting at `step` means their checkpoints are gone (deleted, or set aside as corrupt): left in place, the
  last of them would be taken for the config of the latest run.
  """
  saved = saved_configs(workdir)
  while jax.process_index() == 0 and saved and _saved_order(saved[-1])[0] > step:
    superseded = saved.pop()
    stem, suffix = os.path.splitext(os.path.basename(superseded))
    destination = unused_path(os.path.join(workdir, 'superseded_configs', stem), suffix)
    logging.warning(
      'Moving %s to %s: its run started at step %d, after this run\'s start at step %d, and its checkpoints are gone.',
      superseded, destination, _saved_order(superseded)[0], step,
    )  # fmt: skip
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.replace(superseded, destination)
  return saved


def _write_atomically(path: str, data: bytes) -> None:
  """Whole or not at all: a run killed mid-write leaves the file as it was, not half-written."""
  with open(f'{path}.tmp', 'wb') as f:
    f.write(data)
  os.replace(f'{path}.tmp', path)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of workdir/metrics.jsonl in the order written ([] when there is none).

  A resumed run appends its rows, having moved the earlier run's rows after its start to superseded_metrics.jsonl
  (`MetricWriter`), so that each row of a step appears once. A partial line, left by a run killed mid-write, is skipped.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    return [row for row in map(_row, f) if row is not None]


def _row(line: bytes) -> dict | None:
  """A metrics line's row, or None for a line that is none (a partial line, or bytes that are not UTF-8 text)."""
  try:
    row = json.loads(line)
  except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    return None
  return row if isinstance(row, dict) and type(row.get('step')) is int else None


def _move_rows_after(step: int, path: str, superseded_path: str) -> None:
  """Moves the lines of the JSON-lines file `path` whose row has a step after `step`, or that are no row, to the end
  of `superseded_path`, keeping the others in `path` in their order, and ends `path` with a newline."""
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    lines = f.readlines()
  if not lines:
    return
  kept, moved, unreadable = [], [], 0
  for line in lines:
    row = _row(line)
    unreadable += row is None
    (kept if row is not None and row['step'] <= step else moved).append(line.rstrip(b'\n') + b'\n')
  if moved:
    logging.warning(
      'Moving %d row(s) of %s that an earlier run logged after step %d, where this run starts, and %d line(s) that '
      'hold no row, to %s.',
      len(moved) - unreadable, path, step, unreadable, superseded_path,
    )  # fmt: skip
    # Appended first: a run killed before metrics.jsonl is rewritten loses no row (its rerun appends them again).
    with open(superseded_path, 'ab+') as f:
      end = f.seek(0, os.SEEK_END)
      if end:
        f.seek(end - 1)
        if f.read(1) != b'\n':  # An append cut short: these start on a line of their own.
          f.write(b'\n')
      f.writelines(moved)
  if moved or not lines[-1].endswith(b'\n'):  # A row ended without its newline would be joined to the next.
    _write_atomically(path, b''.join(kept))


class MetricWriter:
  """Writes scalars as JSON lines to workdir/metrics.jsonl (appending on resume) and to TensorBoard.

  A sweep of K models writes one row per model, with a "model" field, and a TensorBoard run per model
  (workdir/model_<k>). In a multi-host run only process 0 writes. A run that starts from `start_step` (a checkpoint's)
  logs again the steps an earlier run logged after that checkpoint: TensorBoard then shows this run's, and hides the
  earlier run's from start_step + 1 on. metrics.jsonl does the same: the earlier run's rows after start_step, and any
  line that holds no row (a partial one, left by a run killed mid-write), are moved to superseded_metrics.jsonl as
  they were (each ended with a newline) before this run writes.
  """

  def __init__(self, workdir: str, num_models: int, start_step: int):
    self._writes = jax.process_index() == 0
    if not self._writes:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    _move_rows_after(start_step, path, os.path.join(workdir, 'superseded_metrics.jsonl'))
    self._jsonl = open(path, 'a')
    self._logdirs = [workdir] if num_models == 1 else [os.path.join(workdir, f'model_{k}') for k in range(num_models)]
    self._tensorboards = []  # Opened at the first write: a run that writes nothing adds no event file.
    self._purge_step = start_step + 1  # For the run's first event files alone.

  def write(self, step: int, split: str, scalars: dict[str, np.ndarray]) -> None:
    """Scalars of shape [] (one model) or [K] (a sweep)."""
    if not self._writes:
      return
    if not self._tensorboards:
      # tensorboardX names a file by the second it opens it, and would truncate an earlier one of the same name;
      # TensorBoard reads a directory's event files in the order of their names, so the suffix is the time too.
      suffix = f'.{time.time_ns()}'
      self._tensorboards = [
        tensorboardX.SummaryWriter(logdir, purge_step=self._purge_step, filename_suffix=suffix)
        for logdir in self._logdirs
      ]
      self._purge_step = None
    sweep = len(self._logdirs) > 1
    for k, tensorboard in enumerate(self._tensorboards):
      values = {name: float(np.reshape(value, -1)[k]) for name, value in scalars.items()}
      self._jsonl.write(json.dumps({'step': step, 'split': split, **({'model': k} if sweep else {}), **values}) + '\n')
      for name, value in values.items():
        tensorboard.add_scalar(f'{split}/{name}', value, step)
    self._jsonl.flush()

  def sync(self) -> None:
    """Puts every scalar written so far on disk, as a checkpoint is saved, so that a run killed later has them all
    up to its checkpoint. metrics.jsonl is flushed at each write, but a TensorBoard writer keeps its events in a
    queue until it closes (its flush() leaves the queue), so the writers close here; the next write opens new files.
    """
    if not self._writes:
      return
    for tensorboard in self._tensorboards:
      tensorboard.close()
    self._tensorboards = []

  def close(self) -> None:
    self.sync()
    if self._writes:
      self._jsonl.close()
