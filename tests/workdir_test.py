"""A workdir keeps what a run wrote: every distinct config it ran with, and every metrics row."""

import json
import os
import re
import types

import jax
import numpy as np
import pytest

import workdir
from configs import default


def test_each_change_of_config_is_saved_and_none_is_overwritten(tmp_path):
  first, second, third = default.get_config(), default.get_config(), default.get_config()
  second.learning_rate, third.learning_rate = 0.1, 0.2
  # A run resumed at step 62 with lr 0.1, stopped before its next checkpoint and resumed twice more from there.
  for config, step in ((first, 0), (first, 62), (second, 62), (second, 62), (third, 62), (second, 62)):
    workdir.save_config(config, str(tmp_path), step)
  saved = {name: json.loads((tmp_path / name).read_text())['learning_rate'] for name in os.listdir(tmp_path)}
  assert saved == {
    'config.json': first.learning_rate,
    'config_step62.json': 0.1,
    'config_step62_2.json': 0.2,
    'config_step62_3.json': 0.1,
  }
  latest = [os.path.basename(path) for path in workdir.saved_configs(str(tmp_path))]
  assert latest == ['config.json', 'config_step62.json', 'config_step62_2.json', 'config_step62_3.json']


def test_unused_path_numbers_from_2_and_takes_what_is_free(tmp_path):
  stem = str(tmp_path / 'flatten')
  assert workdir.unused_path(stem, '.png') == f'{stem}.png'
  (tmp_path / 'flatten.png').touch()
  (tmp_path / 'flatten_3.png').touch()
  assert workdir.unused_path(stem, '.png') == f'{stem}_2.png'
  assert workdir.unused_path(stem, '.png', taken=lambda path: not path.endswith('_4.png')) == f'{stem}_4.png'


def test_a_config_appears_whole_or_not_at_all(tmp_path, monkeypatch):
  workdir.save_config(default.get_config(), str(tmp_path), 0)
  changed = default.get_config()
  changed.learning_rate = 0.1

  def killed(source, destination):
    raise SystemExit('killed')  # The run stops after writing the text, before it takes its name.

  monkeypatch.setattr(os, 'replace', killed)
  with pytest.raises(SystemExit):
    workdir.save_config(changed, str(tmp_path), 62)
  assert [os.path.basename(path) for path in workdir.saved_configs(str(tmp_path))] == ['config.json']
  assert workdir.load_config(str(tmp_path)).learning_rate == default.get_config().learning_rate


def test_a_damaged_config_is_named_and_left_untouched(tmp_path):
  workdir.save_config(default.get_config(), str(tmp_path), 0)
  damaged = (tmp_path / 'config.json').read_text()[:100]
  (tmp_path / 'config.json').write_text(damaged)
  with pytest.raises(ValueError, match=r'config\.json cannot be read as a saved config \(.*\); it was left untouched'):
    workdir.load_config(str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == damaged


def test_the_last_saved_config_is_the_latest_runs(tmp_path):
  wide = default.get_config()
  wide.model.conv_features = (12, 24)
  workdir.save_config(default.get_config(), str(tmp_path), 0)
  workdir.save_config(wide, str(tmp_path), 0)  # Re-run from scratch (no checkpoint yet) with another model.
  workdir.save_config(wide, str(tmp_path), 310)
  for name in ('config_step10.json', 'config_step2_2.json'):  # Sorted by step, not as text.
    (tmp_path / name).write_text('{}')
  names = [os.path.basename(path) for path in workdir.saved_configs(str(tmp_path))]
  assert names == ['config.json', 'config_step0.json', 'config_step2_2.json', 'config_step10.json']
  assert json.loads((tmp_path / 'config_step0.json').read_text())['model']['conv_features'] == [12, 24]


def test_a_resumed_run_in_a_workdir_without_config_json_saves_its_config_as_the_latest(tmp_path):
  configs = [default.get_config() for _ in range(3)]
  for config, learning_rate in zip(configs, (0.1, 0.2, 0.3), strict=True):
    config.learning_rate = learning_rate
  workdir.save_config(configs[0], str(tmp_path), 0)
  workdir.save_config(configs[1], str(tmp_path), 8)
  os.rename(tmp_path / 'config.json', tmp_path / 'damaged_config.json')  # As load_config's error advises.
  workdir.save_config(configs[2], str(tmp_path), 16)
  assert sorted(os.listdir(tmp_path)) == ['config_step16.json', 'config_step8.json', 'damaged_config.json']
  assert workdir.load_config(str(tmp_path)).learning_rate == 0.3
  assert workdir.load_config(str(tmp_path), 24).learning_rate == 0.3  # Checkpoint 24 is the latest run's.


def test_a_run_starting_before_a_saved_runs_start_moves_that_config_aside(tmp_path):
  # Runs resumed at step 8 with lr 0.1 and at 16 with lr 0.2 (config_step8.json, config_step16.json); then their
  # checkpoints were deleted, or set aside as corrupt, and a run starts from 0 again with lr 0.5: either saved config
  # would be taken for its config.
  configs = {}
  for learning_rate in (0.1, 0.2, 0.5):
    configs[learning_rate] = default.get_config()
    configs[learning_rate].learning_rate = learning_rate
  workdir.save_config(default.get_config(), str(tmp_path), 0)
  workdir.save_config(configs[0.1], str(tmp_path), 8)
  workdir.save_config(configs[0.2], str(tmp_path), 16)
  (tmp_path / 'superseded_configs').mkdir()
  (tmp_path / 'superseded_configs' / 'config_step8.json').write_text('{"from": "an earlier time"}')
  workdir.save_config(configs[0.5], str(tmp_path), 0)
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'config_step0.json', 'superseded_configs']
  moved = tmp_path / 'superseded_configs'
  assert sorted(os.listdir(moved)) == ['config_step16.json', 'config_step8.json', 'config_step8_2.json']
  assert json.loads((moved / 'config_step8_2.json').read_text())['learning_rate'] == 0.1
  assert json.loads((moved / 'config_step16.json').read_text())['learning_rate'] == 0.2
  assert workdir.load_config(str(tmp_path)).learning_rate == 0.5
  assert workdir.load_config(str(tmp_path), 16).learning_rate == 0.5  # Checkpoint 16 is now the new run's.


def test_a_first_run_resumed_from_a_checkpoint_alone_saves_config_step_n(tmp_path):
  workdir.save_config(default.get_config(), str(tmp_path), 16)  # Every config was moved out of the workdir.
  assert os.listdir(tmp_path) == ['config_step16.json']


def test_load_config_is_the_latest_run_before_the_checkpoint(tmp_path):
  for learning_rate, step in ((0.1, 0), (0.2, 62), (0.3, 124)):
    config = default.get_config()
    config.learning_rate = learning_rate
    workdir.save_config(config, str(tmp_path), step)
  assert workdir.load_config(str(tmp_path)).learning_rate == 0.3
  assert workdir.load_config(str(tmp_path), 124).learning_rate == 0.2  # The run that made checkpoint 124.
  assert workdir.load_config(str(tmp_path), 62).learning_rate == 0.1
  assert workdir.load_config(str(tmp_path), 0) is None
  assert workdir.load_config(str(tmp_path), 200).model.conv_features == (3, 6)  # Tuples again, as in a config.


def test_a_sweep_writes_each_models_own_values(tmp_path, tensorboard_scalars):
  writer = workdir.MetricWriter(str(tmp_path), num_models=2, start_step=0)
  writer.write(5, 'test', {'loss': np.array([0.5, 1.5]), 'accuracy': np.array([0.875, 0.625])})
  writer.close()
  assert workdir.read_metrics(str(tmp_path)) == [
    {'step': 5, 'split': 'test', 'model': 0, 'loss': 0.5, 'accuracy': 0.875},
    {'step': 5, 'split': 'test', 'model': 1, 'loss': 1.5, 'accuracy': 0.625},
  ]
  assert tensorboard_scalars(tmp_path / 'model_1', 'test/loss') == [(5, 1.5)]


def test_synced_scalars_are_on_disk_while_the_writer_is_open_and_later_event_files_keep_them(
  tmp_path, tensorboard_scalars
):
  writer = workdir.MetricWriter(str(tmp_path), num_models=1, start_step=0)
  for step in (1, 2):  # Two syncs within a second: two event files, neither truncating the other.
    writer.write(step, 'train', {'loss': np.array(1 / step)})
    writer.sync()
  # Read with the writer still open, as a run killed now leaves them: TensorBoard's writer queues events until closed.
  assert tensorboard_scalars(tmp_path, 'train/loss') == [(1, 1.0), (2, 0.5)]
  writer.close()
  assert len([name for name in os.listdir(tmp_path) if name.startswith('events.out.tfevents.')]) == 2


def test_a_resumed_runs_steps_after_its_checkpoint_replace_the_earlier_runs_and_those_are_moved_aside(
  tmp_path, tensorboard_scalars
):
  killed = workdir.MetricWriter(str(tmp_path), num_models=1, start_step=0)
  for step in (10, 20, 30, 40):  # Steps 30 and 40 were logged, and the run killed before checkpoint 30 was saved.
    killed.write(step, 'train', {'loss': np.array(step / 64)})
  killed.close()
  resumed = workdir.MetricWriter(str(tmp_path), num_models=1, start_step=20)
  resumed.write(30, 'train', {'loss': np.array(0.75)})  # Exact in float32, as are the others.
  resumed.close()
  # Step 40, which the resumed run has not logged (yet, or at all: it may log at other steps, or end before), is
  # not shown as if it were this run's.
  expected = [(10, 0.15625), (20, 0.3125), (30, 0.75)]
  assert [(row['step'], row['loss']) for row in workdir.read_metrics(str(tmp_path))] == expected
  assert tensorboard_scalars(tmp_path, 'train/loss') == expected
  superseded = (tmp_path / 'superseded_metrics.jsonl').read_text().splitlines()
  assert [(row['step'], row['loss']) for row in map(json.loads, superseded)] == [(30, 0.46875), (40, 0.625)]


def test_metrics_append_to_an_empty_file(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('')  # As a run stopped before its first row leaves it.
  writer = workdir.MetricWriter(str(tmp_path), num_models=1, start_step=0)
  writer.write(1, 'train', {'loss': 2.0})
  # On disk at once: a run killed later keeps it, since its rerun writes only the rows after its checkpoint.
  assert workdir.read_metrics(str(tmp_path)) == [{'step': 1, 'split': 'train', 'loss': 2.0}]
  writer.close()


def test_a_partial_line_is_moved_aside_and_the_resumed_runs_rows_start_on_a_line_of_their_own(tmp_path):
  # As after a run killed while writing its second row, resumed from its checkpoint at step 1.
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 2.3}\n{"step": 2, "spl')
  assert workdir.read_metrics(str(tmp_path)) == [{'step': 1, 'split': 'train', 'loss': 2.3}]  # Read without it.
  writer = workdir.MetricWriter(str(tmp_path), num_models=1, start_step=1)
  writer.write(2, 'train', {'loss': 1.5})
  writer.close()
  assert (tmp_path / 'metrics.jsonl').read_text().splitlines() == [
    '{"step": 1, "split": "train", "loss": 2.3}',
    '{"step": 2, "split": "train", "loss": 1.5}',
  ]
  assert (tmp_path / 'superseded_metrics.jsonl').read_text() == '{"step": 2, "spl\n'  # As it was, ended.
  assert workdir.read_metrics(str(tmp_path / 'elsewhere')) == []


ROW = '{{"step": {}, "split": "train", "loss": 0.5}}'


@pytest.mark.parametrize(
  'metrics, superseded, kept, moved, warning',
  [
    # A whole last row that lost its newline: the next row must not be joined to it.
    ([ROW.format(1), ROW.format(2)], None, [1, 2], [], None),
    # Lines that hold no row, anywhere (bytes that are not UTF-8, a step that is no int), are moved with the rows
    # after the start, and an append to the superseded lines that was cut short is ended first.
    (
      [ROW.format(1), '\xff\xfe', ROW.format('"2"'), ROW.format('true'), ROW.format(2), ROW.format(3) + '\n'],
      ROW.format(9)[:10],
      [1, 2],
      [ROW.format(9)[:10], '\xff\xfe', ROW.format('"2"'), ROW.format('true'), ROW.format(3)],
      r'Moving 1 row\(s\) of .* after step 2, where this run starts, and 3 line\(s\) that hold no row, to',
    ),
  ],
  ids=['no_final_newline', 'lines_without_rows'],
)
def test_the_rows_after_a_runs_start_are_moved_whatever_the_files_hold(
  tmp_path, caplog, metrics, superseded, kept, moved, warning
):
  (tmp_path / 'metrics.jsonl').write_bytes('\n'.join(metrics).encode('latin-1'))
  if superseded is not None:
    (tmp_path / 'superseded_metrics.jsonl').write_bytes(superseded.encode())
  with caplog.at_level('WARNING'):
    writer = workdir.MetricWriter(str(tmp_path), num_models=1, start_step=2)
  assert re.search(warning, caplog.text) if warning else not caplog.text
  writer.write(3, 'train', {'loss': np.array(0.25)})
  writer.close()
  assert [(row['step'], row['loss']) for row in workdir.read_metrics(str(tmp_path))] == [
    *[(step, 0.5) for step in kept],
    (3, 0.25),
  ]
  superseded_path = tmp_path / 'superseded_metrics.jsonl'
  lines = superseded_path.read_bytes().decode('latin-1').splitlines() if superseded_path.exists() else []
  assert lines == moved


def test_a_move_stopped_before_metrics_jsonl_is_rewritten_has_already_kept_the_moved_rows(tmp_path, monkeypatch):
  (tmp_path / 'metrics.jsonl').write_text(f'{ROW.format(1)}\n{ROW.format(3)}\n')

  def killed(path, data):
    raise SystemExit(137)

  monkeypatch.setattr(workdir, '_write_atomically', killed)
  with pytest.raises(SystemExit):
    workdir.MetricWriter(str(tmp_path), num_models=1, start_step=2)
  assert (tmp_path / 'metrics.jsonl').read_text() == f'{ROW.format(1)}\n{ROW.format(3)}\n'  # As it was.
  assert (tmp_path / 'superseded_metrics.jsonl').read_text() == f'{ROW.format(3)}\n'  # Already there.


def test_only_process_0_sets_configs_aside(tmp_path, monkeypatch):
  workdir.save_config(default.get_config(), str(tmp_path), 0)
  changed = default.get_config()
  changed.learning_rate = 0.1
  workdir.save_config(changed, str(tmp_path), 8)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)  # Another host of a multi-host run sees the same files.
  kept = workdir.set_aside_configs_after(str(tmp_path), 0)
  assert [os.path.basename(path) for path in kept] == ['config.json', 'config_step8.json']
  assert not (tmp_path / 'superseded_configs').exists()


@pytest.mark.parametrize(
  'saved_models, config_models, advice',
  [
    (2, 1, 'set --config.num_models=2 with 2 config.learning_rates or none to resume it'),
    (1, 3, 'set --config.num_models=1 with no config.learning_rates to resume it'),
  ],
)
def test_a_checkpoint_of_another_number_of_models_names_the_settings_that_resume_it(
  tmp_path, saved_models, config_models, advice
):
  # A sweep's state, its step included, has a leading [K] axis; check_config wants one learning rate per model.
  def state(models):
    shape = (models,) if models > 1 else ()
    return {'step': np.zeros(shape, np.int32), 'params': {'kernel': np.zeros((*shape, 3), np.float32)}}

  with workdir.checkpoint_manager(str(tmp_path), max_to_keep=1) as manager:
    workdir.save_checkpoint(manager, 7, state(saved_models))
    manager.wait_until_finished()
    with pytest.raises(workdir.IncompatibleCheckpointError) as refusal:
      workdir.check_compatible(manager, jax.eval_shape(lambda: state(config_models)))
  assert f'holds {saved_models} model(s) side by side, not config.num_models={config_models} ({advice})' in str(
    refusal.value
  )


@pytest.mark.parametrize('num_different, listed_more', [(8, None), (9, '  ... and 1 more')])
def test_an_incompatible_checkpoint_lists_eight_differences_and_counts_the_rest(num_different, listed_more):
  expected = {f'w{i}': jax.ShapeDtypeStruct((1,), np.float32) for i in range(num_different)}
  found = {f'w{i}': np.zeros(2, np.float32) for i in range(num_different)}
  manager = types.SimpleNamespace(item_metadata=lambda step: {'params': found}, directory='/run/checkpoints')
  with pytest.raises(workdir.IncompatibleCheckpointError) as refusal:
    workdir._check_compatible(manager, 7, {'params': expected})
  lines = str(refusal.value).splitlines()
  assert [line.split(':')[0] for line in lines[1:9]] == [f'  params/w{i}' for i in range(8)]
  assert lines[9] == listed_more if listed_more else lines[9].startswith('Train this config')
