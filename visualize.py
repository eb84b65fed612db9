"""Pictures of one test digit flowing through the network: one PNG per stage, from the input to the probabilities.

    python visualize.py --workdir=runs/default [--index=0] [--model=0] [--out_dir=DIR]

The config is the last one the workdir's runs saved (config.json, or the latest config_step<N>.json) and the
parameters come from the workdir's latest checkpoint; without one, a fresh init is drawn and every title says so. An
existing empty directory draws a fresh init of configs/default.py; one holding files but no saved config is refused,
as are an --out_dir that holds files, a --model the workdir does not hold and an --index outside the test split.
The image is test example --index of the config's dataset. When <workdir>/metrics.jsonl holds rows, the learning
curves are drawn too. The PNGs go to <workdir>/pictures/test_example_<index>[_model_<k>]/ (or, when that is there
already, <folder>_2/, _3, ...), unless --out_dir names a new or empty directory for them.
"""

import os
import textwrap

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure

import input_pipeline
import model
import train
import workdir as workdir_lib
from configs import default


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the latest run in workdir (the last it saved), or the default config when there is none."""
  config = workdir_lib.load_config(workdir)
  if config is None:
    logging.info('No config in %s; using configs/default.py.', workdir)
    return default.get_config()
  return config


def load_params(config: ml_collections.ConfigDict, workdir: str, model_index: int = 0) -> tuple[dict, str]:
  """(params, where they came from, for the titles): the latest checkpoint, else a fresh init.

  A sweep (config.num_models = K > 1) checkpoints K models; model `model_index` is taken, whose seed is seed + k.
  """
  num_models = config.get('num_models', 1)
  _check_model_index(num_models, model_index)
  of_sweep = f', model {model_index} of {num_models}' if num_models > 1 else ''
  loaded = train.load_params(config, workdir)
  if loaded is None:
    seed = config.seed + model_index
    logging.warning('No checkpoint in %s: drawing a fresh init (seed %d).', workdir, seed)
    return model.init_params(config, jax.random.key(seed)), f'FRESH INIT (no checkpoint), seed {seed}{of_sweep}'
  params, step = loaded
  if num_models > 1:
    params = jax.tree.map(lambda p: p[model_index], params)
  return params, f'checkpoint at step {step}{of_sweep}'


def _check_model_index(num_models: int, model_index: int) -> None:
  if not 0 <= model_index < num_models:
    held = f'models 0 to {num_models - 1}' if num_models > 1 else 'one model (0)'
    raise ValueError(f'--model={model_index} is not valid; the workdir holds {held}.')


def read_metrics(workdir: str, model_index: int = 0) -> dict[str, dict[int, dict]]:
  """{split: {step: {'loss', 'accuracy'}}} of one model from workdir/metrics.jsonl (a sweep's rows carry a
  "model"); a later row for a step would supersede an earlier one (train.py moves an earlier run's aside)."""
  metrics = {}
  for row in workdir_lib.read_metrics(workdir):
    if row.get('model', 0) == model_index:
      metrics.setdefault(row['split'], {})[row['step']] = row
  return metrics


def _shape(array) -> str:
  return '[' + ', '.join(map(str, np.shape(array))) + ']'


def _save(fig, title: str, source: str, path: str) -> str:
  width = int(fig.get_figwidth() * 13)  # Characters of an 11-point title per inch at 100 dpi, so none is cut off.
  fig.suptitle('\n'.join([*textwrap.wrap(title, width), source]), fontsize=11)
  fig.savefig(path, dpi=100)
  logging.info('Wrote %s', path)
  return path


def _draw_maps(maps: np.ndarray, label: str = 'channel', cmap: str = 'viridis'):
  """[H, W, C] -> a figure of C panels on one colour scale, titled `label` 0, 1, ..."""
  channels = maps.shape[-1]
  figsize = (max(2.3 * channels + 1, 5), 3.2)
  fig = Figure(figsize=figsize, layout='constrained')
  axes = fig.subplots(1, channels, squeeze=False)
  low, high = float(maps.min()), float(maps.max())
  for c, ax in enumerate(axes[0]):
    shown = ax.imshow(maps[..., c], cmap=cmap, vmin=low, vmax=high)
    ax.set(xticks=[], yticks=[], title=f'{label} {c}')
  fig.colorbar(shown, ax=list(axes[0]), shrink=0.8)
  return fig


def _draw_input(image: np.ndarray):
  """[H, W, C]: grey for one channel, colour for three (each rescaled to [0, 1] for display)."""
  if image.shape[-1] != 3:
    return _draw_maps(image, cmap='gray')
  fig = Figure(figsize=(5, 4), layout='constrained')
  ax = fig.subplots()
  ax.imshow((image - image.min()) / max(float(image.max() - image.min()), 1e-12))
  ax.set(xticks=[], yticks=[])
  return fig


def _draw_filters(kernel: np.ndarray):
  """[kh, kw, C_in, C_out] -> a C_out x C_in grid: one row per filter, one kh x kw slice per input channel."""
  _, _, c_in, c_out = kernel.shape
  fig = Figure(figsize=(max(1.5 * c_in + 2.5, 5), 1.3 * c_out + 1.2), layout='constrained')
  axes = fig.subplots(c_out, c_in, squeeze=False)
  limit = float(np.abs(kernel).max())  # Symmetric, so white is 0 and red/blue are the signs.
  for f in range(c_out):
    for c in range(c_in):
      shown = axes[f, c].imshow(kernel[:, :, c, f], cmap='RdBu_r', vmin=-limit, vmax=limit)
      axes[f, c].set(xticks=[], yticks=[])
      if f == 0:
        axes[f, c].set_title(f'input ch {c}', fontsize=9)
    axes[f, 0].set_ylabel(f'filter {f}', fontsize=9)
  fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6)
  return fig


def _draw_flatten(vector: np.ndarray, volume_shape: tuple, perm: np.ndarray):
  """[D] -> bars coloured by the channel of the [h, w, c] volume each value comes from (`perm`: its hwc index)."""
  _, w, c = volume_shape
  source_channel = perm % c
  fig = Figure(figsize=(13, 3.4), layout='constrained')
  ax = fig.subplots()
  for channel in range(c):
    where = np.flatnonzero(source_channel == channel)
    ax.bar(where, vector[where], width=1.0, color=f'C{channel}', label=f'channel {channel}')
  ax.set(xlim=(-1, len(vector)), xlabel='position in the flattened vector', ylabel='value')
  ax.legend(title='source channel', fontsize=8, loc='center left', bbox_to_anchor=(1.0, 0.5))
  rows = perm // (w * c)
  starts = np.flatnonzero(np.diff(rows)) + 1
  if len(starts) < 10:  # Orders that keep each row h together ('hwc'): mark where each row begins.
    for start in [0, *starts]:
      ax.axvline(start - 0.5, color='0.6', lw=0.8, ls=':')
      ax.text(start, 1.0, f' h={rows[start]}', transform=ax.get_xaxis_transform(), va='top', fontsize=8)
  first = ', '.join(f'({i // c // w},{i // c % w},{i % c})' for i in perm[:4])
  ax.set_title(f'positions 0, 1, 2, 3, ... hold the values at (h, w, c) = {first}, ...', fontsize=9)
  return fig


def _draw_bars(values: np.ndarray, xlabel: str, highlight: int | None = None):
  fig = Figure(figsize=(10 if len(values) > 20 else 6, 3.4), layout='constrained')
  ax = fig.subplots()
  colors = ['C1' if i == highlight else 'C0' for i in range(len(values))]
  ax.bar(np.arange(len(values)), values, color=colors)
  ax.set(xlabel=xlabel, xlim=(-1, len(values)))
  if len(values) <= 20:
    ax.set_xticks(np.arange(len(values)))
  return fig


def _draw_learning_curves(metrics: dict[str, dict[int, dict]]):
  fig = Figure(figsize=(11, 3.8), layout='constrained')
  axes = fig.subplots(1, 2)
  for split, rows in sorted(metrics.items()):
    steps = sorted(rows)
    for ax, name in zip(axes, ('loss', 'accuracy'), strict=True):
      ax.plot(steps, [rows[s][name] for s in steps], '-' if split == 'train' else 'o-', ms=3, label=split)
  for ax, name in zip(axes, ('loss', 'accuracy'), strict=True):
    ax.set(xlabel='step', ylabel=name, title=name)
    ax.grid(alpha=0.3)
    ax.legend()
  return fig


def write_pictures(workdir: str, out_dir: str | None = None, index: int = 0, model_index: int = 0) -> list[str]:
  """Draws test example `index` through the network of `workdir` (model `model_index` of a sweep); returns the paths
  of the PNGs written."""
  if not os.path.isdir(workdir):
    raise ValueError(
      f'--workdir={workdir} is not a directory. Give a training workdir, or an existing empty directory to draw a '
      'fresh init of configs/default.py.'
    )
  # Every run saves its config first, so a directory with other files but none is not a workdir (its checkpoints/
  # folder, say): a fresh init drawn into it would pass for the run's pictures.
  others = {name for name in os.listdir(workdir) if not name.startswith('.')} - {'pictures'}
  if not workdir_lib.saved_configs(workdir) and others:
    raise ValueError(
      f'--workdir={workdir} holds files but no saved config (config.json or config_step<N>.json): it is not a '
      'training workdir. Give one, or an existing empty directory to draw a fresh init of configs/default.py.'
    )
  if out_dir is not None:
    workdir_lib.check_directory_path(out_dir, '--out_dir', 'name a new or empty one')
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      raise ValueError(
        f'--out_dir={out_dir} already holds files; name a new or empty directory, so none is overwritten.'
      )
  config = load_config(workdir)
  _check_model_index(config.get('num_models', 1), model_index)
  image, label = input_pipeline.load_example(config, 'test', index)  # Which refuses an index outside the split.
  if out_dir is not None:  # Now, rather than after the checkpoint is read.
    workdir_lib.make_directory(out_dir, '--out_dir')
  params, source = load_params(config, workdir, model_index)
  if out_dir is None:
    # One folder per drawing, so that drawing another example or model keeps the pictures already drawn, and one
    # drawn again (of a later checkpoint, say) goes to <folder>_2, ...
    of_sweep = f'_model_{model_index}' if config.get('num_models', 1) > 1 else ''
    folder = os.path.join(workdir, 'pictures', f'test_example_{index}{of_sweep}')
    out_dir = workdir_lib.unused_path(folder, taken=os.path.lexists)
  cnn = model.create_model(config)
  outputs = cnn.apply({'params': params}, image[None], method=model.CNN.layer_outputs)
  outputs = {name: np.asarray(value[0]) for name, value in outputs.items()}
  shapes = model.layer_shapes(config)
  names = list(outputs)
  logits_name = names[-1]
  activation = config.model.activation
  os.makedirs(out_dir, exist_ok=True)
  paths = []

  def save(fig, name, title):
    paths.append(_save(fig, title, source, os.path.join(out_dir, f'{len(paths):02d}_{name}.png')))

  save(_draw_input(image), 'input', f'input {_shape(image)}: {config.dataset} test image {index}, label {label}')
  for i, name in enumerate(names):
    value = outputs[name]
    if name.startswith('conv'):
      kernel = np.asarray(params[name]['kernel'])
      kh, kw, c_in, c_out = kernel.shape
      title = (
        f'{name} filters {_shape(kernel)} (kh, kw, C_in, C_out): each of the {c_out} filters is one {kh}x{kw}x{c_in} '
        f'volume\nspanning all {c_in} input channel(s); a row shows its {c_in} slice(s), whose products are summed'
      )
      save(_draw_filters(kernel), f'{name}_filters', title)
      save(
        _draw_maps(value, label='map of filter'),
        name,
        f'{name} output {_shape(value)}: one map per filter, after {activation}',
      )
    elif name.startswith('pool'):
      window = config.model.pool_window
      save(_draw_maps(value), name, f'{name} {_shape(value)}: {config.model.pool} over {window}x{window} blocks')
    elif name == 'flatten':
      volume = shapes[names[i - 1]]
      perm = model.flatten_permutation(config.model.flatten_order, volume, config.model.flatten_seed)
      title = (
        f'flatten {_shape(value)}: the {"x".join(map(str, volume))} volume of {names[i - 1]} as one vector, '
        f"in '{config.model.flatten_order}' order"
      )
      save(_draw_flatten(value, volume, perm), name, title)
    elif name != logits_name:
      active = int(np.sum(value > 0))
      title = f'{name} {_shape(value)} after {activation}: {active} of {len(value)} positive'
      save(_draw_bars(value, 'unit'), name, title)
  probabilities = np.asarray(jax.nn.softmax(outputs[logits_name]))
  predicted = int(np.argmax(probabilities))
  title = (
    f'class probabilities {_shape(probabilities)} (softmax of {logits_name}): label {label} (orange), '
    f'predicted {predicted} (p = {probabilities[predicted]:.3f})'
  )
  fig = _draw_bars(probabilities, 'class', highlight=label)
  fig.axes[0].set(ylim=(0, 1), ylabel='probability')
  save(fig, 'probabilities', title)

  metrics = read_metrics(workdir, model_index)
  if metrics:  # Not for a run stopped before its first row.
    curves = _draw_learning_curves(metrics)
    save(curves, 'learning_curves', f'learning curves ({os.path.join(workdir, "metrics.jsonl")})')
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir_lib.quiet_orbax_logging()
  write_pictures(flags.FLAGS.workdir, flags.FLAGS.out_dir, flags.FLAGS.index, flags.FLAGS.model)


if __name__ == '__main__':
  # Defined here rather than at import, as in train.py, so that importing this module defines no flags.
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json, checkpoints/, metrics.jsonl).')
  flags.DEFINE_string(
    'out_dir',
    None,
    'A new or empty directory for the PNGs; default <workdir>/pictures/test_example_<index>[_model_<k>][_<i>].',
  )
  flags.DEFINE_integer('index', 0, 'Which test example to draw.')
  flags.DEFINE_integer('model', 0, 'Which model of a sweep (config.num_models > 1) to draw.')
  flags.mark_flag_as_required('workdir')
  app.run(main)
