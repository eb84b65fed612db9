"""The network's two facts, and pooling's tolerance of small shifts, as experiments on the embedded digits: each
prints a table and writes a PNG.

    python explain.py --experiment=flatten --out_dir=runs/explain --num_epochs=3
    python explain.py --experiment=channels
    python explain.py --experiment=invariance

- flatten: the 'hwc', 'chw' and 'random' flatten orders, started from the same function (fc1's rows permuted to
  match), follow the same loss curve step for step; from independent inits no order reaches a better accuracy.
- channels: a conv filter spans all input channels (the channels are summed), which is a different function, with
  other parameter counts, from the misreading that runs each channel through the network as a separate example.
- invariance: how similar each layer's activations stay when the digit moves by 1 to 4 pixels, trained and untrained.

Every run trains exactly as `python train.py --config=configs/default.py` does (batch 64, adam 3e-3 cosine, each
training digit shifted by up to a pixel), through train.py's own whole-epoch function, and the seeds of a comparison
train side by side as one sweep (config.num_models); but for --num_epochs epochs, 3 by default rather than the
default config's num_epochs, so that each experiment takes about a minute on two CPU cores (each run prints its
time; compiling each run's epoch function is most of it).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec
from matplotlib.figure import Figure

import input_pipeline
import model
import train
import workdir as workdir_lib
from configs import default

EXPERIMENTS = ('flatten', 'channels', 'invariance')
ORDERS = ('hwc', 'chw', 'random')
# Layers compared by the invariance experiment; 'flatten' is pool2 reordered, so it has pool2's similarities.
INVARIANCE_LAYERS = ('input', 'conv1', 'pool1', 'conv2', 'pool2', 'fc1', 'logits')
# (dy, dx) unit steps: each shift is measured in all four directions and averaged.
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))
# The inputs on which the channels experiment compares the two readings under matched weights.
MATCHED_INPUTS = {
  'grey': "grey (each pixel's channels set to their mean)",
  'tinted': 'the tinted test digits',
  'mixed': 'R, G and B from three different digits',
}


def make_config(num_epochs: int, input_shape=(32, 32, 1), num_models: int = 1, **model_overrides):
  """The default ConfigDict for `num_epochs`, `num_models` seeds side by side, `model_overrides` in config.model."""
  config = default.get_config()
  config.num_epochs, config.input_shape, config.num_models = num_epochs, input_shape, num_models
  config.model.update(model_overrides)
  train.check_config(config)
  return config


def load_data(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """The train and test splits of `config.dataset`."""
  return input_pipeline.load_split(config, 'train'), input_pipeline.load_split(config, 'test')


def initial_state(config: ml_collections.ConfigDict, num_examples: int):
  """The TrainState train.py starts from on `num_examples` training examples; K stacked ones for a sweep."""
  return train.create_initial_state(config, input_pipeline.steps_per_epoch(num_examples, config.batch_size))


def fit(config: ml_collections.ConfigDict, state, data: dict, fill: np.ndarray | None = None):
  """Trains a copy of `state` for config.num_epochs on `data` {'image', 'label'} with train.py's whole-epoch function.

  `fill` is the normalised black pixel [C] that random shifts uncover, if `data` is not config.dataset's.
  Returns (state, batch loss per step [S, K]), where K = 1 for a single model.
  """
  mesh = train.device_mesh()
  state, data = train.place_replicated((state, data), mesh)
  batch_sharding = NamedSharding(mesh, PartitionSpec('batch'))
  functions = train.training_functions(config, len(data['label']), batch_sharding, fill)
  train_epoch = train.jit_with_xla_options(functions.train_epoch, donate_argnums=0)
  metrics = []
  for epoch in range(config.num_epochs):
    state, epoch_metrics = train_epoch(state, data, epoch)
    metrics.append(epoch_metrics)
  losses = np.concatenate([m['loss_sum'] / m['count'] for m in jax.device_get(metrics)])
  return state, losses.reshape(len(losses), config.num_models)


def unstack(config: ml_collections.ConfigDict, params: dict) -> list[dict]:
  """The parameters of each model of a sweep (stacked [K, ...]); [params] for a single model."""
  if config.num_models == 1:
    return [params]
  return [jax.tree.map(lambda x, k=k: x[k], params) for k in range(config.num_models)]


def accuracy(config: ml_collections.ConfigDict, state, data: dict) -> list[float]:
  """Exact accuracy of each model of `state` over every example of `data`, [K].

  Op by op rather than jitted, so that all the networks of one shape share the ops' compilations.
  """
  eval_fn = functools.partial(train.eval_step, apply_fn=state.apply_fn)
  models = unstack(config, state.params)
  return [float(train.evaluate(eval_fn, params, data, config.eval_batch_size)['accuracy']) for params in models]


def count_params(params: dict) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def _mean_std(values: list[float]) -> str:
  """'mean ± std   (run, run, ...)' of one value per seed."""
  return f'{np.mean(values):.4f} ± {np.std(values):.4f}   ({", ".join(f"{v:.3f}" for v in values)})'


def _plot_runs(ax, runs: dict) -> None:
  """The test accuracies {label: [one per seed]} as dots per label, with their mean ± std as a square."""
  for i, values in enumerate(runs.values()):
    ax.plot(np.full(len(values), i), values, 'o', alpha=0.6)
    ax.errorbar(i + 0.15, np.mean(values), yerr=np.std(values), fmt='s', color='k', capsize=4)
  ax.set(xticks=range(len(runs)), xticklabels=list(runs), xlim=(-0.5, len(runs) - 0.5), ylabel='test accuracy')


def _save(fig, path: str) -> str:
  """Saves `fig` as `path` (<name>.png), or as <name>_2.png, ... when an earlier run's picture is there."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  path = workdir_lib.unused_path(*os.path.splitext(path))
  fig.savefig(path, dpi=110)
  return path


def flatten(out_dir: str, num_epochs: int = 3, num_seeds: int = 5) -> dict:
  """Flatten orders: same-init loss curves [steps] per order and their max difference; test accuracies per seed."""
  base = make_config(num_epochs)
  train_data, test_data = load_data(base)
  num_train = len(train_data['label'])
  pool_shape = model.layer_shapes(base)['pool2']
  curves, same_init_accuracy, accuracies, seeds = {}, {}, {}, {}
  for i, order in enumerate(ORDERS):
    config = make_config(num_epochs, flatten_order=order)
    # The order changes no parameter, so every order draws the same arrays from the seed; permuting fc1's rows as
    # the order permutes its inputs makes them one function. One seed: the same batches and shifts for every order.
    state = initial_state(config, num_train)
    perm = model.flatten_permutation(order, pool_shape, config.model.flatten_seed)
    params = {**state.params, 'fc1': {**state.params['fc1'], 'kernel': state.params['fc1']['kernel'][perm]}}
    state, losses = fit(config, state.replace(params=params, opt_state=state.tx.init(params)), train_data)
    curves[order], (same_init_accuracy[order],) = losses[:, 0], accuracy(config, state, test_data)
    # Independent runs: each order's seeds are its own (weights, batch order and shifts).
    sweep = make_config(num_epochs, num_models=num_seeds, flatten_order=order)
    sweep.seed = base.seed + i * num_seeds
    state, _ = fit(sweep, initial_state(sweep, num_train), train_data)
    accuracies[order] = accuracy(sweep, state, test_data)
    seeds[order] = train.model_seeds(sweep).tolist()
  max_difference = max(float(np.max(np.abs(curves[order] - curves['hwc']))) for order in ORDERS)

  results = {
    'loss_curves': curves,
    'max_abs_loss_difference': max_difference,
    'same_init_test_accuracy': same_init_accuracy,
    'test_accuracy': accuracies,
    'seeds': seeds,
  }
  results['table'] = _flatten_table(results, num_epochs, num_train, len(test_data['label']))
  results['png'] = _plot_flatten(results, num_epochs, os.path.join(out_dir, 'flatten.png'))
  return results


def _flatten_table(results: dict, num_epochs: int, num_train: int, num_test: int) -> str:
  curves, accuracies = results['loss_curves'], results['test_accuracy']
  lines = [
    f'flatten: {num_epochs} epochs ({len(curves["hwc"])} steps) of the default config on {num_train:,} embedded '
    f'digits, tested on {num_test:,}.',
    'Same initial function (fc1 kernel rows permuted with model.flatten_permutation), same batches and shifts:',
    f'  {"order":8}{"final batch loss":>18}{"max |loss - loss_hwc|":>24}{"test accuracy":>15}',
  ]
  for order in ORDERS:
    difference = np.max(np.abs(curves[order] - curves['hwc']))
    accuracy = results['same_init_test_accuracy'][order]
    lines.append(f'  {order:8}{curves[order][-1]:>18.6f}{difference:>24.2e}{accuracy:>15.4f}')
  lines.append(f'Independent runs, {len(accuracies["hwc"])} seeds per order (test accuracy):')
  for order in ORDERS:
    seeds = results['seeds'][order]
    lines.append(f'  {order:8}{f"seeds {seeds[0]}-{seeds[-1]}":14}{_mean_std(accuracies[order])}')
  return '\n'.join(lines)


def _plot_flatten(results: dict, num_epochs: int, path: str) -> str:
  curves, accuracies = results['loss_curves'], results['test_accuracy']
  fig = Figure(figsize=(12, 4.5))
  ax_loss, ax_acc = fig.subplots(1, 2, width_ratios=(2.2, 1))
  styles = ({'lw': 5, 'alpha': 0.35, 'color': 'k'}, {'lw': 2, 'ls': '--'}, {'lw': 1, 'ls': ':'})
  for order, style in zip(ORDERS, styles, strict=True):
    ax_loss.plot(np.arange(1, len(curves[order]) + 1), curves[order], label=order, **style)
  ax_loss.set(xlabel='step', ylabel='batch loss', yscale='log')
  ax_loss.set_title(
    f'Same initial function, three flatten orders: max |difference| = {results["max_abs_loss_difference"]:.1e}'
  )
  ax_loss.legend()
  _plot_runs(ax_acc, accuracies)
  ax_acc.set_title(f'Independent runs: {len(accuracies["hwc"])} seeds each\n(dots: runs; square: mean ± std)')
  fig.suptitle(f'Flatten order does not matter ({num_epochs} epochs, embedded MNIST)')
  fig.tight_layout()
  return _save(fig, path)


def colourise(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Grey digits [N, H, W, 1] (normalised) -> (RGB digits [N, H, W, 3] in [0, 1], colours [N, 3]).

  Each digit's ink is tinted with a random colour drawn per image from `seed` alone, so the colour says nothing
  about the label; the colour is scaled so that its brightest channel is 1 and no digit is faint in every channel.
  """
  images = np.asarray(images)
  ink = (images - images.min()) / (images.max() - images.min())  # The background is the minimum: 0 -> 0.
  colours = np.random.default_rng(seed).uniform(size=(len(images), 3)).astype(np.float32)
  colours /= colours.max(axis=1, keepdims=True)
  return ink * colours[:, None, None, :], colours


def tinted_splits(grey_train: dict, grey_test: dict, seed: int) -> tuple[dict, dict, np.ndarray, np.ndarray]:
  """Grey splits {'image': [N, H, W, 1], 'label'} -> the same digits tinted: (train, test, black [3], test RGB).

  The test digits' colours are drawn from seed + 1, not the training digits' draws. Both splits are normalised per
  channel by the training split's mean and std, as `input_pipeline.load_split` normalises a dataset; `black` is the
  normalised background that random shifts uncover, and the test RGB digits in [0, 1] are for showing.
  """
  rgb_train, _ = colourise(grey_train['image'], seed)
  rgb_test, _ = colourise(grey_test['image'], seed + 1)
  mean, std = rgb_train.mean(axis=(0, 1, 2)), rgb_train.std(axis=(0, 1, 2))
  train = {'image': (rgb_train - mean) / std, 'label': grey_train['label']}
  test = {'image': (rgb_test - mean) / std, 'label': grey_test['label']}
  return train, test, -mean / std, rgb_test


def matched_inputs(tinted: jax.Array) -> dict[str, jax.Array]:
  """The MATCHED_INPUTS of tinted digits [N, H, W, 3], each [N, H, W, 3]."""
  return {
    'grey': jnp.repeat(tinted.mean(axis=-1, keepdims=True), 3, axis=-1),  # Each pixel's channels set to their mean.
    'tinted': tinted,
    # Red, green and blue of image i taken from digits i, i - 1 and i - 2: where the two readings differ most.
    'mixed': jnp.stack([jnp.roll(tinted[..., c], c, axis=0) for c in range(3)], axis=-1),
  }


def per_channel_logits(cnn: model.CNN, variables: dict, images: jax.Array) -> jax.Array:
  """The misreading, [B, H, W, C] -> [B, K]: each channel is a separate one-channel example, logits averaged.

  `cnn` is the one-channel network: its 2D filters are shared by all channels, each channel goes through
  conv1, relu, pooling, conv2 and the dense layers on its own, and the C logit vectors of an image are averaged.
  """
  b, h, w, c = images.shape
  as_examples = jnp.moveaxis(images, -1, 1).reshape(b * c, h, w, 1)
  return cnn.apply(variables, as_examples).reshape(b, c, -1).mean(axis=1)


def channels(out_dir: str, num_epochs: int = 3, num_seeds: int = 3) -> dict:
  """The real conv against the channels-as-examples misreading on tinted digits, `num_seeds` seeds each: parameter
  counts, accuracies and the max |logit difference| and class agreement of the two under matched weights (seed 0's)
  on grey, tinted and mixed images."""
  grey_config = make_config(num_epochs, num_models=num_seeds)
  rgb_config = make_config(num_epochs, input_shape=(32, 32, 3), num_models=num_seeds)
  train_data, test_data, black, rgb_test = tinted_splits(*load_data(grey_config), grey_config.seed)
  num_train = len(train_data['label'])

  # Model k of both networks has seed k: its own init, and the same batches and shifts as the other network's.
  real_cnn = model.create_model(rgb_config)
  misread_apply = functools.partial(per_channel_logits, model.create_model(grey_config))
  real, real_losses = fit(rgb_config, initial_state(rgb_config, num_train), train_data, black)
  misread_state = initial_state(grey_config, num_train).replace(apply_fn=misread_apply)
  misread, misread_losses = fit(grey_config, misread_state, train_data, black)
  # Seed 0's weights: the parameter counts and the comparison under matched weights.
  real_params, misread_params = unstack(rgb_config, real.params)[0], unstack(grey_config, misread.params)[0]

  # The matching of weights that makes the real conv agree with the misreading on grey images (equal channels):
  # every channel slice of a real filter is the shared 2D filter / C, so the channel sum equals one 2D conv.
  kernel = misread_params['conv1']['kernel']
  matched = {**misread_params, 'conv1': {**misread_params['conv1'], 'kernel': jnp.repeat(kernel, 3, axis=2) / 3}}
  tinted = test_data['image'][:200]
  inputs = matched_inputs(tinted)
  logits = {
    name: (real_cnn.apply({'params': matched}, x), misread_apply({'params': misread_params}, x))
    for name, x in inputs.items()
  }

  results = {
    'params': {'real': count_params(real_params), 'misread': count_params(misread_params)},
    'test_accuracy': {
      'real': accuracy(rgb_config, real, test_data),
      'misread': accuracy(grey_config, misread, test_data),
    },
    'final_batch_loss': {'real': real_losses[-1].tolist(), 'misread': misread_losses[-1].tolist()},
    'max_logit_difference': {name: float(jnp.max(jnp.abs(a - b))) for name, (a, b) in logits.items()},
    'same_class': {name: float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))) for name, (a, b) in logits.items()},
  }
  results['table'] = _channels_table(results, num_epochs, len(tinted))
  examples = (rgb_test[:8], test_data['label'][:8])
  results['png'] = _plot_channels(results, num_epochs, logits, examples, os.path.join(out_dir, 'channels.png'))
  return results


def _channels_table(results: dict, num_epochs: int, num_compared: int) -> str:
  params, accuracy, loss = results['params'], results['test_accuracy'], results['final_batch_loss']
  lines = [
    'channels: embedded digits tinted with a random colour per image (independent of the label), 32x32x3; '
    f'{num_epochs} epochs,',
    f'  seeds 0-{len(accuracy["real"]) - 1} for each network (seed k: the same batches and shifts for both).',
    '  real conv: conv1 has 3 filters of 5x5x3; each sums over all 3 input channels into one map.',
    '  misreading: conv1 has 3 shared 5x5 filters; every channel is a separate one-channel example through the whole',
    '    network (conv1 .. fc2), and the 3 logit vectors of an image are averaged.',
    f'  {"network":12}{"params":>8}{"mean final batch loss":>23}   test accuracy (mean ± std, runs)',
  ]
  for name, label in (('real', 'real'), ('misread', 'misreading')):
    lines.append(f'  {label:12}{params[name]:>8,}{np.mean(loss[name]):>23.4f}   {_mean_std(accuracy[name])}')
  lines += [
    '  Matched weights (real conv1 slices = shared filter / 3, the rest shared), the trained misreading weights of',
    f'  seed 0, {num_compared} test images:',
    f'    {"input":48}{"max |logit difference|":>24}{"same predicted class":>22}',
  ]
  for name, description in MATCHED_INPUTS.items():
    difference, agreement = results['max_logit_difference'][name], results['same_class'][name]
    lines.append(f'    {description:48}{difference:>24.2e}{agreement:>22.3f}')
  return '\n'.join(lines)


def _plot_channels(results: dict, num_epochs: int, logits: dict, examples: tuple, path: str) -> str:
  """`logits`: {input name: (real [N, K], misread [N, K])}; `examples`: (RGB images [8, H, W, 3], labels [8])."""
  fig = Figure(figsize=(13, 4.8))
  grid = fig.add_gridspec(2, 8, width_ratios=(1, 1, 1, 1, 0.3, 4, 0.3, 4))
  for i, (image, label) in enumerate(zip(*examples, strict=True)):
    ax = fig.add_subplot(grid[i // 4, i % 4])
    ax.imshow(image)
    ax.set(xticks=[], yticks=[], title=f'label {int(label)}')
  ax = fig.add_subplot(grid[:, 5])
  accuracy, params = results['test_accuracy'], results['params']
  labels = {'real': 'real conv\n(3D filters)', 'misread': 'misreading\n(channels as\nexamples)'}
  _plot_runs(ax, {f'{labels[name]}\n{params[name]:,} params': values for name, values in accuracy.items()})
  ax.set_title(f'After {num_epochs} epochs, {len(accuracy["real"])} seeds each\n(dots: runs; square: mean ± std)')
  ax = fig.add_subplot(grid[:, 7])
  for name, marker in (('mixed', '.'), ('tinted', '.'), ('grey', 'x')):
    real, misread = logits[name]
    difference = results['max_logit_difference'][name]
    ax.plot(np.ravel(misread), np.ravel(real), marker, ms=3, alpha=0.5, label=f'{name}: max diff {difference:.1e}')
  ax.set(xlabel='misreading logit', ylabel='real conv logit (matched weights)', title='Different functions')
  ax.legend(fontsize=8)
  fig.suptitle('Channels are summed by each 3D filter, not run as separate examples (tinted digits, 8 shown)')
  fig.tight_layout()
  return _save(fig, path)


def shift_images(images: jax.Array, dy: int, dx: int, fill: float) -> jax.Array:
  """[N, H, W, C] -> [N, H, W, C] moved down by dy and right by dx pixels (negative: up, left) within the frame.

  Pixels moved past the edge are dropped and the uncovered ones are set to `fill` (the background), never wrapped.
  """
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0)), constant_values=fill)
  top, left = max(-dy, 0), max(-dx, 0)
  return padded[:, top : top + h, left : left + w]


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """[N, ...] x [N, ...] -> [N]: cosine similarity of each pair of examples, flattened."""
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)


def ink_lost(images: np.ndarray, moved: list[np.ndarray], background: float) -> tuple[float, float]:
  """(the mean share of a digit's ink moved out of the frame, the share of digits that lose any in some direction)
  for `images` [N, H, W, C] and their copies `moved` [D][N, H, W, C] in D directions."""

  def ink(x):  # float64 so that a shift that drops nothing loses exactly nothing, not a rounding error.
    return np.asarray(x - background, np.float64).sum(axis=(1, 2, 3))

  lost = np.stack([np.clip(1 - ink(m) / ink(images), 0, 1) for m in moved])  # [D, N]
  return float(lost.mean()), float(np.mean(np.any(lost > 1e-6, axis=0)))


@functools.partial(jax.jit, static_argnames='cnn')
def _similarities(cnn: model.CNN, params: dict, images: jax.Array, moved: jax.Array, background: float) -> dict:
  """Per-layer cosine similarity [N] of `images` and `moved` [N, H, W, C], plus 'agree' [N]: same predicted class."""
  a = cnn.apply({'params': params}, images, method=model.CNN.layer_outputs)
  b = cnn.apply({'params': params}, moved, method=model.CNN.layer_outputs)
  # The input is compared as ink (background 0): the normalised background would make any two digits look alike.
  result = {'input': _cosine(images - background, moved - background)}
  result.update({name: _cosine(a[name], b[name]) for name in INVARIANCE_LAYERS[1:-1]})
  result['logits'] = _cosine(a['fc2'], b['fc2'])
  result['agree'] = jnp.argmax(a['fc2'], -1) == jnp.argmax(b['fc2'], -1)
  return result


def invariance(out_dir: str, num_epochs: int = 3, max_shift: int = 4, num_images: int = 1000) -> dict:
  """Mean cosine similarity per layer between test digits and their shifted copies, for a trained and a fresh model.

  Returns 'similarity' {'trained'|'untrained': {layer: [max_shift + 1]}}, 'agreement' {model: [max_shift + 1]}
  (fraction whose predicted class is unchanged), 'other_digit' {model: {layer or 'agree': float}} (the same for each
  digit against the next test digit: unrelated inputs), and per shift 'ink_lost' (fraction of the ink moved out of the
  frame) and 'digits_losing_ink' (fraction of the digits that lose any).
  """
  config = make_config(num_epochs)
  train_data, test_data = load_data(config)
  cnn = model.create_model(config)
  state = initial_state(config, len(train_data['label']))
  fresh = state.params  # fit trains a copy.
  state, _ = fit(config, state, train_data)
  trained, (test_accuracy,) = state.params, accuracy(config, state, test_data)
  images = test_data['image'][:num_images]
  background = float(jnp.min(test_data['image']))  # Pixel value 0 after normalisation.
  shifts = list(range(max_shift + 1))
  moved = {s: [shift_images(images, s * dy, s * dx, background) for dy, dx in DIRECTIONS] for s in shifts}
  lost = [ink_lost(images, moved[s], background) for s in shifts]
  similarity, agreement, other_digit = {}, {}, {}
  for name, params in (('trained', trained), ('untrained', fresh)):
    # Each shift's value is the mean over the digits and the four directions.
    per_shift = [[_similarities(cnn, params, images, m, background) for m in moved[s]] for s in shifts]
    means = [{key: float(np.mean([run[key] for run in runs])) for key in runs[0]} for runs in per_shift]
    similarity[name] = {layer: [row[layer] for row in means] for layer in INVARIANCE_LAYERS}
    agreement[name] = [row['agree'] for row in means]
    others = _similarities(cnn, params, images, jnp.roll(images, 1, axis=0), background)
    other_digit[name] = {key: float(jnp.mean(value)) for key, value in others.items()}
  results = {
    'shifts': shifts,
    'similarity': similarity,
    'other_digit': other_digit,
    'agreement': agreement,
    'ink_lost': [share for share, _ in lost],
    'digits_losing_ink': [digits for _, digits in lost],
    'test_accuracy': test_accuracy,
  }
  results['table'] = _invariance_table(results, num_epochs, len(images))
  results['png'] = _plot_invariance(results, num_epochs, os.path.join(out_dir, 'invariance.png'))
  return results


def _invariance_table(results: dict, num_epochs: int, num_images: int) -> str:
  shifts = results['shifts']
  lines = [
    "invariance: mean cosine similarity between a layer's activations for a test digit and for the same digit",
    f'  shifted by s pixels ({num_images:,} test digits x 4 directions). Pixels moved past the edge are dropped and',
    '  the uncovered ones set to the background (never wrapped).',
    f'  {"":15}' + ''.join(f'{f"s={s}":>8}' for s in shifts),
    f'  {"ink lost %":15}' + ''.join(f'{100 * v:>8.2f}' for v in results['ink_lost']),
    f'  {"digits losing %":15}' + ''.join(f'{100 * v:>8.1f}' for v in results['digits_losing_ink']),
  ]
  relative = [f'rel s={s}' for s in shifts[1:]]
  header = f'  {"layer":15}' + ''.join(f'{name:>8}' for name in [*(f's={s}' for s in shifts), 'other', *relative])
  for name in ('trained', 'untrained'):
    what = f'{num_epochs} epochs, test accuracy {results["test_accuracy"]:.4f}' if name == 'trained' else 'fresh init'
    lines += [f'{name} ({what}):', header]
    for layer in INVARIANCE_LAYERS:
      values, other = results['similarity'][name][layer], results['other_digit'][name][layer]
      excess = [(v - other) / (1 - other) for v in values[1:]]
      lines.append(f'  {layer:15}' + ''.join(f'{v:>8.3f}' for v in [*values, other, *excess]))
    agreement = [*results['agreement'][name], results['other_digit'][name]['agree']]
    lines.append(f'  {"same class":15}' + ''.join(f'{v:>8.3f}' for v in agreement))
  lines += [
    '  ink lost: share of all ink moved out of the frame; digits losing: share of digits that lose any.',
    '  input: compared as ink (background 0). other: each digit against a different test digit (the next one).',
    '  rel: (similarity - other) / (1 - other): 1 is identical, 0 is no more alike than a different digit.',
    '  same class: fraction of the shifted digits whose predicted class is unchanged.',
  ]
  return '\n'.join(lines)


def _plot_invariance(results: dict, num_epochs: int, path: str) -> str:
  shifts = results['shifts']
  other_x = shifts[-1] + 1.2
  fig = Figure(figsize=(12, 4.8))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, name in zip(axes, ('trained', 'untrained'), strict=True):
    for i, layer in enumerate(INVARIANCE_LAYERS):
      color = 'k' if layer == 'input' else f'C{i}'
      line_style = ':' if layer == 'input' else '-'
      ax.plot(shifts, results['similarity'][name][layer], line_style, marker='o', color=color, label=layer)
      ax.plot(other_x, results['other_digit'][name][layer], marker='*', ms=10, color=color)
    ax.axvline(shifts[-1] + 0.6, color='0.8')
    ax.set_xticks([*shifts, other_x], [*map(str, shifts), 'other\ndigit'])
    ax.set(xlabel='shift (pixels)', ylim=(None, 1.02), ylabel='mean cosine similarity' if name == 'trained' else None)
    title = f'trained, {num_epochs} epochs (test acc {results["test_accuracy"]:.3f})' if name == 'trained' else name
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend(title='layer', loc='lower left')
  fig.suptitle("Similarity of each layer's activations for a digit and its shifted copy (mean of 4 directions)")
  fig.tight_layout()
  return _save(fig, path)


EXPERIMENT_FNS = {'flatten': flatten, 'channels': channels, 'invariance': invariance}


def run(experiment: str, out_dir: str, num_epochs: int) -> dict:
  """Runs one experiment, prints its table and wall time, and returns its results."""
  start = time.perf_counter()
  results = EXPERIMENT_FNS[experiment](out_dir, num_epochs=num_epochs)
  print(results['table'])
  print(f'Wrote {results["png"]}; {experiment} took {time.perf_counter() - start:.1f} s.')
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.tune_cpu_runtime()
  batch_size, num_devices = default.get_config().batch_size, jax.device_count()
  if batch_size % num_devices:  # The batch is split over the devices, and it has no flag here.
    raise app.UsageError(
      f"every run trains with the default config's batch of {batch_size}, which does not divide over the "
      f'{num_devices} devices; make 1, 2, 4, ... of them visible (CUDA_VISIBLE_DEVICES=0, say).'
    )
  workdir_lib.make_directory(flags.FLAGS.out_dir, '--out_dir', app.UsageError)  # Now, not after training.
  run(flags.FLAGS.experiment, flags.FLAGS.out_dir, flags.FLAGS.num_epochs)


if __name__ == '__main__':
  # Defined here rather than at import, as in train.py, so that importing this module defines no flags.
  flags.DEFINE_enum('experiment', None, EXPERIMENTS, 'Which claim to test.')
  flags.DEFINE_string('out_dir', 'runs/explain', 'Directory for the PNG (<experiment>_2.png, ... if one is there).')
  flags.DEFINE_integer('num_epochs', 3, "Training epochs of every run, fewer than the default config's.", lower_bound=1)
  flags.mark_flag_as_required('experiment')
  app.run(main)
