"""The experiment runner on the real embedded digits: learning, exact resume, refusals and logs."""

import functools
import glob
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from tensorboard.backend.event_processing import event_accumulator

import input_pipeline
import model
import reference
import train
import workdir as workdir_lib
from configs import default, wide

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two epochs of the 4,000 embedded training digits at batch 64: 124 steps.
SHORT_RUN = {'num_epochs': 2, 'log_every_steps': 20, 'eval_every_steps': 62, 'checkpoint_every_steps': 31}


def short_config(**overrides):
  config = default.get_config()
  config.update({**SHORT_RUN, **overrides})
  return config


# 4,000 digits at batch 500: 8 steps an epoch, 16 in all (a run of seconds).
def tiny_config(**overrides):
  return short_config(batch_size=500, **overrides)


def file_digests(directory):
  """{path under `directory`: sha256 of its bytes} of every file: what a refused run must leave as it was."""
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        digests[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def assert_trees_bitwise_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
  """One short training run on the default config, shared by the tests that only read its outputs."""
  workdir = str(tmp_path_factory.mktemp('short_run'))
  state, metrics = train.train_and_evaluate(short_config(), workdir)
  return workdir, state, metrics


def test_learns_the_real_digits(short_run):
  _, _, metrics = short_run
  # 124 steps reach 0.915 on the 1,000 held-out digits (seed 0, measured); chance is 0.10.
  assert metrics['test_accuracy'] >= 0.85


def test_the_final_metrics_are_over_every_test_digit(short_run):
  _, state, metrics = short_run
  # One batch of all 1,000 digits, where the run evaluated in batches of config.eval_batch_size (512 and 488).
  eval_fn = jax.jit(functools.partial(train.eval_step, apply_fn=state.apply_fn))
  whole = train.evaluate(eval_fn, state.params, input_pipeline.load_split(short_config(), 'test'), 1000)
  assert short_config().eval_batch_size < 1000
  assert metrics['test_accuracy'] == whole['accuracy']
  assert metrics['test_loss'] == pytest.approx(whole['loss'], rel=1e-5)


def test_same_seed_gives_identical_metrics_and_params(short_run, tmp_path):
  workdir, state, _ = short_run
  again, _ = train.train_and_evaluate(short_config(), str(tmp_path))
  assert workdir_lib.read_metrics(str(tmp_path)) == workdir_lib.read_metrics(workdir)
  assert_trees_bitwise_equal(again.params, state.params)


def test_validation_size_evaluates_on_the_held_out_tail_instead_of_test(tmp_path):
  config = short_config(num_epochs=1, validation_size=500, eval_every_steps=0)
  state, metrics = train.train_and_evaluate(config, str(tmp_path))
  assert set(metrics) == {'validation_loss', 'validation_accuracy'}
  eval_fn = jax.jit(functools.partial(train.eval_step, apply_fn=state.apply_fn))
  recomputed = train.evaluate(eval_fn, state.params, input_pipeline.load_split(config, 'validation'), 500)
  np.testing.assert_allclose(metrics['validation_accuracy'], recomputed['accuracy'])
  np.testing.assert_allclose(metrics['validation_loss'], recomputed['loss'], rtol=1e-5)
  assert [(r['step'], r['split']) for r in workdir_lib.read_metrics(str(tmp_path)) if r['split'] != 'train'] == [
    (54, 'validation')
  ]
  assert metrics['validation_accuracy'] >= 0.7  # 0.846 measured after 54 steps on the other 3,500; chance is 0.10.


def test_a_finished_run_given_changed_settings_is_only_evaluated_and_keeps_its_config(short_run, caplog):
  workdir, state, metrics = short_run
  listing = sorted(os.listdir(workdir))
  with caplog.at_level('WARNING'):
    again, again_metrics = train.train_and_evaluate(short_config(learning_rate=0.01), workdir)
  assert re.search(
    r'finished at step 124, so it is only evaluated.*config\.learning_rate=0\.01 \(that run: 0\.003\) train nothing\. '
    r'Raise config\.num_epochs',
    caplog.text,
  )
  # No config_step124.json: the saved config would claim parameters trained at 0.01.
  assert sorted(os.listdir(workdir)) == listing
  assert workdir_lib.load_config(workdir).learning_rate == 0.003
  assert_trees_bitwise_equal(again.params, state.params)
  assert again_metrics == metrics


def test_a_finished_run_sets_aside_a_later_runs_config_and_records_one_where_none_was_saved(
  short_run, tmp_path, caplog
):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  # A 3-epoch run from step 124 saved its config; its checkpoints were deleted.
  workdir_lib.save_config(short_config(num_epochs=3), workdir, 124)
  workdir_lib.save_config(short_config(num_epochs=3, learning_rate=0.01), workdir, 150)
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(short_config(), workdir)
  assert 'finished at step' not in caplog.text  # Compared with the config that trained it, not a later one.
  assert os.listdir(os.path.join(workdir, 'superseded_configs')) == ['config_step150.json']
  assert workdir_lib.load_config(workdir).num_epochs == 3  # Its run started at 124, where this one is.
  for name in workdir_lib.saved_configs(workdir):
    os.remove(name)
  train.train_and_evaluate(short_config(), workdir)  # Nothing records the run: this config is all there is.
  assert [os.path.basename(name) for name in workdir_lib.saved_configs(workdir)] == ['config_step124.json']


def test_metrics_jsonl_and_tensorboard_agree(short_run):
  workdir, _, metrics = short_run
  rows = workdir_lib.read_metrics(workdir)
  train_rows = [r for r in rows if r['split'] == 'train']
  test_rows = [r for r in rows if r['split'] == 'test']
  assert [r['step'] for r in train_rows] == [20, 40, 60, 80, 100, 120, 124]
  assert [r['step'] for r in test_rows] == [62, 124]
  assert test_rows[-1]['accuracy'] == metrics['test_accuracy']

  events = event_accumulator.EventAccumulator(workdir)
  events.Reload()
  assert set(events.Tags()['scalars']) == {'train/loss', 'train/accuracy', 'test/loss', 'test/accuracy'}
  for split, split_rows in (('train', train_rows), ('test', test_rows)):
    for name in ('loss', 'accuracy'):
      logged = [(e.step, e.value) for e in events.Scalars(f'{split}/{name}')]
      expected = [(r['step'], r[name]) for r in split_rows]
      assert [s for s, _ in logged] == [s for s, _ in expected]
      np.testing.assert_allclose([v for _, v in logged], [v for _, v in expected], rtol=1e-6)


def test_checkpoints_and_config_are_saved(short_run):
  workdir, state, _ = short_run
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['124', '62', '93']  # max_to_keep=3
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_epochs'] == 2
  params, step = train.load_params(short_config(), workdir)
  assert step == 124
  assert_trees_bitwise_equal(params, state.params)


def test_finished_run_is_not_retrained(short_run, caplog, monkeypatch):
  workdir, state, metrics = short_run
  before = file_digests(os.path.join(workdir, 'checkpoints'))
  listing = sorted(os.listdir(workdir))
  rows = workdir_lib.read_metrics(workdir)
  jit, jitted = train.jit_with_xla_options, []
  monkeypatch.setattr(
    train, 'jit_with_xla_options', lambda fun, **kwargs: jitted.append(fun.__name__) or jit(fun, **kwargs)
  )
  evaluate, evaluated_by = train.evaluate, []
  monkeypatch.setattr(train, 'evaluate', lambda fn, *args: evaluated_by.append(fn) or evaluate(fn, *args))
  with caplog.at_level('INFO'):
    again, again_metrics = train.train_and_evaluate(short_config(), workdir)
  assert 'learning-rate schedule' not in caplog.text
  assert jitted == ['eval_step_on_batch']  # Nothing is left to train: only the evaluation is compiled, ...
  assert [type(fn) for fn in evaluated_by] == [jax.stages.Compiled]  # ... before its time is counted.
  # The setup (reading the data and the checkpoint) takes time.
  setup = re.search(
    r'Time: setup ([\d.]+) s \(data, initial state, checkpoint\), compile [\d.]+ s, train 0\.0 s', caplog.text
  )
  assert float(setup[1]) > 0
  assert file_digests(os.path.join(workdir, 'checkpoints')) == before
  assert workdir_lib.read_metrics(workdir) == rows  # Evaluated again, but no step retrained and no metrics row written.
  assert sorted(os.listdir(workdir)) == listing  # Not even an empty TensorBoard event file.
  assert_trees_bitwise_equal(again.params, state.params)
  assert again_metrics == metrics


def test_a_run_killed_after_its_last_checkpoint_writes_its_final_row_when_run_again(short_run, tmp_path):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  rows = workdir_lib.read_metrics(workdir)
  assert rows[-1]['split'] == 'test' and rows[-1]['step'] == 124
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:  # As if killed during the final evaluation.
    f.writelines(json.dumps(row) + '\n' for row in rows[:-1])
  train.train_and_evaluate(short_config(), workdir)
  assert workdir_lib.read_metrics(workdir) == rows


@pytest.mark.parametrize('latest', [124, 93])
def test_resuming_past_num_epochs_is_refused(short_run, tmp_path, latest, image_reads):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  if latest == 93:  # Mid-epoch: 1.5 epochs of 62 steps, so the least num_epochs is rounded up.
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '124'))
  before = file_digests(workdir)
  # One epoch of 62 steps would end before the checkpoint and return its state as if it had.
  message = rf'at step {latest}, past the 62 steps of config\.num_epochs=1; set config\.num_epochs >= 2 '
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(short_config(num_epochs=1), workdir)
  assert file_digests(workdir) == before  # No config saved, no metrics written, no checkpoint moved.
  assert image_reads == []  # Refused on the checkpoints' list and the split's size alone.


def wide_config():
  config = wide.get_config()
  config.update(SHORT_RUN)
  return config


@pytest.mark.parametrize(
  'make_config, message',
  [
    (wide_config, r'belongs to a different model:\n.*conv1/kernel: checkpoint \(5, 5, 1, 3\), config \(5, 5, 1, 12\)'),
    # Clipping adds a stage to the optimiser chain: the adam moments move to another place in its state.
    (lambda: short_config(grad_clip_norm=1.0), r'optimiser state of other settings .*:\n  opt_state/inner_state/0/'),
    (lambda: short_config(num_models=2), r'holds 1 model\(s\) side by side, not config.num_models=2 .*num_models=1 '),
    # The advice leaves out the learning rates, which check_config would refuse for a single model.
    (
      lambda: short_config(num_models=3, learning_rates=(0.1, 0.2, 0.3)),
      r'not config.num_models=3 \(set --config.num_models=1 with no config.learning_rates to resume it\)',
    ),
  ],
  ids=['model', 'optimiser', 'sweep', 'sweep_with_learning_rates'],
)
@pytest.mark.parametrize('latest_readable', [True, False], ids=['latest_readable', 'latest_unreadable'])
def test_incompatible_checkpoint_is_refused_and_kept(
  short_run, tmp_path, make_config, message, latest_readable, image_reads
):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  for path in glob.glob(os.path.join(workdir, 'config*.json')):
    os.remove(path)  # The checkpoint's own structure is checked, without the saved config's settings to compare.
  if not latest_readable:  # Refused by the one before it, before the unreadable one could be set aside.
    truncate_every_file(os.path.join(workdir, 'checkpoints', '124'))
  before = file_digests(workdir)
  refusing_step = 124 if latest_readable else 93
  advice = 'Train this config in a new --workdir, or read these checkpoints with the config their run saved'
  with pytest.raises(ValueError, match=f'(?s)checkpoint at step {refusing_step} in .* {message}.*{advice}'):
    train.train_and_evaluate(make_config(), workdir)
  assert file_digests(workdir) == before
  assert image_reads == []  # Found from the checkpoints' metadata.


@pytest.mark.parametrize('setting, value', [('batch_size', 32), ('validation_size', 500), ('seed', 1)])
def test_resuming_with_other_batches_is_refused(short_run, tmp_path, setting, value, image_reads):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  before = file_digests(workdir)
  message = rf'step 124 .* config\.{setting}={value} \(that run: {short_config()[setting]}\).*Set them back'
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(short_config(**{setting: value}), workdir)
  assert file_digests(workdir) == before  # No config saved, no metrics written, no checkpoint moved.
  assert image_reads == []


def test_resuming_on_another_dataset_is_refused():
  # The check train_and_evaluate makes before restoring (a whole run on mnist would need the network).
  message = r"step 124 in /run .* config\.dataset='mnist' \(that run: 'embedded_mnist'\)\. Set them back"
  with pytest.raises(ValueError, match=message):
    train._check_resumable(short_config(dataset='mnist'), short_config(), '/run', 124)


def test_resuming_with_a_model_of_the_same_shapes_is_refused(short_run, tmp_path, image_reads):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  before = file_digests(workdir)
  config = short_config()
  config.model.flatten_order = 'chw'  # The same parameter shapes, another function of them.
  with pytest.raises(
    ValueError, match=r"model of the run .* config\.model\.flatten_order='chw' \(that run: 'hwc'\)\. Set"
  ):
    train.train_and_evaluate(config, workdir)
  assert file_digests(workdir) == before  # No config saved, no metrics written, no checkpoint moved.
  assert image_reads == []


def test_settings_a_saved_config_lacks_are_not_counted_as_changed():
  # A config saved by older code, before train_mode and model.flatten_seed existed, is compared on what it has.
  previous = short_config()
  del previous['train_mode'], previous.model['flatten_seed']
  previous.model.pool = 'avg'
  changed = train._changed_settings(short_config(), previous, ('train_mode', 'model'))
  assert changed == [('model.pool', 'max', 'avg')]


def test_resuming_with_other_batches_is_refused_before_a_corrupt_checkpoint_is_set_aside(short_run, tmp_path):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  truncate_every_file(os.path.join(workdir, 'checkpoints', '124'))
  before = file_digests(workdir)
  with pytest.raises(ValueError, match=r'step 124 .* config\.seed=1 .* nothing was changed'):
    train.train_and_evaluate(short_config(seed=1), workdir)
  assert file_digests(workdir) == before


def train_on_a_clock_of_slow_evaluations(config, workdir, monkeypatch, caplog, full_seconds, one_batch_seconds):
  """Trains `config` where, on train.py's clock, a full evaluation takes `full_seconds` and a one-batch one (before
  a checkpoint) `one_batch_seconds`; training takes its real, far shorter time. Returns the log."""
  clock = {'offset': 0.0}
  monkeypatch.setattr(train, 'time', types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock['offset']))
  evaluate = train.evaluate

  def slow_evaluate(eval_fn, params, data, batch_size, num_batches=None):
    clock['offset'] += full_seconds if num_batches is None else one_batch_seconds
    return evaluate(eval_fn, params, data, batch_size, num_batches)

  monkeypatch.setattr(train, 'evaluate', slow_evaluate)
  with caplog.at_level('INFO'):
    train.train_and_evaluate(config, workdir)
  return caplog.text


def test_progress_line_counts_training_speed_without_evaluation_and_its_eta_adds_the_evaluations_to_come(
  tmp_path, monkeypatch, caplog
):
  config = tiny_config(log_every_steps=4, eval_every_steps=8)
  log = train_on_a_clock_of_slow_evaluations(config, str(tmp_path), monkeypatch, caplog, 1000, 1000)
  progress = re.findall(r'step (\d+)/16 .* ([\d.]+) steps/s \d+ images/s  ETA (\d+) s', log)
  assert [int(step) for step, _, _ in progress] == [4, 8, 12, 16]
  # The interval 8-12 holds the evaluation after step 8, 1000 s, which its training speed leaves out.
  assert all(float(steps_per_second) > 1 for _, steps_per_second, _ in progress)
  # Evaluated after step 8 and at the end: the ETA adds those still to come once one has been timed (1000 s each),
  # none before.
  etas = [int(eta) for _, _, eta in progress]
  assert etas[0] < 1000 and etas[1] < 1000
  assert 1000 <= etas[2] < 2000 and 1000 <= etas[3] < 2000
  # Evaluations after steps 8 and 16 (one batch, before the checkpoint) and the final one.
  times = re.search(r'train ([\d.]+) s \(with logging and checkpoints\), eval ([\d.]+) s', log)
  assert float(times[1]) < 1000
  assert float(times[2]) >= 3000


def test_the_eta_counts_the_evaluations_due_between_progress_lines(tmp_path, monkeypatch, caplog):
  # Logged every 3 steps, evaluated every 5 (1000 s each, timed from step 5's on) and at the end: at step 6 those after
  # steps 10 and 15 and the final one are to come; at step 15, its own and the final one.
  config = tiny_config(log_every_steps=3, eval_every_steps=5)
  log = train_on_a_clock_of_slow_evaluations(config, str(tmp_path), monkeypatch, caplog, 1000, 0)
  progress = re.findall(r'step (\d+)/16 .* ETA (\d+) s', log)
  assert [(int(step), int(eta) // 1000) for step, eta in progress] == [
    (3, 0),
    (6, 3),
    (9, 3),
    (12, 2),
    (15, 2),
    (16, 1),
  ]


def test_the_progress_line_counts_every_model_and_the_evaluation_due_at_its_step(tmp_path, monkeypatch, caplog):
  # Full evaluations take 1000 s; the one-batch ones before checkpoints take no time to speak of.
  config = tiny_config(num_models=2, log_every_steps=4, eval_every_steps=4, checkpoint_every_steps=2)
  log = train_on_a_clock_of_slow_evaluations(config, str(tmp_path), monkeypatch, caplog, 1000, 0)
  progress = re.findall(r'step (\d+)/16 epoch (\d+) .* ([\d.]+) steps/s (\d+) images/s  ETA (\d+) s', log)
  assert [(int(step), int(epoch)) for step, epoch, *_ in progress] == [(4, 1), (8, 1), (12, 2), (16, 2)]
  for _, _, steps_per_second, images_per_second, _ in progress:  # Images of both models: 2 x 500 a step.
    # Steps/s is printed to 0.1 and images/s to 1, each rounded from the same speed.
    assert abs(int(images_per_second) - float(steps_per_second) * 1000) <= 0.05 * 1000 + 0.5
  # After step 8: its own evaluation, step 12's and the final one, at the 1000 s of step 4's (the one-batch
  # evaluations at steps 6 and 10 are not what a full one costs).
  assert [int(eta) // 1000 for *_, eta in progress] == [0, 3, 2, 1]


def test_an_evaluation_split_that_cannot_be_read_is_refused_before_the_workdir_is_made(tmp_path, monkeypatch):
  open_split = input_pipeline._open

  def open_unprepared_test_split(config, split):
    if split == 'test':
      raise ValueError('the test split is not prepared')
    return open_split(config, split)

  monkeypatch.setattr(input_pipeline, '_open', open_unprepared_test_split)
  with pytest.raises(ValueError, match='the test split is not prepared'):
    train.train_and_evaluate(short_config(), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_resumed_run_takes_the_learning_rate_of_its_config(short_run, tmp_path, caplog):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  state, _ = train.train_and_evaluate(short_config(num_epochs=3, learning_rate=1e-4), workdir)
  assert state.step == 186
  # The cosine schedule now ends at step 186, so at step 124 it is back at (1 + cos(2pi/3)) / 2 of its peak.
  assert (
    'Resuming at step 124 with config.num_epochs=3 (that run: 2) moves the learning-rate schedule: at this step it '
    'is 25.0% of the peak, where that run had 0.0%.'
  ) in caplog.text
  assert state.opt_state.hyperparams['learning_rate'] == np.float32(1e-4)
  with open(os.path.join(workdir, 'config_step124.json')) as f:
    assert json.load(f)['learning_rate'] == 1e-4


def test_the_schedule_is_compared_with_the_run_that_made_the_checkpoint(short_run, tmp_path, caplog):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  # A 3-epoch run resumed from step 124, saved its config and stopped before its first checkpoint.
  workdir_lib.save_config(short_config(num_epochs=3), workdir, 124)
  state, _ = train.train_and_evaluate(short_config(), workdir)  # As the run that made checkpoint 124.
  assert state.step == 124
  assert 'learning-rate schedule' not in caplog.text


@pytest.mark.parametrize('schedule, moves', [('constant', False), ('cosine', True), ('warmup_cosine', True)])
def test_a_longer_run_moves_the_schedule_unless_it_is_constant(schedule, moves, caplog):
  that_run = short_config(schedule=schedule, warmup_epochs=1.0)
  train._warn_if_the_schedule_moves(short_config(schedule=schedule, warmup_epochs=1.0, num_epochs=3), that_run, 62, 124)
  assert ('moves the learning-rate schedule' in caplog.text) == moves


@pytest.mark.parametrize(
  'change, described',
  [
    ({'warmup_epochs': 1.5}, r'config\.warmup_epochs=1\.5 \(that run: 1\.0\)'),  # Still warming up at step 70.
    ({'schedule': 'cosine', 'warmup_epochs': 0.0}, r"config\.schedule='cosine' \(that run: 'warmup_cosine'\)"),
  ],
  ids=['warmup_epochs', 'schedule'],
)
def test_a_resume_with_another_warmup_or_schedule_is_said_to_move_the_schedule(change, described, caplog):
  that_run = short_config(schedule='warmup_cosine', warmup_epochs=1.0)
  train._warn_if_the_schedule_moves(short_config(**{**that_run, **change}), that_run, 62, 70)
  assert re.search(rf'Resuming at step 70 with {described}.* moves the learning-rate schedule', caplog.text)


def truncate_every_file(checkpoint):
  for root, _, files in os.walk(checkpoint):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(os.path.getsize(os.path.join(root, name)) // 2, 1))


@pytest.mark.parametrize(
  'corrupt, cause',
  [
    (truncate_every_file, r'JSONDecodeError: .*'),
    (lambda checkpoint: os.remove(os.path.join(checkpoint, 'default', '_METADATA')), r'ValueError: .* no arrays .*'),
  ],
  ids=['truncated', 'metadata_removed'],  # Orbax reads a missing _METADATA as an empty tree, not another model's.
)
def test_corrupt_latest_checkpoint_is_set_aside_and_the_previous_used(
  short_run, tmp_path, corrupt, cause, caplog, tensorboard_scalars
):
  workdir, state, _ = short_run
  workdir = shutil.copytree(workdir, str(tmp_path / 'run'))
  corrupt(os.path.join(workdir, 'checkpoints', '124'))
  rows = workdir_lib.read_metrics(workdir)
  with caplog.at_level('ERROR'):
    resumed, _ = train.train_and_evaluate(short_config(), workdir)
  assert re.search(
    rf'Checkpoint 124 cannot be read \({cause}\); moving it to .*corrupt_checkpoints/124 and resuming from '
    r'checkpoint 93\.',
    caplog.text,
  )
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '124'))  # Moved, not deleted.
  assert_trees_bitwise_equal(resumed.params, state.params)  # Steps 94..124 were retrained exactly.
  # The first run's rows after step 93 were moved aside, and the resumed run logged the same steps again (the train
  # row at 100 averaging steps 94..100 alone): metrics.jsonl and TensorBoard show each step once.
  resumed_rows = workdir_lib.read_metrics(workdir)
  assert [(r['step'], r['split']) for r in resumed_rows] == [(r['step'], r['split']) for r in rows]
  assert resumed_rows[:5] == rows[:5] and resumed_rows[-1] == rows[-1]  # Up to step 93, and the final evaluation.
  with open(os.path.join(workdir, 'superseded_metrics.jsonl')) as f:
    assert [(r['step'], r['split']) for r in map(json.loads, f)] == [
      (100, 'train'),
      (120, 'train'),
      (124, 'train'),
      (124, 'test'),
    ]
  assert [step for step, _ in tensorboard_scalars(workdir, 'train/loss')] == [20, 40, 60, 80, 100, 120, 124]
  assert [step for step, _ in tensorboard_scalars(workdir, 'test/accuracy')] == [62, 124]


def test_a_run_resumed_before_a_corrupt_checkpoint_records_its_config_and_checkpoints_again(tmp_path):
  train.train_and_evaluate(tiny_config(checkpoint_every_steps=5), str(tmp_path))  # Checkpoints 10, 15 and 16.
  truncate_every_file(str(tmp_path / 'checkpoints' / '16'))
  resumed, _ = train.train_and_evaluate(tiny_config(checkpoint_every_steps=5, learning_rate=1e-3), str(tmp_path))
  assert os.path.exists(tmp_path / 'config_step15.json')  # It resumed at step 15, with another learning rate,
  assert workdir_lib.load_config(str(tmp_path), 16).learning_rate == 1e-3  # which made the new checkpoint 16.
  params, step = train.load_params(tiny_config(), str(tmp_path))
  assert step == 16
  assert_trees_bitwise_equal(params, resumed.params)
  truncate_every_file(str(tmp_path / 'checkpoints' / '16'))  # The new 16 is set aside beside the first.
  train.train_and_evaluate(tiny_config(checkpoint_every_steps=5, learning_rate=1e-3), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'corrupt_checkpoints')) == ['16', '16_2']


def test_a_run_restarting_from_scratch_after_its_only_checkpoint_was_set_aside_moves_the_later_config_aside(
  tmp_path, caplog
):
  train.train_and_evaluate(tiny_config(num_epochs=1, max_checkpoints_to_keep=1), str(tmp_path))  # Checkpoint 8.
  # Resumed at 8 with another learning rate (config_step8.json): checkpoint 16 replaces 8.
  resumed = tiny_config(max_checkpoints_to_keep=1, learning_rate=1e-3)
  train.train_and_evaluate(resumed, str(tmp_path))
  truncate_every_file(str(tmp_path / 'checkpoints' / '16'))
  with pytest.raises(
    RuntimeError, match=r'checkpoint at step 16 .* cannot be read .*\. There is no older checkpoint\.'
  ):
    train.load_params(resumed, str(tmp_path))
  with caplog.at_level('ERROR'):
    state, _ = train.train_and_evaluate(resumed, str(tmp_path))  # 16 set aside, none left: a new run from 0.
  assert 'corrupt_checkpoints/16 and starting again from step 0: there is no older one.' in caplog.text
  assert os.listdir(tmp_path / 'corrupt_checkpoints') == ['16']
  assert os.listdir(tmp_path / 'superseded_configs') == ['config_step8.json']
  assert workdir_lib.load_config(str(tmp_path), 16).learning_rate == 1e-3  # This run's, saved as config_step0.json.
  assert sorted(name for name in os.listdir(tmp_path) if name.startswith('config')) == [
    'config.json',
    'config_step0.json',
  ]
  params, step = train.load_params(resumed, str(tmp_path))
  assert step == 16
  assert_trees_bitwise_equal(params, state.params)


def raising(error):
  """A restore that fails with `error`."""

  def failing_restore(manager, step, args):
    raise error(f'cannot restore checkpoint {step} now')

  return failing_restore


def read_by_orbax(status):
  """A restore that fails as orbax 0.12 reports TensorStore's `status` for an array: in its own error, whose first
  line names a slice and then starts a 60-line repr of the array's spec, raised from TensorStore's, which names the
  array and what is wrong with it."""

  def failing_restore(manager, step, args):
    raise Exception(
      'Encountered error while reading array index: (slice(0, 150, 1), slice(0, 100, 1)). See full TensorStore '
      "details: <bound method spec of TensorStore({\n  'base': {\n    'driver': 'zarr',\n  },\n})>."
    ) from ValueError(f'{status}: Error reading "params.fc1.kernel/0.0" in OCDBT database at local file "/w/{step}/"')

  return failing_restore


@pytest.mark.parametrize(
  'failing_restore, error, message',
  [
    (raising(MemoryError), MemoryError, 'cannot restore checkpoint 124 now'),
    (raising(PermissionError), PermissionError, 'cannot restore checkpoint 124 now'),
    # As TensorStore reports them: a file this process may not open, or memory it lacks.
    (read_by_orbax('PERMISSION_DENIED'), RuntimeError, r'124 .* by this process \(ValueError: PERMISSION_DENIED: '),
    (read_by_orbax('RESOURCE_EXHAUSTED'), RuntimeError, r'124 .* by this process \(ValueError: RESOURCE_EXHAUSTED: '),
  ],
  ids=['MemoryError', 'PermissionError', 'tensorstore_permission_denied', 'tensorstore_resource_exhausted'],
)
def test_a_checkpoint_that_fails_to_restore_for_want_of_memory_or_permission_is_not_set_aside(
  short_run, tmp_path, monkeypatch, failing_restore, error, message
):
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  checkpoints = file_digests(os.path.join(workdir, 'checkpoints'))
  monkeypatch.setattr(workdir_lib.ocp.CheckpointManager, 'restore', failing_restore)
  with pytest.raises(error, match=message):
    train.train_and_evaluate(short_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, 'corrupt_checkpoints'))
  assert file_digests(os.path.join(workdir, 'checkpoints')) == checkpoints  # The sound checkpoint 124 stays.


def test_a_checkpoint_that_fails_to_restore_with_an_io_error_is_unreadable(short_run, monkeypatch):
  def failing_restore(manager, step, args):
    raise OSError(5, 'Input/output error')

  monkeypatch.setattr(workdir_lib.ocp.CheckpointManager, 'restore', failing_restore)
  with pytest.raises(RuntimeError, match=r'checkpoint at step 124 .* cannot be read \(OSError.*Older checkpoints'):
    train.load_params(short_config(), short_run[0])


def test_an_unreadable_checkpoint_is_reported_by_the_error_at_the_root_of_its_chain(short_run, monkeypatch):
  # An array whose bytes are damaged, the metadata reading fine. (A real one fails so too, but orbax leaves the
  # restore's other reads to report their errors as they finish and are collected: into later tests.)
  monkeypatch.setattr(workdir_lib.ocp.CheckpointManager, 'restore', read_by_orbax('OUT_OF_RANGE'))
  cause = (
    r'ValueError: OUT_OF_RANGE: Error reading "params\.fc1\.kernel/0\.0" in OCDBT database at local file "/w/124/"'
  )
  with pytest.raises(RuntimeError, match=rf'checkpoint at step 124 .* cannot be read \({cause}\)\. Older'):
    train.load_params(short_config(), short_run[0])


def test_reading_checkpoints_of_another_model_behind_an_unreadable_one_names_the_model(short_run, tmp_path):
  # Not advice to resume from checkpoint 93, which holds another model's arrays.
  workdir = shutil.copytree(short_run[0], str(tmp_path / 'run'))
  truncate_every_file(os.path.join(workdir, 'checkpoints', '124'))
  with pytest.raises(workdir_lib.IncompatibleCheckpointError, match=r'step 93 .* belongs to a different model'):
    train.load_params(wide_config(), workdir)


def test_an_unreadable_checkpoint_is_set_aside_by_training_only_and_two_stop_it(tmp_path):
  config = tiny_config(checkpoint_every_steps=5)
  train.train_and_evaluate(config, str(tmp_path))  # Checkpoints 10, 15 and 16.
  truncate_every_file(str(tmp_path / 'checkpoints' / '16'))
  message = (
    r'checkpoint at step 16 .* cannot be read .* Older checkpoints, not tried: \[10, 15\]\. .* from checkpoint 15,'
  )
  with pytest.raises(RuntimeError, match=message):
    train.load_params(config, str(tmp_path))  # Reading a workdir moves nothing.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '15', '16']
  assert not os.path.exists(tmp_path / 'corrupt_checkpoints')
  truncate_every_file(str(tmp_path / 'checkpoints' / '15'))
  message = (
    r'checkpoint at step 15 .* cannot be read \([A-Za-z]+: [^\n]*\)\. Checkpoint 16 was unreadable too .* Older '
    r'checkpoints, not tried: \[10\]\. Then move checkpoint 15 there too, and train.py resumes from checkpoint 10\.$'
  )
  with pytest.raises(RuntimeError, match=message):
    train.train_and_evaluate(config, str(tmp_path))  # Two in a row: not one interrupted write, so it stops.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '15']
  assert os.listdir(tmp_path / 'corrupt_checkpoints') == ['16']


def test_load_params_of_a_workdir_without_checkpoints_is_none_and_creates_nothing(tmp_path):
  assert train.load_params(short_config(), str(tmp_path)) is None
  assert os.listdir(tmp_path) == []


def test_nan_loss_stops_the_run_before_parameters_that_overflow_are_checkpointed(tmp_path):
  # Adam's first step moves every parameter by about the learning rate: at 1e30 the logits overflow. That step's
  # training loss is still finite (it is the loss before the update), so its checkpoint is checked by its own test
  # loss and not saved: the latest checkpoint is one to resume from, as the error advises.
  train.train_and_evaluate(tiny_config(schedule='constant', checkpoint_every_steps=1), str(tmp_path))
  extended = {'schedule': 'constant', 'checkpoint_every_steps': 1, 'num_epochs': 3}
  with pytest.raises(
    train.NonFiniteLossError,
    match=r'The test loss became (nan|inf) at step 17; any checkpoints before it were kept\. .*learning rate',
  ):
    train.train_and_evaluate(tiny_config(learning_rate=1e30, **extended), str(tmp_path))
  assert train.load_params(tiny_config(), str(tmp_path))[1] == 16
  _, metrics = train.train_and_evaluate(tiny_config(learning_rate=1e-3, **extended), str(tmp_path))
  assert np.isfinite(metrics['test_loss'])


def test_nan_loss_stops_the_run_before_its_parameters_are_evaluated(tmp_path):
  # The NaN step's training loss is still finite: its parameters' test loss is what stops the run, unwritten.
  config = short_config(schedule='constant', learning_rate=1e30, eval_every_steps=1)
  with pytest.raises(train.NonFiniteLossError, match=r'The test loss became (nan|inf) at step 1; any checkpoints'):
    train.train_and_evaluate(config, str(tmp_path))
  assert workdir_lib.read_metrics(str(tmp_path)) == []
  assert not os.path.exists(tmp_path / 'checkpoints' / '1')


def test_an_infinite_loss_stops_the_run_like_nan():
  losses = [(7, np.float32(2.3)), (8, np.float32(np.inf))]
  with pytest.raises(train.NonFiniteLossError, match=r'The training loss became inf at step 8;'):
    train._check_finite(losses, short_config(), np.array([1e-3]), steps_per_epoch=31)
  sweep = [(9, np.array([2.3, -np.inf], np.float32))]
  with pytest.raises(train.NonFiniteLossError, match=r'of model 1 \(learning rate 0\.5\) became -inf at step 9;'):
    train._check_finite(sweep, short_config(num_models=2), np.array([1e-3, 0.5]), steps_per_epoch=31)


@pytest.mark.parametrize(
  'overrides, steps_per_epoch, advice',
  [
    ({}, 31, 'resume with a smaller --config.learning_rate, or .* --config.warmup_epochs=1, or'),
    ({'num_models': 2}, 31, 'resume with a smaller --config.learning_rate, or'),  # A sweep sharing learning_rate.
    # A sweep's learning_rates override learning_rate; one epoch takes a warmup below 1.
    (
      {'num_models': 2, 'learning_rates': (1e-3, 0.5), 'num_epochs': 1},
      31,
      'resume with a smaller learning rate for model 1 in --config.learning_rates, or .* --config.warmup_epochs=0.5,',
    ),
    # Epochs of 1 and of 3 steps: each suggested warmup is a step or more.
    ({'num_epochs': 2}, 1, '--config.warmup_epochs=1, or'),
    ({'num_epochs': 1}, 3, '--config.warmup_epochs=0.5, or'),
    # A run of one step has no room for a warmup: only clipping is advised.
    ({'num_epochs': 1}, 1, r'start a new --workdir with --config.grad_clip_norm=1\.0\), or'),
  ],
)
def test_a_non_finite_loss_advises_settings_the_run_accepts(overrides, steps_per_epoch, advice):
  config = short_config(**overrides)
  learning_rates = np.array(config.learning_rates or [config.learning_rate] * config.num_models)
  losses = np.array([2.3, np.nan] if config.num_models > 1 else np.nan, np.float32)
  with pytest.raises(train.NonFiniteLossError, match=advice) as error:
    train._check_finite([(3, losses)], config, learning_rates, steps_per_epoch)
  suggested = dict(re.findall(r'--config\.(\w+)=([\w.]+)', str(error.value)))
  if 'warmup_epochs' in suggested:
    # The new run it suggests is one check_config and train_and_evaluate accept: it warms up for a step or more.
    warmup = short_config(**overrides, schedule='warmup_cosine', warmup_epochs=float(suggested['warmup_epochs']))
    train.check_config(warmup)
    assert train.warmup_steps(warmup, steps_per_epoch) >= 1
  else:
    assert config.num_epochs * steps_per_epoch == 1


def test_each_train_row_is_the_mean_of_the_steps_since_the_last_row(tmp_path):
  # Logging reads the steps without changing them, so runs that log at other cadences train alike. Checkpoints
  # between the rows check the steps since the last row too, and must not start a row's window.
  train.train_and_evaluate(tiny_config(log_every_steps=1), str(tmp_path / 'every_step'))
  train.train_and_evaluate(tiny_config(log_every_steps=4, checkpoint_every_steps=3), str(tmp_path / 'every_4'))
  each = [r for r in workdir_lib.read_metrics(str(tmp_path / 'every_step')) if r['split'] == 'train']
  rows = [r for r in workdir_lib.read_metrics(str(tmp_path / 'every_4')) if r['split'] == 'train']
  assert [r['step'] for r in rows] == [4, 8, 12, 16]
  for row in rows:  # Every batch has 500 digits, so the mean over the steps is the mean over their examples.
    window = [r for r in each if row['step'] - 4 < r['step'] <= row['step']]
    for name in ('loss', 'accuracy'):
      assert row[name] == pytest.approx(np.mean([r[name] for r in window]), rel=1e-6)


def test_a_nan_in_the_training_data_stops_the_run_at_the_checkpoint_of_its_step(tmp_path, monkeypatch):
  # A step that only checkpoints (no log row, no evaluation) checks the training losses since the last row too,
  # so the error names the training batch, not the test loss of the parameters it made, nor the checkpoint's step
  # (4, whose loss is NaN too, from the parameters step 3 made).
  config = tiny_config(num_epochs=1, log_every_steps=8, eval_every_steps=8, checkpoint_every_steps=2)
  shuffle_key, _ = input_pipeline.epoch_keys(config.seed, 0)
  nan_digit = int(input_pipeline.shuffled_batch_indices(shuffle_key, 4000, config.batch_size)[2][0])  # Step 3's.
  load_split = input_pipeline.load_split

  def with_a_nan_digit(config, split):
    data = load_split(config, split)
    if split == 'train':
      data['image'][nan_digit] = np.nan
    return data

  monkeypatch.setattr(input_pipeline, 'load_split', with_a_nan_digit)
  with pytest.raises(train.NonFiniteLossError, match=r'The training loss became nan at step 3; any checkpoints'):
    train.train_and_evaluate(config, str(tmp_path))
  assert train.load_params(config, str(tmp_path))[1] == 2


@pytest.mark.parametrize(
  'every, checkpoints, evaluations',
  [(0, [8, 16], [8, 16]), (5, [10, 15, 16], [5, 10, 15, 16])],  # 0: once an epoch. The last step always.
)
def test_eval_and_checkpoint_cadences_and_the_last_step(tmp_path, every, checkpoints, evaluations):
  train.train_and_evaluate(tiny_config(eval_every_steps=every, checkpoint_every_steps=every), str(tmp_path))
  assert sorted(int(step) for step in os.listdir(tmp_path / 'checkpoints')) == checkpoints  # The newest 3.
  assert [r['step'] for r in workdir_lib.read_metrics(str(tmp_path)) if r['split'] == 'test'] == evaluations


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'optimizer': 'rmsprop'}, r"config\.optimizer='rmsprop' .* \('sgd', 'momentum', 'adam', 'adamw'\)"),
    ({'schedule': 'linear'}, r"config\.schedule='linear' .* \('constant', 'cosine', 'warmup_cosine'\)"),
    ({'batch_size': 0}, r'config\.batch_size=0 .* integer >= 1'),
    ({'eval_batch_size': 0}, r'config\.eval_batch_size=0 .* integer >= 1'),  # Else found at the first evaluation.
    ({'batch_size': 4001}, r'config\.batch_size=4001 .* from 1 to 4000, the number of training examples\.'),
    ({'validation_size': 1, 'batch_size': 4000}, r'config\.batch_size=4000 .* to 3999, .* validation_size=1 held out'),
    ({'num_epochs': 0}, r'config\.num_epochs=0 .* integer >= 1'),
    ({'learning_rate': 0.0}, r'config\.learning_rate=0\.0 .* > 0'),
    ({'learning_rate': float('nan')}, r'config\.learning_rate=nan .* finite'),
    ({'learning_rate': 1e39}, r'config\.learning_rate=1e\+39 .* finite float32'),  # inf as float32.
    ({'learning_rates': (0.1,)}, r'config\.learning_rates=\(0\.1,\) .* a single model takes config\.learning_rate'),
    ({'num_models': 2, 'learning_rates': (float('inf'), 0.1)}, r'config\.learning_rates=\(inf, 0\.1\) .* finite'),
    ({'momentum': 1.0}, r'config\.momentum=1\.0 .* \[0, 1\)'),
    ({'weight_decay': -0.1}, r'config\.weight_decay=-0\.1 .* >= 0'),
    ({'weight_decay': float('inf')}, r'config\.weight_decay=inf .* a finite number >= 0'),  # Else NaN at step 2.
    ({'grad_clip_norm': float('nan')}, r'config\.grad_clip_norm=nan .* a finite number >= 0'),
    (
      {'grad_clip_norm': None},
      r'config\.grad_clip_norm=None .* a finite number >= 0',
    ),  # A ConfigDict takes None anywhere.
    ({'momentum': None}, r'config\.momentum=None .* \[0, 1\)'),
    ({'schedule': 'warmup_cosine', 'warmup_epochs': 2.0}, r'config\.warmup_epochs=2\.0 .* less than num_epochs=2'),
    ({'schedule': 'warmup_cosine'}, r'config\.warmup_epochs=0\.0 .* more than 0'),  # Else it is cosine.
    ({'warmup_epochs': 1.0}, r"config\.warmup_epochs=1\.0 .* only schedule='warmup_cosine' warms up, not 'cosine'"),
    ({'eval_every_steps': -1}, r'config\.eval_every_steps=-1 .* >= 0'),
    ({'log_every_steps': True}, r'config\.log_every_steps=True .* integer >= 1'),  # bool is an int subclass.
    ({'checkpoint_every_steps': -1}, r'config\.checkpoint_every_steps=-1 .* >= 0'),
    ({'max_checkpoints_to_keep': 0}, r'config\.max_checkpoints_to_keep=0 .* integer >= 1'),
    ({'num_models': 0}, r'config\.num_models=0 .* integer >= 1'),
    ({'train_mode': 'Epoch'}, r"config\.train_mode='Epoch' is not valid; choose one of \('step', 'epoch'\)"),
    ({'momentum': 0.5}, r"config\.momentum=0\.5 is not valid; only optimizer='momentum' reads it, not 'adam'; leave"),
    ({'seed': -1}, r'config\.seed=-1 .* integer from 0 to 2\*\*32 - num_models = 4294967295 '),
    ({'seed': 2**32}, r'config\.seed=4294967296 .* integer from 0 to'),  # A JAX key would take it as seed 0.
    ({'seed': 2**32 - 2, 'num_models': 3}, r'config\.seed=4294967294 .* = 4294967293 \(model k .* seed \+ k\)'),
    ({'seed': None}, r'config\.seed=None .* integer'),
    ({'random_crop_padding': 32}, r'config\.random_crop_padding=32 .* below the 32-pixel side of the images'),
    # Else JAX's own error, after the data are read.
    ({'random_crop_padding': -1}, r'config\.random_crop_padding=-1 .* integer >= 0, the most pixels'),
    # A config file's misspelt setting: else the run would train with the default value.
    ({'num_epoch': 1}, r'config has no setting num_epoch \(did you mean num_epochs\?\); the settings are'),
    ({'random_flip': None}, r'config\.random_flip=None is not valid; it must be True or False'),
    ({'validation_size': None}, r'config\.validation_size=None is not valid; it must be an integer >= 0'),
    ({'validation_size': -1}, r'config\.validation_size=-1 is not valid; it must be an integer >= 0'),
    ({'input_shape': None}, r'config\.input_shape=None is not valid; .* three Python ints >= 1'),
    ({'num_models': 2, 'learning_rates': (0.1,)}, r'config\.learning_rates=\(0\.1,\) .* one finite .*\(num_models=2;'),
    ({'num_models': 2, 'learning_rates': (0.1, 0.2, 0.3)}, r'config\.learning_rates=\(0\.1, 0\.2, 0\.3\) .* one'),
    ({'model': {'pool': 'median'}}, r"config\.model\.pool='median' is not valid"),
    # A run meant for tfds data would train on the embedded digits (readers of a saved config ignore it).
    (
      {'data_dir': '/data/tfds'},
      r"config\.data_dir='/data/tfds' .* embedded_mnist .* \('mnist', 'fashion_mnist', 'cifar10'\)",
    ),
  ],
)
def test_invalid_training_setting_is_named(overrides, message, tmp_path, image_reads):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(short_config(**overrides), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # Refused before any work: not even the workdir is made.
  assert image_reads == []


# A config file written from scratch, say. model.CNN has a default for each model setting, which the run would train
# with unannounced, and which its saved config would not record.
@pytest.mark.parametrize('name', ['validation_size', 'model', 'model.pool'])
def test_a_config_that_lacks_a_setting_is_refused_by_name(name, tmp_path, image_reads):
  config = short_config()
  *parents, setting = name.split('.')
  del functools.reduce(getattr, parents, config)[setting]
  with pytest.raises(
    ValueError, match=rf'config\.{re.escape(name)} is missing; .* build it from default\.get_config\(\)'
  ):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  assert image_reads == []


def test_a_config_whose_model_is_not_a_config_is_refused_by_name(tmp_path, image_reads):
  config = short_config()
  config.model = None  # A ConfigDict takes None anywhere.
  with pytest.raises(ValueError, match=r"config\.model=None is not valid; it must hold the model's settings"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  assert image_reads == []


@pytest.mark.parametrize('name, problem', [('', 'is empty'), ('a_file', 'is not a directory')])
def test_a_workdir_that_cannot_be_a_directory_is_refused_before_any_image_is_read(name, problem, tmp_path, image_reads):
  (tmp_path / 'a_file').write_text('a note')
  workdir = str(tmp_path / name) if name else ''
  with pytest.raises(ValueError, match=rf'workdir={re.escape(repr(workdir))} {problem}; name a directory'):
    train.train_and_evaluate(short_config(), workdir)
  assert (tmp_path / 'a_file').read_text() == 'a note'
  assert image_reads == []


@pytest.mark.parametrize(
  'path, message',
  [
    # Orbax would fail to save in it, at the end of the first epoch.
    ('checkpoints', r'checkpoints is not a directory, and the run keeps its checkpoints there'),
    ('checkpoints/62', r'checkpoints/62 is not a checkpoint \(a directory\), and saving step 62 would replace it'),
  ],
)
def test_a_file_where_checkpoints_go_is_refused_and_kept(tmp_path, image_reads, path, message):
  (tmp_path / path).parent.mkdir(exist_ok=True)
  (tmp_path / path).write_text('a note')
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(short_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['checkpoints']
  assert (tmp_path / path).read_text() == 'a note'
  assert image_reads == []


def test_a_checkpoint_that_fails_to_save_stops_the_run_with_its_writer_and_manager_closed(tmp_path, monkeypatch):
  closed = []
  for cls in (workdir_lib.ocp.CheckpointManager, workdir_lib.MetricWriter):
    monkeypatch.setattr(cls, 'close', lambda self, close=cls.close: closed.append(type(self).__name__) or close(self))
  save = workdir_lib.save_checkpoint

  def save_that_fails_in_the_background(manager, step, state):
    save(manager, step, state)

    def wait_until_finished():  # As orbax raises a background save's error: at the next wait, once.
      del manager.wait_until_finished
      raise OSError(28, 'No space left on device')

    manager.wait_until_finished = wait_until_finished

  monkeypatch.setattr(workdir_lib, 'save_checkpoint', save_that_fails_in_the_background)
  with pytest.raises(OSError, match='No space left on device'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  # Left open, their threads would keep the process from exiting.
  assert closed[-2:] == ['MetricWriter', 'CheckpointManager']


def test_a_workdir_that_cannot_be_made_is_refused_before_any_image_is_read(tmp_path, image_reads):
  (tmp_path / 'a_file').write_text('a note')
  workdir = str(tmp_path / 'a_file' / 'run')  # Inside a file.
  with pytest.raises(ValueError, match=rf"workdir='{re.escape(workdir)}' cannot be made \(.*\); name a directory"):
    train.train_and_evaluate(short_config(), workdir)
  assert image_reads == []


def test_random_flip_must_be_a_bool_where_the_config_lets_an_int_in(tmp_path):
  config = short_config(random_flip=None)
  config.random_flip = 1  # A ConfigDict keeps a field's type, but a field that was None takes any.
  with pytest.raises(ValueError, match=r'config\.random_flip=1 is not valid; it must be True or False'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.parametrize(
  'batch_size, warmup_epochs, steps_per_epoch, least',
  [(1000, 0.2, 4, '0.25'), (1500, 0.1, 2, '0.5'), (3, 0.0003, 1333, '0.0008'), (64, 0.01, 62, '0.0162')],
)
def test_a_warmup_shorter_than_a_step_is_refused_with_the_least_that_warms_up(
  batch_size, warmup_epochs, steps_per_epoch, least, tmp_path, image_reads
):
  config = short_config(schedule='warmup_cosine', batch_size=batch_size, warmup_epochs=warmup_epochs)
  message = rf'is less than one of the {steps_per_epoch} steps .* at least 1/{steps_per_epoch} of an epoch, {least} '
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  assert image_reads == []  # A warmup is checked against the split's size, before 60,000 images would be read.
  assert train.warmup_steps(short_config(warmup_epochs=float(least)), steps_per_epoch) == 1


def test_a_run_too_short_to_warm_up_is_told_so_rather_than_given_a_warmup_it_would_refuse(tmp_path):
  # One step an epoch and one epoch: a warmup of one step needs warmup_epochs = 1, which is not < num_epochs.
  config = short_config(schedule='warmup_cosine', batch_size=4000, num_epochs=1, warmup_epochs=0.5)
  with pytest.raises(ValueError, match=r"the run's 1 step\(s\) leave none after a warmup step: raise num_epochs"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_the_edge_values_of_each_setting_are_valid():
  for overrides in (
    {'random_crop_padding': 0},
    {'random_crop_padding': 31},
    {'eval_every_steps': 0, 'checkpoint_every_steps': 0},
    {'optimizer': 'momentum', 'momentum': 0.0, 'weight_decay': 0.0, 'grad_clip_norm': 0.0},
    {'seed': 2**32 - 3, 'num_models': 3},
  ):
    train.check_config(short_config(**overrides))


@pytest.mark.parametrize(
  'optimizer, schedule',
  [(optimizer, 'warmup_cosine') for optimizer in train.OPTIMIZERS] + [('adam', 'constant'), ('adam', 'cosine')],
)
def test_every_optimizer_and_schedule_decreases_the_loss(optimizer, schedule):
  config = short_config(
    optimizer=optimizer, schedule=schedule, warmup_epochs=0.5, weight_decay=1e-4, grad_clip_norm=1.0
  )
  config.learning_rate = 0.05 if optimizer in ('sgd', 'momentum') else 3e-3
  state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(64, 32, 32, 1)).astype(np.float32),
    'label': rng.integers(0, 10, 64, dtype=np.int32),
  }
  step = jax.jit(train.train_step)
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss_sum']) / 64)
  assert losses[-1] < losses[0]


def hand_written_updates(optimizer, params, grads, learning_rate, momentum, weight_decay, clip_norm):
  """The update rules written out in float64: SGD, heavy-ball momentum, Adam (optax's defaults b1=0.9, b2=0.999,
  eps=1e-8) and AdamW; clipping to a global norm first, then coupled L2 decay (g + wd * p) for all but AdamW."""
  p, trace, m, v = np.asarray(params, np.float64), 0.0, 0.0, 0.0
  for t, g in enumerate(np.asarray(grads, np.float64), start=1):
    if clip_norm:
      g = g * min(1.0, clip_norm / np.linalg.norm(g))
    if weight_decay and optimizer != 'adamw':
      g = g + weight_decay * p
    if optimizer == 'sgd':
      p = p - learning_rate * g
    elif optimizer == 'momentum':
      trace = g + momentum * trace
      p = p - learning_rate * trace
    else:
      m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
      direction = m / (1 - 0.9**t) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
      p = p - learning_rate * (direction + (weight_decay * p if optimizer == 'adamw' else 0.0))
  return p


@pytest.mark.parametrize(
  'optimizer, weight_decay, grad_clip_norm',
  [('sgd', 0, 0), ('momentum', 0, 0), ('adam', 0, 0), ('adamw', 0.1, 0), ('sgd', 0.1, 0), ('momentum', 0.1, 0.5)],
)
def test_optimizers_follow_their_update_rules(optimizer, weight_decay, grad_clip_norm):
  config = short_config(
    optimizer=optimizer,
    weight_decay=weight_decay,
    grad_clip_norm=grad_clip_norm,
    schedule='constant',
    learning_rate=0.1,
  )
  tx = train.create_optimizer(config, steps_per_epoch=62)
  params = {'w': np.array([1.0, -2.0, 3.0], np.float32)}
  # Norms 1.15, 0.37 and 0.72: a clip to 0.5 shortens the first and the last.
  grads = [[0.5, 0.25, -1.0], [0.1, -0.3, 0.2], [-0.4, 0.6, 0.05]]
  opt_state = tx.init(params)
  for g in grads:
    updates, opt_state = tx.update({'w': np.array(g, np.float32)}, opt_state, params)
    params = optax.apply_updates(params, updates)
  expected = hand_written_updates(
    optimizer, [1.0, -2.0, 3.0], grads, 0.1, config.momentum, weight_decay, grad_clip_norm
  )
  np.testing.assert_allclose(params['w'], expected, rtol=1e-5)


def test_a_train_step_moves_the_parameters_down_the_reference_gradient_of_the_batch_mean_loss():
  """One SGD step on 32 real digits against reference.py, the network written out in float64 NumPy."""
  config = short_config(optimizer='sgd', schedule='constant', learning_rate=0.1)
  state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=62)
  digits = input_pipeline.load_split(config, 'train')
  batch = {'image': digits['image'][:32], 'label': digits['label'][:32]}
  loss, grads = reference.loss_and_grads(state.params, config.model, batch['image'], batch['label'])
  stepped, metrics = jax.jit(train.train_step)(state, batch)
  expected = jax.tree.map(lambda p, g: np.asarray(p, np.float64) - 0.1 * g, state.params, grads)
  # A float32 parameter of size 0.5 is exact to 3e-8; the same step on the batch's summed loss would be 32x as long.
  jax.tree.map(lambda p, e: np.testing.assert_allclose(p, e, rtol=1e-5, atol=1e-7), stepped.params, expected)
  logits, _ = reference.forward(state.params, config.model, batch['image'])
  assert float(metrics['loss_sum']) == pytest.approx(32 * loss, rel=1e-5)
  assert int(metrics['correct']) == int(np.sum(logits.argmax(-1) == batch['label']))
  assert int(metrics['count']) == 32


def test_learning_rate_schedules():
  config = short_config(learning_rate=0.1, num_epochs=10, warmup_epochs=2.0)
  for name, expected in {
    'constant': [0.1, 0.1, 0.1],
    'cosine': [0.1, 0.05, 0.0],  # At steps 0, 50 and 100 of 100.
    'warmup_cosine': [0.0, 0.1 * (1 + np.cos(np.pi * 30 / 80)) / 2, 0.0],
  }.items():
    config.schedule = name
    schedule = train.create_learning_rate_schedule(config, steps_per_epoch=10)
    np.testing.assert_allclose([schedule(0), schedule(50), schedule(100)], expected, atol=1e-7)
  config.schedule = 'warmup_cosine'
  assert float(train.create_learning_rate_schedule(config, steps_per_epoch=10)(20)) == pytest.approx(0.1)


def test_compute_metrics_counts_only_unmasked_examples():
  logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [5.0, 0.0]])
  labels = np.array([0, 0, 0, 0])  # The masked last example is classified correctly: counting it would show.
  metrics = train.compute_metrics(logits, labels, mask=np.array([True, True, True, False]))
  assert (int(metrics['correct']), int(metrics['count'])) == (2, 3)
  expected_loss = float(np.sum(optax.softmax_cross_entropy_with_integer_labels(logits[:3], labels[:3])))
  assert float(metrics['loss_sum']) == pytest.approx(expected_loss)


def test_metrics_compare_the_predicted_class_and_the_label_in_one_dtype():
  # argmax gives int64 with jax_enable_x64; strict promotion refuses to compare it with int32 labels.
  logits, labels = np.array([[2.0, 0.0], [2.0, 0.0]], np.float32), np.array([0, 1], np.int32)
  with jax.enable_x64(True), jax.numpy_dtype_promotion('strict'):
    metrics = train.compute_metrics(logits, labels)
  assert (int(metrics['correct']), int(metrics['count'])) == (1, 2)


def test_summarized_metrics_weigh_each_batch_by_its_examples():
  # A full batch of one example and a padded one of three (as the last evaluation batch is): the mean over the four
  # examples, not over the two batches (1.5 and 0.5).
  batches = [{'loss_sum': 1.0, 'correct': 1, 'count': 1}, {'loss_sum': 6.0, 'correct': 0, 'count': 3}]
  assert train.summarize_metrics(batches) == {'loss': 1.75, 'accuracy': 0.25}


def test_an_eval_batch_larger_than_the_split_is_cut_to_the_split_and_num_batches_reads_only_those():
  config = short_config()
  data = input_pipeline.load_split(config, 'test')  # 1,000 digits.
  params = train.create_initial_state(config, 62).params
  jitted = jax.jit(functools.partial(train.eval_step, apply_fn=model.create_model(config).apply))
  batch_sizes = []

  def eval_fn(params, batch):
    batch_sizes.append(len(batch['label']))
    return jitted(params, batch)

  whole = train.evaluate(eval_fn, params, data, 100_000)
  assert batch_sizes == [1000]
  in_batches = train.evaluate(eval_fn, params, data, 512)
  assert batch_sizes[1:] == [512, 512]
  assert whole['accuracy'] == in_batches['accuracy']
  assert whole['loss'] == pytest.approx(in_batches['loss'], rel=1e-6)
  first = train.evaluate(eval_fn, params, data, 256, num_batches=1)  # The check before a checkpoint: one batch.
  assert batch_sizes[3:] == [256]
  assert first == train.evaluate(eval_fn, params, {name: value[:256] for name, value in data.items()}, 256)


def test_an_eval_batch_cut_to_a_small_split_still_divides_over_the_devices(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  assert train.evaluation_batch_size(60, 1000) == 64  # 60 examples and 4 padded, 8 on each device.
  assert train.evaluation_batch_size(1000, 512) == 512
  assert train.evaluation_batch_size(64, 1000) == 64


def run_train_py(workdir, *flags):
  command = [sys.executable, 'train.py', '--config=configs/default.py', f'--workdir={workdir}', *flags]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize('fill', [None, np.array([0.5], np.float32)], ids=['black', 'given_fill'])
def test_each_step_trains_on_the_batch_of_its_seed_epoch_and_step(fill):
  config = short_config(random_crop_padding=2, random_flip=True)
  data = jax.device_put(input_pipeline.load_split(config, 'train'))
  batch_sharding = NamedSharding(train.device_mesh(), PartitionSpec('batch'))
  functions = train.training_functions(config, 4000, batch_sharding, fill)
  for epoch in (0, 1):
    keys, indices = functions.epoch_order(epoch)
    shuffle_key, augment_key = input_pipeline.epoch_keys(config.seed, epoch)
    np.testing.assert_array_equal(jax.random.key_data(keys), jax.random.key_data(augment_key))
    np.testing.assert_array_equal(indices, input_pipeline.shuffled_batch_indices(shuffle_key, 4000, config.batch_size))
  # Step 5 of epoch 1 is train_step on those examples, each shifted and mirrored with fold_in(augment_key, 5).
  state = train.create_train_state(config, jax.random.key(0), 62)
  jit = train.jit_with_xla_options  # As train_and_evaluate compiles them.
  trained, _ = jit(functions.train_step)(state, data, indices, keys, 5)
  fill = input_pipeline.black(config.dataset) if fill is None else fill  # What shifts uncover: black by default.
  images = input_pipeline.augment(data['image'][indices[5]], jax.random.fold_in(augment_key, 5), 2, True, fill)
  expected, _ = jit(train.train_step)(state, {'image': images, 'label': data['label'][indices[5]]})
  assert_trees_bitwise_equal(trained.params, expected.params)


def test_sigkill_then_rerun_resumes_bitwise_exactly(tmp_path, tensorboard_scalars):
  flags = ['--config.num_epochs=4', '--config.checkpoint_every_steps=10', '--config.log_every_steps=10']
  config = short_config(num_epochs=4, checkpoint_every_steps=10, log_every_steps=10, eval_every_steps=0)
  uninterrupted, _ = train.train_and_evaluate(config, str(tmp_path / 'uninterrupted'))

  workdir = tmp_path / 'killed'
  process = run_train_py(workdir, *flags)
  checkpoints = workdir / 'checkpoints'
  # Any checkpoint, not 10 itself: a run slowed by other processes may be seen only after it was deleted (at 40).
  while not (checkpoints.is_dir() and any(name.isdigit() for name in os.listdir(checkpoints))):
    assert process.poll() is None, process.stderr.read()
    time.sleep(0.01)
  time.sleep(random.uniform(0.0, 0.5))  # Anywhere in the run: mid-step, mid-save or mid-log.
  assert process.poll() is None, 'the run finished before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(int(step) for step in os.listdir(workdir / 'checkpoints') if step.isdigit())
  assert killed_at < 248
  # TensorBoard has every logged step up to the checkpoint, as metrics.jsonl does (the resumed run logs the rest).
  assert set(range(10, killed_at + 1, 10)) <= {step for step, _ in tensorboard_scalars(workdir, 'train/loss')}

  rerun = run_train_py(workdir, *flags)
  _, log = rerun.communicate()
  assert rerun.returncode == 0, log
  assert f'Resumed from the checkpoint at step {killed_at}.' in log  # Not retrained from step 0.
  params, step = train.load_params(config, str(workdir))
  assert step == 248
  assert_trees_bitwise_equal(params, uninterrupted.params)
  # Steps the killed run logged after its checkpoint are logged again; metrics.jsonl and TensorBoard keep the resumed
  # run's alone.
  assert [step for step, _ in tensorboard_scalars(workdir, 'train/loss')] == [*range(10, 241, 10), 248]
  assert [r['step'] for r in workdir_lib.read_metrics(str(workdir)) if r['split'] == 'train'] == [
    *range(10, 241, 10),
    248,
  ]
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  assert (saved['num_epochs'], saved['checkpoint_every_steps'], saved['log_every_steps']) == (4, 10, 10)


def assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


def test_epoch_mode_trains_like_step_mode_to_float_rounding(short_run, tmp_path, caplog):
  workdir, state, metrics = short_run
  with caplog.at_level('INFO'):
    epoch_state, epoch_metrics = train.train_and_evaluate(
      short_config(train_mode='epoch', checkpoint_every_steps=62), str(tmp_path)
    )
  progress = [r.getMessage().split('  train loss')[0] for r in caplog.records if ' train loss ' in r.getMessage()]
  assert progress == ['step 62/124 epoch 1', 'step 124/124 epoch 2']  # One line per epoch, one call each.
  assert_trees_close(epoch_state.params, state.params, atol=1e-6)
  rows = workdir_lib.read_metrics(str(tmp_path))
  assert [(r['step'], r['split']) for r in rows] == [(r['step'], r['split']) for r in workdir_lib.read_metrics(workdir)]
  np.testing.assert_allclose(
    [r['loss'] for r in rows], [r['loss'] for r in workdir_lib.read_metrics(workdir)], rtol=1e-5
  )
  assert epoch_metrics['test_accuracy'] == pytest.approx(metrics['test_accuracy'], abs=0.002)


def test_the_epoch_modes_progress_line_shows_its_epochs_metrics(tmp_path, caplog):
  config = tiny_config(train_mode='epoch', log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=0)
  with caplog.at_level('INFO'):
    train.train_and_evaluate(config, str(tmp_path))
  printed = re.findall(r'step (\d+)/16 epoch \d+  train loss ([\d.]+) accuracy ([\d.]+)', caplog.text)
  rows = [r for r in workdir_lib.read_metrics(str(tmp_path)) if r['split'] == 'train']  # A row per step of 500.
  assert [int(step) for step, _, _ in printed] == [8, 16]  # Once an epoch, over its 8 steps, not its last.
  for (_, loss, accuracy), epoch_rows in zip(printed, (rows[:8], rows[8:]), strict=True):
    assert float(loss) == pytest.approx(np.mean([r['loss'] for r in epoch_rows]), abs=6e-5)  # Printed to 4 places.
    assert float(accuracy) == pytest.approx(np.mean([r['accuracy'] for r in epoch_rows]), abs=6e-5)


def test_epoch_mode_resumes_exactly_from_an_epoch_boundary(tmp_path):
  config = short_config(train_mode='epoch', checkpoint_every_steps=62)
  finished, _ = train.train_and_evaluate(config, str(tmp_path / 'run'))
  interrupted = shutil.copytree(tmp_path / 'run', tmp_path / 'interrupted')
  shutil.move(interrupted / 'checkpoints' / '124', tmp_path / 'set_aside')  # As if stopped after epoch 1.
  resumed, _ = train.train_and_evaluate(config, str(interrupted))
  with open(interrupted / 'superseded_metrics.jsonl') as f:  # Epoch 2 only, steps 63..124, was trained again.
    assert [r['step'] for r in map(json.loads, f) if r['split'] == 'train'] == [80, 100, 120, 124]
  rows, resumed_rows = workdir_lib.read_metrics(tmp_path / 'run'), workdir_lib.read_metrics(interrupted)
  assert [(r['step'], r['split']) for r in resumed_rows] == [(r['step'], r['split']) for r in rows]
  assert resumed_rows[-1] == rows[-1]
  assert_trees_bitwise_equal(resumed.params, finished.params)


def test_epoch_mode_resumes_a_step_mode_run_from_inside_an_epoch(short_run, tmp_path, caplog):
  workdir, state, _ = short_run
  interrupted = shutil.copytree(workdir, tmp_path / 'run')
  shutil.move(interrupted / 'checkpoints' / '124', tmp_path / 'set_aside')  # As if stopped at step 93 of 124.
  with caplog.at_level('INFO'):
    resumed, _ = train.train_and_evaluate(short_config(train_mode='epoch', checkpoint_every_steps=62), str(interrupted))
  assert_trees_close(resumed.params, state.params, atol=1e-6)  # Steps 94..124 by steps: epoch 2 had begun.
  progress = [r.getMessage().split('/')[0] for r in caplog.records if ' train loss ' in r.getMessage()]
  assert progress == ['step 100', 'step 120', 'step 124']  # Each log_every_steps, as step mode logs.
  assert os.path.exists(interrupted / 'config_step93.json')  # The changed train_mode is on record.


@pytest.mark.parametrize(
  'cadences, setting',
  [
    ({}, 'checkpoint_every_steps=31'),
    ({'eval_every_steps': 31, 'checkpoint_every_steps': 62}, 'eval_every_steps=31'),
  ],
)
def test_epoch_mode_refuses_a_cadence_inside_an_epoch(tmp_path, cadences, setting, image_reads):
  with pytest.raises(ValueError, match=rf'config\.{setting} .* multiple of the 62 steps of an epoch'):
    train.train_and_evaluate(short_config(train_mode='epoch', **cadences), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  assert image_reads == []


# Runs of the same maths that sum in another order (a vmapped sweep, a batch split over devices) take the same steps
# to rounding, but over a run a rounding difference can decide which entry of a max-pooling window is the maximum
# (or whether two tie), and from that step the gradients differ by more than rounding. Measured: a sweep's model 0
# matched its single run to 3e-8 for 5 steps, then conv1's kernel differed by 1e-5 (by 1e-2 after 124 steps, with
# train losses within 0.2%); on an AVX-512 CPU the 124 steps over 8 devices, or 2 processes, ended 8e-4 from one
# device's, where on an AVX2 CPU they had stayed within 1e-5. So such runs are compared step by step to rounding,
# and whole by their metrics.
def training_on(config, mesh):
  """(training functions, train split, initial state) of `config` on the devices of `mesh`, placed as
  train_and_evaluate places them: the data and state replicated, each batch split over the devices."""
  num_train = input_pipeline.split_size(config, 'train')
  functions = train.training_functions(config, num_train, NamedSharding(mesh, PartitionSpec('batch')))
  data = train.place_replicated(input_pipeline.load_split(config, 'train'), mesh)
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  return functions, data, train.place_replicated(train.create_initial_state(config, steps_per_epoch), mesh)


def params_after_each_step(config, num_steps=4):
  """Yields the parameters after each of the first `num_steps` steps of epoch 0, the batch split over all devices."""
  functions, data, state = training_on(config, train.device_mesh())
  keys, indices = functions.epoch_order(0)
  train_step = train.jit_with_xla_options(functions.train_step)
  for step in range(num_steps):
    state, _ = train_step(state, data, indices, keys, step)
    yield jax.device_get(state.params)


def assert_runs_agree(rows, expected):
  """Metrics rows of two runs of the same batches: the same steps and splits, losses within 1% and the final test
  accuracy within 0.01."""
  assert [(r['step'], r['split']) for r in rows] == [(r['step'], r['split']) for r in expected]
  np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in expected], rtol=1e-2)
  assert rows[-1]['accuracy'] == pytest.approx(expected[-1]['accuracy'], abs=0.01)


def test_sweep_model_k_is_the_single_run_with_seed_k(short_run, tmp_path, caplog):
  sweep_config = short_config(num_models=2)
  for sweep_params, *single_params in zip(
    params_after_each_step(sweep_config),
    params_after_each_step(short_config()),
    params_after_each_step(short_config(seed=1)),
    strict=True,
  ):
    for k, params in enumerate(single_params):
      assert_trees_close(jax.tree.map(lambda p, k=k: p[k], sweep_params), params, atol=1e-6)

  train.train_and_evaluate(short_config(seed=1), str(tmp_path / 'seed1'))
  with caplog.at_level('INFO'):
    _, metrics = train.train_and_evaluate(sweep_config, str(tmp_path / 'sweep'))
  assert metrics['test_accuracy'].shape == (2,)
  # The progress line counts model-images: each step trains 2 models on a batch.
  rates = re.findall(r' ([\d.]+) steps/s (\d+) images/s', caplog.text)
  assert len(rates) == 7  # Steps 20, 40, ..., 120 and 124.
  for steps_per_second, images_per_second in rates:
    images_per_step = 2 * sweep_config.batch_size
    assert abs(int(images_per_second) - float(steps_per_second) * images_per_step) <= 0.05 * images_per_step + 0.5
  rows = workdir_lib.read_metrics(str(tmp_path / 'sweep'))
  for k, single_run in enumerate([short_run[0], str(tmp_path / 'seed1')]):
    assert_runs_agree([r for r in rows if r['model'] == k], workdir_lib.read_metrics(single_run))
  assert sorted(os.listdir(tmp_path / 'sweep' / 'model_1'))[0].startswith('events.out.tfevents')


def test_sweep_model_k_starts_and_shuffles_as_the_single_run_with_seed_plus_k():
  sharding = NamedSharding(train.device_mesh(), PartitionSpec('batch'))
  config = short_config(seed=3, num_models=2)
  sweep = train.create_initial_state(config, 62)
  sweep_keys, sweep_indices = train.training_functions(config, 4000, sharding).epoch_order(1)
  for k in range(2):
    single_config = short_config(seed=3 + k)
    single = train.create_initial_state(single_config, 62)
    assert_trees_bitwise_equal(jax.tree.map(lambda p, k=k: p[k], sweep.params), single.params)
    keys, indices = train.training_functions(single_config, 4000, sharding).epoch_order(1)
    np.testing.assert_array_equal(sweep_indices[k], indices)
    np.testing.assert_array_equal(jax.random.key_data(sweep_keys[k]), jax.random.key_data(keys))


def test_a_sweep_in_epoch_mode_trains_as_by_steps_and_resumes_exactly(tmp_path):
  cadences = {'eval_every_steps': 0, 'checkpoint_every_steps': 0}  # Each epoch: 8 steps of 500.
  config = tiny_config(num_models=2, learning_rates=(1e-3, 3e-3), train_mode='epoch', **cadences)
  finished, metrics = train.train_and_evaluate(config, str(tmp_path / 'run'))
  by_steps, _ = train.train_and_evaluate(
    tiny_config(num_models=2, learning_rates=(1e-3, 3e-3), **cadences), str(tmp_path / 'by_steps')
  )
  assert_trees_close(finished.params, by_steps.params, atol=1e-6)
  interrupted = shutil.copytree(tmp_path / 'run', tmp_path / 'interrupted')
  shutil.move(interrupted / 'checkpoints' / '16', tmp_path / 'set_aside')  # As if stopped after epoch 1.
  resumed, resumed_metrics = train.train_and_evaluate(config, str(interrupted))
  # Each model resumed with its own learning rate and data order: the second epoch retrained exactly.
  assert_trees_bitwise_equal(resumed.params, finished.params)
  np.testing.assert_array_equal(resumed_metrics['test_loss'], metrics['test_loss'])


def test_sweep_gives_each_model_its_learning_rate(tmp_path):
  config = short_config(num_models=2, learning_rates=(1e-3, 1e30), schedule='warmup_cosine', warmup_epochs=0.5)
  with pytest.raises(train.NonFiniteLossError, match=r'loss of model 1 \(learning rate 1e\+30\) became'):
    train.train_and_evaluate(config, str(tmp_path))


DATA_PARALLEL_SCRIPT = """
import json, pickle, sys
import jax
import train
sys.path.insert(0, 'tests')
from train_test import flops_per_device, params_after_each_step
from configs import default
train.tune_cpu_runtime()  # As train.py's main does: steps over the 8 devices run on the calling thread.
config = default.get_config()
config.update(json.loads(sys.argv[2]))
for name in ('batch_size', 'eval_batch_size'):
  indivisible = config.copy_and_resolve_references()
  indivisible[name] = 60
  try:
    train.train_and_evaluate(indivisible, sys.argv[1])
  except ValueError as error:
    print(error)
state, _ = train.train_and_evaluate(config, sys.argv[1])
with open(sys.argv[3], 'wb') as f:
  pickle.dump(list(params_after_each_step(config)), f)
one_device = jax.sharding.Mesh(jax.devices()[:1], ('batch',))
print(len(state.params['fc1']['kernel'].sharding.device_set), 'devices hold the parameters; FLOPs per device in a',
      'training step and an evaluation batch:', *flops_per_device(config, train.device_mesh()), 'on 8,',
      *flops_per_device(config, one_device), 'on 1')
"""


def flops_per_device(config, mesh):
  """XLA's counts of the floating-point operations one device of `mesh` runs in the compiled training step of
  `config` and in its evaluation of a batch."""
  functions, data, state = training_on(config, mesh)
  keys, indices = jax.jit(functions.epoch_order, out_shardings=NamedSharding(mesh, PartitionSpec()))(0)
  step = train.jit_with_xla_options(functions.train_step).lower(state, data, indices, keys, 0).compile()
  eval_data = input_pipeline.load_split(config, 'test')
  batch_size = train.evaluation_batch_size(len(eval_data['label']), config.eval_batch_size)
  eval_batch = train.place_replicated(next(input_pipeline.eval_batches(eval_data, batch_size)), mesh)
  evaluation = train.jit_with_xla_options(functions.eval_step).lower(state.params, eval_batch).compile()
  return step.cost_analysis()['flops'], evaluation.cost_analysis()['flops']


def test_data_parallel_over_8_devices_matches_one_device(short_run, tmp_path):
  workdir = short_run[0]
  # The 8 devices are simulated CPUs, also where jax[cuda] or jax[tpu] would pick an accelerator.
  environment = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
  steps_file = tmp_path / 'steps.pkl'
  command = [sys.executable, '-c', DATA_PARALLEL_SCRIPT, str(tmp_path / 'run'), json.dumps(SHORT_RUN), str(steps_file)]
  result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  for name in ('batch_size', 'eval_batch_size'):
    assert f'config.{name}=60 is not valid; it must divide evenly over the 8 devices' in result.stdout
  last_line = result.stdout.strip().splitlines()[-1]
  numbers = re.fullmatch(
    r'(\d+) devices hold the parameters; FLOPs per device in a training step and an evaluation batch: '
    r'([\d.]+) ([\d.]+) on 8, ([\d.]+) ([\d.]+) on 1',
    last_line,
  ).groups()
  devices, flops_on_8, flops_on_1 = int(numbers[0]), np.array(numbers[1:3], float), np.array(numbers[3:], float)
  assert devices == 8
  # Each device runs its eighth of a batch (the optimiser's update, on the replicated parameters, is most of the
  # rest), rather than all of it with the same results.
  assert np.all(flops_on_1 / flops_on_8 > 7), (flops_on_1, flops_on_8)
  with open(steps_file, 'rb') as f:
    for eight_devices, one_device in zip(pickle.load(f), params_after_each_step(short_config()), strict=True):
      assert_trees_close(eight_devices, one_device, atol=1e-6)
  assert train.load_params(short_config(), str(tmp_path / 'run'))[1] == 124
  assert_runs_agree(workdir_lib.read_metrics(str(tmp_path / 'run')), workdir_lib.read_metrics(workdir))


def run_two_processes(script, tmp_path, *args):
  """Runs `script` as processes 0 and 1 of one jax.distributed run on the CPU, as `script ADDRESS ID *args`.

  Returns each process's (stdout, stderr); fails with both stderr tails if either fails or they outlast 300 s.
  """
  # A proxy setting can keep the processes from reaching their coordinator on localhost.
  environment = {name: value for name, value in os.environ.items() if not name.lower().endswith('_proxy')}
  environment.update(JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  logs = [(tmp_path / f'process_{i}.out', tmp_path / f'process_{i}.err') for i in range(2)]
  # The port stays bound until both processes end, with SO_REUSEPORT as the coordinator's gRPC server binds it, so
  # that no other process (another test's, under -n 2) can take it between its choice here and the coordinator's bind.
  with socket.socket() as reservation:
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind(('localhost', 0))
    port = reservation.getsockname()[1]
    processes = []
    for i, (out, err) in enumerate(logs):
      with open(out, 'w') as stdout, open(err, 'w') as stderr:  # The child keeps its own handles.
        command = [sys.executable, '-c', script, f'localhost:{port}', str(i), *args]
        processes.append(subprocess.Popen(command, cwd=REPO, env=environment, stdout=stdout, stderr=stderr))
    deadline = time.monotonic() + 300
    try:
      for process in processes:
        process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      pass
    finally:
      for process in processes:
        process.kill()
        process.wait()
  outputs = [(out.read_text(), err.read_text()) for out, err in logs]
  codes = [process.returncode for process in processes]
  failures = [f'process {i} exited with {code}:\n{outputs[i][1][-2000:]}' for i, code in enumerate(codes) if code]
  assert not failures, '\n'.join(failures)
  return outputs


# One process of a multi-host run: train.py's own main, counting the values that jax.device_put gathers from every
# host to check that they hold the same copy (a 50,000-image split would be gathered to every host, just to start).
MULTIHOST_PROCESS_SCRIPT = """
import runpy
import sys
import numpy as np
from jax.experimental import multihost_utils
gathered = []
check = multihost_utils.assert_equal
def counted_check(tree, fail_message=''):
  gathered.extend(np.size(x) for x in jax.tree.leaves(tree))
  check(tree, fail_message)
import jax
multihost_utils.assert_equal = counted_check
address, process_id, *flags = sys.argv[1:]
launch = [f'--coordinator_address={address}', '--num_processes=2', f'--process_id={process_id}']
sys.argv = ['train.py', '--multihost', *launch, *flags]
try:
  runpy.run_path('train.py', run_name='__main__')
finally:
  print('gathered', sum(gathered), 'values')
"""


def test_two_processes_train_like_one(short_run, tmp_path):
  workdir = short_run[0]
  flags = ['--config=configs/default.py', *(f'--config.{name}={value}' for name, value in SHORT_RUN.items())]
  outputs = run_two_processes(MULTIHOST_PROCESS_SCRIPT, tmp_path, *flags, f'--workdir={tmp_path / "run"}')
  # A checksum per array, and orbax's syncs between hosts, gather a few dozen values; the split is 4,096,000 values
  # and the state about 50,000.
  for stdout, _ in outputs:
    assert int(stdout.split('gathered ')[-1].split()[0]) < 1000, stdout
  assert train.load_params(short_config(), str(tmp_path / 'run'))[1] == 124
  # Only process 0 writes rows.
  assert_runs_agree(workdir_lib.read_metrics(str(tmp_path / 'run')), workdir_lib.read_metrics(workdir))


REPLICATE_SCRIPT = """
import sys
import jax
import numpy as np
import train
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
mesh = train.device_mesh()
same = train.place_replicated({'x': np.arange(6.0)}, mesh)['x']
print(same.shape, same.sharding.is_fully_replicated, np.asarray(same.addressable_data(0)).tolist())
try:
  train.place_replicated({'x': np.arange(6.0) + jax.process_index()}, mesh)
except AssertionError as error:
  print(str(error).split(';')[0])
"""


def test_hosts_with_different_copies_are_refused(tmp_path):
  # place_replicated takes each host's copy as it is, so it compares them first, by a checksum per array.
  for stdout, _ in run_two_processes(REPLICATE_SCRIPT, tmp_path):
    assert [line for line in stdout.splitlines() if not line.startswith('[Gloo]')] == [
      '(6,) True [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]',
      'The hosts hold different data or initial parameters',
    ]


MISSING_CONFIG = f'there is no file configs/nope.py; see {REPO}/configs/.'


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--num_processes=2'], '--coordinator_address/--num_processes/--process_id join the processes of a --multihost'),
    (['--config.model.pol=avg'], 'the config has no field \'pol\'\nDid you mean "pool" instead of "pol"?'),
    (['--config=configs/nope.py'], f'--config=configs/nope.py: {MISSING_CONFIG}'),
    # A config argument (path:argument), absl's one-dash and spaced forms, and an override, which ml_collections
    # would call an unknown flag.
    (['-config', 'configs/nope.py:arg', '--config.num_epochs=1'], f'--config=configs/nope.py:arg: {MISSING_CONFIG}'),
    (['-config=configs/nope.py'], f'--config=configs/nope.py: {MISSING_CONFIG}'),
    (['--config', 'configs/nope.py'], f'--config=configs/nope.py: {MISSING_CONFIG}'),
    (['--config=configs'], '--config=configs: there is no file configs;'),  # A directory.
    (['--config=model.py'], '--config=model.py: model.py has no get_config(); a config file returns its ConfigDict'),
    # ml_collections would run the first file's config, having loaded the second into its module.
    (['--config=configs/default.py', '--config=model.py'], '--config is given 2 times (configs/default.py, model.py)'),
    # ml_collections would define --config.num_epochs once for each file, and fail on the second.
    (['--config=configs/cifar10.py', '-config', 'configs/default.py', '--config.num_epochs=1'],
     '--config is given 2 times (configs/cifar10.py, configs/default.py); give one config file'),
    # One given in a flag file, which absl reads in place of --flagfile.
    (['--flagfile={flagfile}'], f'--config=configs/nope.py: {MISSING_CONFIG}'),
    # After '--' it is an argument, not a flag.
    (['--', '--config=configs/nope.py'], "Unexpected arguments: ['--config=configs/nope.py']"),
    (['--multihost'], '--multihost could not join a cluster (coordinator_address should be defined.)'),
  ],
  ids=['process_flags_without_multihost', 'mistyped_config_field', 'missing_config_file', 'missing_config_file_spaced',
       'missing_config_file_one_dash', 'missing_config_file_two_dashes_spaced', 'config_directory',
       'not_a_config_file', 'second_file_not_a_config',
       'two_configs_with_an_override', 'missing_config_file_in_flagfile',
       'config_after_dashes', 'multihost_alone'],
)  # fmt: skip
def test_bad_flags_are_refused_by_name_before_any_work(tmp_path, flags, message):
  flagfile = tmp_path / 'flags'
  flagfile.write_text('--config=configs/nope.py\n')
  # Without the variables by which JAX would find a SLURM, Open MPI or Kubernetes cluster to join.
  environment = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'KUBERNETES_'))}
  gives_a_config = flags[0] == '--config' or flags[0].startswith(('--config=', '-config', '--flagfile='))
  config = [] if gives_a_config else ['--config=configs/default.py']
  result = subprocess.run(
    [sys.executable, 'train.py', *config, f'--workdir={tmp_path / "run"}',
     *(flag.format(flagfile=flagfile) for flag in flags)],
    cwd=REPO, capture_output=True, text=True, env=environment,
  )  # fmt: skip
  assert result.returncode != 0
  assert message in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'run').exists()


CPU_STEP_FAULTS_SCRIPT = """
import resource
import jax
import numpy as np
import train
from configs import default
train.tune_cpu_runtime()
config = default.get_config()
config.input_shape = (32, 32, 3)
state = train.create_initial_state(config, steps_per_epoch=1)
rng = np.random.default_rng(0)
images = rng.normal(size=(2048, 32, 32, 3)).astype(np.float32)
batch = jax.device_put({'image': images, 'label': np.zeros(2048, np.int32)})
step = jax.jit(train.train_step, donate_argnums=0)
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  state, metrics = jax.block_until_ready(step(state, batch))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(np.median(faults)))
"""


@pytest.mark.skipif(jax.default_backend() != 'cpu' or not sys.platform.startswith('linux'), reason='glibc, CPU steps')
def test_tune_cpu_runtime_lets_steps_reuse_their_buffers_without_page_faults():
  # Each of these steps has over 64 MB of temporaries (C=3, B=2048). Without tune_cpu_runtime they are mapped
  # afresh every step: 40,000 page faults per step. With its malloc thresholds but asynchronous dispatch, XLA's
  # worker threads allocate them, and fault as often. (The heap still grows now and then, hence the median.)
  result = subprocess.run([sys.executable, '-c', CPU_STEP_FAULTS_SCRIPT], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert int(result.stdout) < 100


MALLOPT_CALLS_SCRIPT = """
import ctypes, sys
import jax
import train
calls = []
class Libc:
  def mallopt(self, *args):
    calls.append(args)
ctypes.CDLL = lambda name: Libc()
jax.default_backend = lambda: sys.argv[1]
train.tune_cpu_runtime()
print(calls)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
@pytest.mark.parametrize(
  'backend, calls', [('cpu', [(-3, 1 << 30), (-1, 1 << 30)]), ('gpu', []), ('tpu', [])]
)  # fmt: skip
def test_tune_cpu_runtime_sets_malloc_thresholds_only_for_cpu_steps(backend, calls):
  # (M_MMAP_THRESHOLD, 1 GiB) and (M_TRIM_THRESHOLD, 1 GiB): a GPU or TPU run keeps glibc's defaults, and so
  # returns freed host memory to the OS.
  script = [sys.executable, '-c', MALLOPT_CALLS_SCRIPT, backend]
  result = subprocess.run(script, cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(calls)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU compiler option')
def test_cpu_training_step_is_compiled_without_ynnpack_fusions():
  # XLA:CPU's default hands the step's dots to YNNPACK; train.jit_with_xla_options, which compiles every training
  # program, keeps them XLA's own (faster for these narrow matmuls). The option is experimental: this fails if XLA
  # rejects or ignores it.
  config = short_config()
  data = jax.device_put(input_pipeline.load_split(config, 'train'))
  functions = train.training_functions(config, 4000, NamedSharding(train.device_mesh(), PartitionSpec('batch')))
  state = train.create_train_state(config, jax.random.key(0), 62)
  keys, indices = functions.epoch_order(0)

  def compiled_text(jit):
    return jit(functions.train_step).lower(state, data, indices, keys, 0).compile().as_text()

  if 'ynn_fusion' not in compiled_text(jax.jit):
    pytest.skip("this jaxlib's XLA:CPU makes no YNNPACK fusions of the step by default")
  assert 'ynn_fusion' not in compiled_text(train.jit_with_xla_options)
