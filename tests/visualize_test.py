"""visualize.py on a workdir without a checkpoint and on a one-epoch run: every PNG is written, valid and not blank,
and its figure draws the values it names (kernels, flatten order, probabilities, learning curves)."""

import json
import os
import subprocess
import sys

import jax
import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import tensorflow_datasets as tfds

import input_pipeline
import model
import train
import visualize
import workdir as workdir_lib
from configs import cifar10, default

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
LAYER_PICTURES = [
  '00_input.png',
  '01_conv1_filters.png',
  '02_conv1.png',
  '03_pool1.png',
  '04_conv2_filters.png',
  '05_conv2.png',
  '06_pool2.png',
  '07_flatten.png',
  '08_fc1.png',
  '09_probabilities.png',
]


def assert_png_not_blank(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE, path
  pixels = matplotlib.image.imread(path)[..., :3]  # float [H, W, 3] in [0, 1]
  assert min(pixels.shape[:2]) >= 200, path
  assert pixels.std() > 0.05, path
  # Not one colour, nor only text on white: the images, maps and bars add many colours.
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, path


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """One epoch of training with a non-default flatten order, so config.json is not the default config."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = default.get_config()
  config.update({'num_epochs': 1, 'log_every_steps': 20})
  config.model.flatten_order = 'chw'
  train.train_and_evaluate(config, workdir)
  return workdir


def test_fresh_init_draws_every_layer(tmp_path):
  workdir = tmp_path / 'no_checkpoint'
  with pytest.raises(ValueError, match=r'--workdir=.*no_checkpoint is not a directory'):  # A mistyped path, say.
    visualize.write_pictures(str(workdir))
  workdir.mkdir()
  (tmp_path / 'pictures').mkdir()  # An empty folder is drawn into, not beside.
  paths = visualize.write_pictures(str(workdir), out_dir=str(tmp_path / 'pictures'), index=3)
  assert [os.path.basename(p) for p in paths] == LAYER_PICTURES  # No metrics.jsonl, so no learning curves.
  for path in paths:
    assert os.path.dirname(path) == str(tmp_path / 'pictures')
    assert_png_not_blank(path)
  # A directory holding only pictures of a fresh init (and a file browser's hidden file) is drawn into again.
  (workdir / 'pictures' / 'test_example_3').mkdir(parents=True)
  (workdir / '.DS_Store').write_bytes(b'')
  again = visualize.write_pictures(str(workdir), index=3)
  assert os.path.dirname(again[0]) == str(workdir / 'pictures' / 'test_example_3_2')


@pytest.mark.parametrize(
  'out_dir, message',
  [
    ('a_file', r"--out_dir='.*a_file' is not a directory; name a new or empty one"),
    ('', r"--out_dir='' is empty; name a new or empty one"),
    ('drawn', r'--out_dir=.*drawn already holds files; name a new or empty directory'),
    ('a_file/pictures', r"--out_dir='.*a_file/pictures' cannot be made \(.*\); name a directory that can"),
  ],
)
def test_an_out_dir_that_is_not_a_new_or_empty_directory_is_refused_before_anything_is_read(
  tmp_path, monkeypatch, out_dir, message
):
  (tmp_path / 'a_file').write_text('mine')
  (tmp_path / 'drawn').mkdir()
  (tmp_path / 'drawn' / '09_probabilities.png').write_text('an earlier drawing')
  (tmp_path / 'run').mkdir()
  monkeypatch.setattr(visualize, 'load_params', lambda *args: pytest.fail('a checkpoint was read'))
  with pytest.raises(ValueError, match=message):
    visualize.write_pictures(str(tmp_path / 'run'), out_dir=str(tmp_path / out_dir) if out_dir else '')
  assert sorted(os.listdir(tmp_path)) == ['a_file', 'drawn', 'run']
  assert (tmp_path / 'a_file').read_text() == 'mine'
  assert os.listdir(tmp_path / 'drawn') == ['09_probabilities.png'] and os.listdir(tmp_path / 'run') == []


def test_an_index_outside_the_test_split_is_refused_before_the_out_dir_is_made_or_a_checkpoint_read(
  tmp_path, monkeypatch
):
  (tmp_path / 'run').mkdir()  # An empty workdir: the default config, whose test split holds 1,000 digits.
  monkeypatch.setattr(visualize, 'load_params', lambda *args: pytest.fail('a checkpoint was read'))
  with pytest.raises(
    ValueError, match=r'^index=1000 is not valid; the embedded_mnist test split has examples 0 to 999'
  ):
    visualize.write_pictures(str(tmp_path / 'run'), out_dir=str(tmp_path / 'pictures'), index=1000)
  assert os.listdir(tmp_path) == ['run'] and os.listdir(tmp_path / 'run') == []


def test_a_directory_of_files_without_a_saved_config_is_not_drawn_into(trained_workdir):
  # Say, the run's checkpoints/ folder given for the run: a fresh init drawn there would pass for its pictures.
  checkpoints = os.path.join(trained_workdir, 'checkpoints')
  listing = sorted(os.listdir(checkpoints))
  with pytest.raises(ValueError, match=r'--workdir=.*checkpoints holds files but no saved config .* not a training'):
    visualize.write_pictures(checkpoints)
  assert sorted(os.listdir(checkpoints)) == listing


def drawn_figures(monkeypatch) -> dict:
  """{picture name: (figure, title)} of every PNG the next write_pictures draws, recorded as it saves them."""
  figures = {}
  save = visualize._save

  def recording_save(fig, title, source, path):
    figures[os.path.basename(path)[3:-4]] = fig, title
    return save(fig, title, source, path)

  monkeypatch.setattr(visualize, '_save', recording_save)
  return figures


def test_each_picture_draws_its_layers_arrays(tmp_path, monkeypatch):
  config = default.get_config()
  config.model.flatten_order = 'chw'  # Not the identity, so the drawing must take it from the config.
  workdir_lib.save_config(config, str(tmp_path), 0)
  drawn = []
  for name in ('_draw_filters', '_draw_maps', '_draw_flatten', '_draw_bars'):  # _draw_input draws with _draw_maps.
    draw = getattr(visualize, name)
    monkeypatch.setattr(visualize, name, lambda *args, draw=draw, **kwargs: drawn.append(args) or draw(*args, **kwargs))
  visualize.write_pictures(str(tmp_path), index=3)
  params = model.init_params(config, jax.random.key(config.seed))  # The fresh init drawn: no checkpoint.
  image, _ = input_pipeline.load_example(config, 'test', 3)
  cnn = model.create_model(config)
  outputs = {k: v[0] for k, v in cnn.apply({'params': params}, image[None], method=model.CNN.layer_outputs).items()}
  expected = [
    (image,),
    (params['conv1']['kernel'],),
    (outputs['conv1'],),
    (outputs['pool1'],),
    (params['conv2']['kernel'],),
    (outputs['conv2'],),
    (outputs['pool2'],),
    (outputs['flatten'], (5, 5, 6), model.flatten_permutation('chw', (5, 5, 6), 0)),
    (outputs['fc1'], 'unit'),
    (jax.nn.softmax(outputs['fc2']), 'class'),
  ]
  for arguments, expected_arguments in zip(drawn, expected, strict=True):
    for argument, expected_argument in zip(arguments, expected_arguments, strict=True):
      if isinstance(expected_argument, (str, tuple)):
        assert argument == expected_argument
      else:
        np.testing.assert_allclose(argument, expected_argument, rtol=1e-6)


def test_filters_show_each_filters_slice_per_input_channel_on_a_scale_symmetric_about_zero():
  kernel = np.random.default_rng(0).uniform(-1, 1, size=(5, 4, 2, 3)).astype(np.float32)
  kernel[0, 0, 1, 2] = -3.0  # The largest magnitude is negative: white stays 0 only if the scale is symmetric.
  fig = visualize._draw_filters(kernel)
  for f in range(3):  # Row f is filter f, one panel per input channel.
    for c in range(2):
      shown = fig.axes[2 * f + c].images[0]
      np.testing.assert_array_equal(shown.get_array(), kernel[:, :, c, f])
      assert shown.get_clim() == (-3.0, 3.0)


def test_feature_maps_share_one_colour_scale():
  maps = np.random.default_rng(0).normal(size=(10, 10, 6)).astype(np.float32)
  maps[..., 4] *= 10  # One map spans far more than the others: each on its own scale would hide that.
  fig = visualize._draw_maps(maps)
  for c in range(6):
    shown = fig.axes[c].images[0]
    np.testing.assert_array_equal(shown.get_array(), maps[..., c])
    assert shown.get_clim() == (maps.min(), maps.max())


def test_a_colour_image_is_drawn_in_colour_and_each_conv1_filter_as_one_slice_per_channel(tmp_path, monkeypatch):
  config = cifar10.get_config()
  config.data_dir = str(tmp_path / 'tfds')
  workdir_lib.save_config(config, str(tmp_path), 0)
  figures = {}

  def keep_figure(fig, title, source, path):
    figures[os.path.basename(path)] = fig
    return path

  monkeypatch.setattr(visualize, '_save', keep_figure)
  with tfds.testing.mock_data(num_examples=4):
    visualize.write_pictures(str(tmp_path), out_dir=str(tmp_path / 'pictures'), index=2)
    image, _ = input_pipeline.load_example(config, 'test', 2)
  (input_axes,) = figures['00_input.png'].axes  # One RGB picture, not a panel per channel.
  np.testing.assert_allclose(
    input_axes.images[0].get_array(), (image - image.min()) / (image.max() - image.min()), rtol=1e-6
  )
  # 3 filters, each a 5x5x3 volume: a row of one 5x5 slice per input channel.
  kernel = visualize.load_params(config, str(tmp_path))[0]['conv1']['kernel']
  panels = [ax.images[0].get_array() for ax in figures['01_conv1_filters.png'].axes if ax.images]
  assert len(panels) == 3 * 3
  for f in range(3):
    for c in range(3):
      np.testing.assert_array_equal(panels[3 * f + c], kernel[:, :, c, f])


def test_flatten_bars_are_coloured_by_source_channel_and_rows_marked():
  volume = (5, 5, 6)
  vector = np.arange(150, dtype=np.float32) + 1
  chw = model.flatten_permutation('chw', volume, 0)
  ax = visualize._draw_flatten(vector, volume, chw).axes[0]
  assert (
    ax.get_title() == 'positions 0, 1, 2, 3, ... hold the values at (h, w, c) = (0,0,0), (0,1,0), (0,2,0), (0,3,0), ...'
  )
  assert len(ax.containers) == 6
  for channel, bars in enumerate(ax.containers):  # 'chw': positions 25c to 25c + 24 hold channel c.
    positions = np.arange(25 * channel, 25 * channel + 25)
    np.testing.assert_array_equal([bar.get_x() + bar.get_width() / 2 for bar in bars], positions)
    np.testing.assert_array_equal([bar.get_height() for bar in bars], vector[positions])
    assert {bar.get_facecolor() for bar in bars} == {matplotlib.colors.to_rgba(f'C{channel}')}
  assert not ax.texts  # Each row h is spread over the vector: no row markers.
  ax = visualize._draw_flatten(vector, volume, model.flatten_permutation('hwc', volume, 0)).axes[0]
  assert [(text.get_text(), text.get_position()[0]) for text in ax.texts] == [
    (f' h={h}', 30 * h) for h in range(5)
  ]  # fmt: skip


def test_probabilities_are_the_softmax_of_the_logits_with_the_label_in_orange(tmp_path, monkeypatch):
  config = default.get_config()
  params = model.init_params(config, jax.random.key(config.seed))  # What a workdir without checkpoints draws.
  test = input_pipeline.load_split(config, 'test')
  logits = model.create_model(config).apply({'params': params}, test['image'][:20])
  index = int(np.flatnonzero(np.argmax(logits, -1) != test['label'][:20])[0])  # Predicted is not the label.
  figures = drawn_figures(monkeypatch)
  visualize.write_pictures(str(tmp_path), index=index)
  fig, title = figures['probabilities']
  bars = fig.axes[0].patches
  np.testing.assert_allclose([bar.get_height() for bar in bars], jax.nn.softmax(logits[index]), rtol=1e-5)
  orange = [i for i, bar in enumerate(bars) if bar.get_facecolor() == matplotlib.colors.to_rgba('C1')]
  assert orange == [test['label'][index]]
  assert f'label {test["label"][index]} (orange), predicted {np.argmax(logits[index])}' in title
  fc1 = model.create_model(config).apply({'params': params}, test['image'][index : index + 1], method='layer_outputs')
  assert figures['fc1'][1] == f'fc1 [100] after relu: {np.sum(fc1["fc1"] > 0)} of 100 positive'


def test_a_sweeps_model_is_drawn_with_its_own_learning_curves(tmp_path, monkeypatch):
  config = default.get_config()
  config.num_models = 2
  workdir_lib.save_config(config, str(tmp_path), 0)
  rows = [
    {'step': s, 'split': 'train', 'model': k, 'loss': 2.0 / s + k, 'accuracy': 0.1 * s + k / 2}
    for s in (1, 2)
    for k in (0, 1)
  ]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
  figures = drawn_figures(monkeypatch)
  paths = visualize.write_pictures(str(tmp_path), model_index=1)
  assert os.path.dirname(paths[0]) == str(tmp_path / 'pictures' / 'test_example_0_model_1')  # Beside model 0's.
  (train_loss,), (train_accuracy,) = (ax.lines for ax in figures['learning_curves'][0].axes)
  np.testing.assert_array_equal(train_loss.get_ydata(), [3.0, 2.0])  # Model 1's.
  np.testing.assert_array_equal(train_accuracy.get_ydata(), [0.6, 0.7])


def test_a_run_stopped_before_its_first_metrics_row_gets_no_empty_learning_curves(tmp_path, monkeypatch):
  workdir_lib.save_config(default.get_config(), str(tmp_path), 0)
  (tmp_path / 'metrics.jsonl').write_text('')
  figures = drawn_figures(monkeypatch)
  visualize.write_pictures(str(tmp_path))
  assert list(figures) == [name[3:-4] for name in LAYER_PICTURES]


@pytest.mark.parametrize('model_index', [2, -1], ids=['past_the_sweep', 'negative'])
def test_a_model_the_sweep_lacks_is_refused_before_the_test_example_is_read(tmp_path, monkeypatch, model_index):
  config = default.get_config()
  config.num_models = 2
  workdir_lib.save_config(config, str(tmp_path), 0)
  splits_read = []
  monkeypatch.setattr(input_pipeline, 'load_example', lambda config, split, index: splits_read.append(split))
  with pytest.raises(ValueError, match=rf'--model={model_index} is not valid; the workdir holds models 0 to 1'):
    visualize.write_pictures(str(tmp_path), out_dir=str(tmp_path / 'pictures'), model_index=model_index)
  assert splits_read == [] and os.listdir(tmp_path) == ['config.json']  # Not even the --out_dir made.


def test_a_workdir_that_is_a_file_is_refused_by_name(tmp_path):
  (tmp_path / 'run').write_text('not a directory')
  with pytest.raises(ValueError, match=r'is not a directory'):
    visualize.write_pictures(str(tmp_path / 'run'))


def test_fresh_init_is_named_as_such(tmp_path):
  _, source = visualize.load_params(default.get_config(), str(tmp_path))
  assert source.startswith('FRESH INIT')


def test_trained_run_draws_every_layer_and_the_learning_curves(trained_workdir):
  paths = visualize.write_pictures(trained_workdir)
  assert [os.path.basename(p) for p in paths] == [*LAYER_PICTURES, '10_learning_curves.png']
  for path in paths:
    assert os.path.dirname(path) == os.path.join(trained_workdir, 'pictures', 'test_example_0')
    assert_png_not_blank(path)
  # Another example goes beside the first, and the same example drawn again (after more training, say) too: into
  # test_example_0_2, not over the first drawing.
  written = {path: os.stat(path).st_mtime_ns for path in paths}
  assert os.path.dirname(visualize.write_pictures(trained_workdir, index=1)[0]).endswith('test_example_1')
  again = visualize.write_pictures(trained_workdir)
  assert {os.path.dirname(path) for path in again} == {os.path.join(trained_workdir, 'pictures', 'test_example_0_2')}
  assert {path: os.stat(path).st_mtime_ns for path in paths} == written
  _, source = visualize.load_params(visualize.load_config(trained_workdir), trained_workdir)
  assert source == 'checkpoint at step 62'


def test_config_json_is_loaded_with_tuples(trained_workdir):
  config = visualize.load_config(trained_workdir)
  assert config.model.flatten_order == 'chw'
  assert config.input_shape == (32, 32, 1)
  assert config.model.conv_features == (3, 6)
  assert config.model.hidden_features == (100,)


def test_the_latest_runs_config_is_loaded(tmp_path):
  wide = default.get_config()
  wide.model.conv_features = (12, 24)
  workdir_lib.save_config(default.get_config(), str(tmp_path), 0)
  workdir_lib.save_config(wide, str(tmp_path), 0)  # Re-run from scratch in the same workdir with another model.
  assert visualize.load_config(str(tmp_path)).model.conv_features == (12, 24)


def test_later_metrics_lines_supersede_earlier_ones(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [
    {'step': 10, 'split': 'train', 'loss': 2.0, 'accuracy': 0.1},
    {'step': 20, 'split': 'test', 'loss': 1.0, 'accuracy': 0.5},
    {'step': 10, 'split': 'train', 'loss': 1.5, 'accuracy': 0.2},  # A resumed run's, before they were moved aside.
  ]
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows) + '{"step": 30, "spl\n')
  metrics = visualize.read_metrics(str(tmp_path))
  assert metrics == {'train': {10: rows[2]}, 'test': {20: rows[1]}}


def test_a_sweeps_metrics_are_read_per_model(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': 20, 'split': 'train', 'model': k, 'loss': 2.0 - k, 'accuracy': 0.1 * k} for k in range(2)]
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  assert visualize.read_metrics(str(tmp_path), model_index=1) == {'train': {20: rows[1]}}


def test_a_sweeps_fresh_init_is_model_k_with_seed_plus_k(tmp_path):
  config = default.get_config()
  config.num_models = 2
  params, source = visualize.load_params(config, str(tmp_path), model_index=1)
  assert source == 'FRESH INIT (no checkpoint), seed 1, model 1 of 2'
  jax.tree.map(np.testing.assert_array_equal, params, model.init_params(config, jax.random.key(1)))
  with pytest.raises(ValueError, match=r'model=2 .* models 0 to 1'):
    visualize.load_params(config, str(tmp_path), model_index=2)


def test_a_sweeps_model_k_is_slice_k_of_its_checkpoint(tmp_path):
  config = default.get_config()
  config.num_models = 3
  state = train.create_initial_state(config, steps_per_epoch=1)
  # Model k's parameters + 10 + k: unlike any fresh init, and unlike each other's.
  offsets = np.arange(3, dtype=np.float32) + 10
  params = jax.tree.map(lambda p: p + offsets.reshape(3, *[1] * (p.ndim - 1)), state.params)
  workdir_lib.save_config(config, str(tmp_path), 0)
  with workdir_lib.checkpoint_manager(str(tmp_path), max_to_keep=1) as manager:
    workdir_lib.save_checkpoint(manager, 0, state.replace(params=params))
  for k in range(3):
    drawn, source = visualize.load_params(visualize.load_config(str(tmp_path)), str(tmp_path), model_index=k)
    assert source == f'checkpoint at step 0, model {k} of 3'
    jax.tree.map(lambda a, b, k=k: np.testing.assert_array_equal(a, b[k]), drawn, params)


@pytest.mark.parametrize('index', [1000, -1])
def test_invalid_index_names_the_range(tmp_path, index):
  with pytest.raises(ValueError, match=rf'index={index} is not valid; the embedded_mnist test split .* 0 to 999'):
    visualize.write_pictures(str(tmp_path), index=index)
  assert os.listdir(tmp_path) == []


def test_importing_the_drawing_tools_leaves_matplotlib_alone():
  # They draw on matplotlib Figures, which need no backend: a notebook that imports them keeps its own.
  script = (
    'import matplotlib, sys, explain, visualize; print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)'
  )
  environment = {**os.environ, 'MPLBACKEND': 'svg'}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', script], cwd=repo, env=environment, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['svg', 'False']
