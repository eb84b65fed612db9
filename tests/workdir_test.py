"""A workdir keeps what a run wrote: every distinct config it ran with, and every metrics row."""

import json
import os

import workdir
from configs import default


def test_each_distinct_config_is_saved_once_and_none_is_overwritten(tmp_path):
  first, second, third = default.get_config(), default.get_config(), default.get_config()
  second.learning_rate, third.learning_rate = 0.1, 0.2
  for config, step in ((first, 0), (first, 62), (second, 62), (second, 62), (third, 62), (second, 62)):
    workdir.save_config(config, str(tmp_path), step)
  saved = {name: json.loads((tmp_path / name).read_text())['learning_rate'] for name in os.listdir(tmp_path)}
  # A run resumed at step 62 with lr 0.1, stopped before its next checkpoint and resumed again with lr 0.2.
  assert saved == {'config.json': first.learning_rate, 'config_step62.json': 0.1, 'config_step62_2.json': 0.2}


def test_metrics_resume_on_a_fresh_line_after_a_partial_one(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 2.3}\n{"step": 2, "spl')
  writer = workdir.MetricWriter(str(tmp_path))  # As after a run killed while writing its second row.
  writer.write(2, 'train', {'loss': 1.5})
  writer.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert lines[0] == '{"step": 1, "split": "train", "loss": 2.3}' and lines[1] == '{"step": 2, "spl'  # Kept as is.
  assert json.loads(lines[2]) == {'step': 2, 'split': 'train', 'loss': 1.5}
