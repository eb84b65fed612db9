"""The seed's claims about the network as experiments on the embedded digits: each prints a table and writes a PNG.

    python explain.py --experiment=flatten --out_dir=runs/explain --num_epochs=3
    python explain.py --experiment=channels
    python explain.py --experiment=invariance

- flatten: the 'hwc', 'chw' and 'random' flatten orders, started from the same function (fc1's rows permuted to
  match), follow the same loss curve step for step; from independent inits no order reaches a better accuracy.
- channels: a conv filter spans all input channels (the channels are summed), which is a different function, with
  other parameter counts, from the misreading that runs each channel through the network as a separate example.
- invariance: how similar each layer's activations stay when the digit moves by 1 to 4 pixels, trained and untrained.

Every run uses the default config (batch 64, adam 3e-3 cosine) for --num_epochs epochs, 3 by default rather than the
default config's 20, so that each experiment finishes in under a minute on two shared CPU cores (measured: flatten,
18 runs, 37 s; channels 18 s; invariance 23 s).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from absl import app, flags

import input_pipeline
import model
import train
from configs import default

matplotlib.use('Agg')  # Files only; there is no display.
from matplotlib import pyplot as plt  # noqa: E402 -- must follow the backend choice.

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


def make_config(num_epochs: int, input_shape=(32, 32, 1), **model_overrides) -> ml_collections.ConfigDict:
  """The default config, trained for `num_epochs`, with `model_overrides` applied to config.model."""
  config = default.get_config()
  config.num_epochs = num_epochs
  config.input_shape = input_shape
  config.model.update(model_overrides)
  return config


def load_data(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """The train and test splits of `config.dataset`, on the device."""
  return tuple(jax.device_put(input_pipeline.load_split(config, split)) for split in ('train', 'test'))


@jax.jit
def _train_epoch(state, images: jax.Array, labels: jax.Array, indices: jax.Array):
  """One epoch in one jitted scan, indices int32 [steps, B] -> (state, per-step batch loss float32 [steps])."""

  def step(state, batch_indices):
    state, metrics = train.train_step(state, {'image': images[batch_indices], 'label': labels[batch_indices]})
    return state, metrics['loss_sum'] / metrics['count']

  return jax.lax.scan(step, state, indices)


def trainer(config: ml_collections.ConfigDict, data: dict, apply_fn=None):
  """A function fit(params, seed) -> (final params, per-step batch loss [steps]) on data {'image', 'label'}.

  The optimiser is built once here, so every fit of this model reuses one compiled epoch: a new optimiser is a new
  static part of the TrainState and would compile again. `seed` orders the batches exactly as
  `input_pipeline.train_batches` does (these configs do not augment); they are gathered inside one scan per epoch,
  which runs faster here than a Python loop over jitted steps. `apply_fn` replaces the CNN's.
  """
  num_examples = len(data['label'])
  steps = input_pipeline.steps_per_epoch(num_examples, config.batch_size)
  # Shapes only: the template contributes its optimiser and apply_fn, and the params come from the caller.
  template = jax.eval_shape(lambda: train.create_train_state(config, jax.random.key(0), steps))
  template = template.replace(apply_fn=apply_fn or template.apply_fn)

  def fit(params: dict, seed: int) -> tuple[dict, np.ndarray]:
    state = template.replace(step=0, params=params, opt_state=template.tx.init(params))
    losses = []
    for epoch in range(config.num_epochs):
      indices = input_pipeline.shuffled_batch_indices(
        input_pipeline.epoch_key(seed, epoch), num_examples, config.batch_size
      )
      state, epoch_losses = _train_epoch(state, data['image'], data['label'], indices)
      losses.append(epoch_losses)
    return state.params, np.concatenate(jax.device_get(losses))

  return fit


_eval_step = jax.jit(train.eval_step, static_argnames='apply_fn')


def initializer(config: ml_collections.ConfigDict):
  """Jitted key -> params of `config`'s model: for several inits, compiling once costs less than running op by op."""
  return jax.jit(functools.partial(model.init_params, config))


def accuracy_of(apply_fn, params: dict, data: dict) -> float:
  """Exact accuracy over every example of `data`."""
  return float(train.evaluate(functools.partial(_eval_step, apply_fn=apply_fn), params, data, 500)['accuracy'])


def count_params(params: dict) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def flatten(out_dir: str, num_epochs: int = 3, num_seeds: int = 5) -> dict:
  """Flatten orders: same-init loss curves [steps] per order and their max difference; test accuracies per seed."""
  base = make_config(num_epochs)
  train_data, test_data = load_data(base)
  pool_shape = model.layer_shapes(base)['pool2']
  init_fn = initializer(base)  # The flatten order changes no parameter, so one init function serves every order.
  init = init_fn(jax.random.key(base.seed))
  curves, same_init_accuracy = {}, {}
  accuracies = {order: [] for order in ORDERS}
  for i, order in enumerate(ORDERS):
    config = make_config(num_epochs, flatten_order=order)
    fit, apply_fn = trainer(config, train_data), model.create_model(config).apply
    perm = model.flatten_permutation(order, pool_shape, config.model.flatten_seed)
    params, curves[order] = fit({**init, 'fc1': {**init['fc1'], 'kernel': init['fc1']['kernel'][perm]}}, base.seed)
    same_init_accuracy[order] = accuracy_of(apply_fn, params, test_data)
    # Independent inits: seed s orders the batches of every order alike; folding in the order draws other weights.
    for seed in range(num_seeds):
      params, _ = fit(init_fn(jax.random.fold_in(jax.random.key(seed), i)), seed)
      accuracies[order].append(accuracy_of(apply_fn, params, test_data))
  max_difference = max(float(np.max(np.abs(curves[order] - curves['hwc']))) for order in ORDERS)

  results = {
    'loss_curves': curves,
    'max_abs_loss_difference': max_difference,
    'same_init_test_accuracy': same_init_accuracy,
    'test_accuracy': accuracies,
  }
  results['table'] = _flatten_table(results, num_epochs, len(train_data['label']), len(test_data['label']))
  results['png'] = _plot_flatten(results, num_epochs, os.path.join(out_dir, 'flatten.png'))
  return results


def _flatten_table(results: dict, num_epochs: int, num_train: int, num_test: int) -> str:
  curves, accuracies = results['loss_curves'], results['test_accuracy']
  lines = [
    f'flatten: {num_epochs} epochs ({len(curves["hwc"])} steps) of the default config on {num_train:,} embedded '
    f'digits, tested on {num_test:,}.',
    'Same initial function (fc1 kernel rows permuted with model.flatten_permutation), same batches:',
    f'  {"order":8}{"final batch loss":>18}{"max |loss - loss_hwc|":>24}{"test accuracy":>15}',
  ]
  for order in ORDERS:
    difference = np.max(np.abs(curves[order] - curves['hwc']))
    accuracy = results['same_init_test_accuracy'][order]
    lines.append(f'  {order:8}{curves[order][-1]:>18.6f}{difference:>24.2e}{accuracy:>15.4f}')
  lines.append(f'Independent inits, {len(accuracies["hwc"])} seeds per order (test accuracy):')
  for order in ORDERS:
    values = np.array(accuracies[order])
    lines.append(f'  {order:8}{values.mean():.4f} ± {values.std():.4f}   ({", ".join(f"{v:.3f}" for v in values)})')
  return '\n'.join(lines)


def _plot_flatten(results: dict, num_epochs: int, path: str) -> str:
  curves, accuracies = results['loss_curves'], results['test_accuracy']
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={'width_ratios': (2.2, 1)})
  styles = ({'lw': 5, 'alpha': 0.35, 'color': 'k'}, {'lw': 2, 'ls': '--'}, {'lw': 1, 'ls': ':'})
  for order, style in zip(ORDERS, styles, strict=True):
    ax_loss.plot(np.arange(1, len(curves[order]) + 1), curves[order], label=order, **style)
  ax_loss.set(xlabel='step', ylabel='batch loss', yscale='log')
  ax_loss.set_title(
    f'Same initial function, three flatten orders: max |difference| = {results["max_abs_loss_difference"]:.1e}'
  )
  ax_loss.legend()
  for i, order in enumerate(ORDERS):
    values = np.array(accuracies[order])
    ax_acc.plot(np.full(len(values), i), values, 'o', alpha=0.6)
    ax_acc.errorbar(i + 0.15, values.mean(), yerr=values.std(), fmt='s', color='k', capsize=4)
  ax_acc.set(xticks=range(len(ORDERS)), xticklabels=ORDERS, xlim=(-0.5, len(ORDERS) - 0.5), ylabel='test accuracy')
  ax_acc.set_title(f'Independent inits: {len(accuracies["hwc"])} seeds each\n(dots: runs; square: mean ± std)')
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


def per_channel_logits(cnn: model.CNN, variables: dict, images: jax.Array) -> jax.Array:
  """The misreading, [B, H, W, C] -> [B, K]: each channel is a separate one-channel example, logits averaged.

  `cnn` is the one-channel network: its 2D filters are shared by all channels, each channel goes through
  conv1, relu, pooling, conv2 and the dense layers on its own, and the C logit vectors of an image are averaged.
  """
  b, h, w, c = images.shape
  as_examples = jnp.moveaxis(images, -1, 1).reshape(b * c, h, w, 1)
  return cnn.apply(variables, as_examples).reshape(b, c, -1).mean(axis=1)


def channels(out_dir: str, num_epochs: int = 3, seed: int = 0) -> dict:
  """The real conv against the channels-as-examples misreading on tinted digits: parameter counts, accuracies and
  the max |logit difference| and class agreement of the two under matched weights on grey, tinted and mixed images."""
  grey_config = make_config(num_epochs)
  rgb_config = make_config(num_epochs, input_shape=(32, 32, 3))
  grey_train, grey_test = (input_pipeline.load_split(grey_config, split) for split in ('train', 'test'))
  rgb_train, _ = colourise(grey_train['image'], seed)
  rgb_test, _ = colourise(grey_test['image'], seed + 1)
  mean, std = rgb_train.mean(axis=(0, 1, 2)), rgb_train.std(axis=(0, 1, 2))  # Per channel, as load_split does.
  train_data = jax.device_put({'image': (rgb_train - mean) / std, 'label': grey_train['label']})
  test_data = jax.device_put({'image': (rgb_test - mean) / std, 'label': grey_test['label']})

  real_cnn = model.create_model(rgb_config)
  misread_apply = functools.partial(per_channel_logits, model.create_model(grey_config))
  real, real_losses = trainer(rgb_config, train_data)(model.init_params(rgb_config, jax.random.key(seed)), seed)
  misread, misread_losses = trainer(grey_config, train_data, misread_apply)(
    model.init_params(grey_config, jax.random.key(seed)), seed
  )
  params = {'real': count_params(real), 'misread': count_params(misread)}
  accuracy = {
    'real': accuracy_of(real_cnn.apply, real, test_data),
    'misread': accuracy_of(misread_apply, misread, test_data),
  }

  # The matching of weights that makes the real conv agree with the misreading on grey images (equal channels):
  # every channel slice of a real filter is the shared 2D filter / C, so the channel sum equals one 2D conv.
  kernel = misread['conv1']['kernel']
  matched = {**misread, 'conv1': {**misread['conv1'], 'kernel': jnp.repeat(kernel, 3, axis=2) / 3}}
  tinted = test_data['image'][:200]
  inputs = {
    'grey': jnp.repeat(tinted.mean(axis=-1, keepdims=True), 3, axis=-1),  # Each pixel's channels set to their mean.
    'tinted': tinted,
    # Red, green and blue taken from three different digits: where the two readings differ most.
    'mixed': jnp.stack([jnp.roll(tinted[..., c], c, axis=0) for c in range(3)], axis=-1),
  }
  logits = {
    name: (real_cnn.apply({'params': matched}, x), misread_apply({'params': misread}, x)) for name, x in inputs.items()
  }

  results = {
    'params': params,
    'test_accuracy': accuracy,
    'final_batch_loss': {'real': float(real_losses[-1]), 'misread': float(misread_losses[-1])},
    'max_logit_difference': {name: float(jnp.max(jnp.abs(a - b))) for name, (a, b) in logits.items()},
    'same_class': {name: float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))) for name, (a, b) in logits.items()},
  }
  results['table'] = _channels_table(results, num_epochs, len(tinted))
  examples = (rgb_test[:8], grey_test['label'][:8])
  results['png'] = _plot_channels(results, num_epochs, logits, examples, os.path.join(out_dir, 'channels.png'))
  return results


def _channels_table(results: dict, num_epochs: int, num_compared: int) -> str:
  params, accuracy, loss = results['params'], results['test_accuracy'], results['final_batch_loss']
  lines = [
    'channels: embedded digits tinted with a random colour per image (independent of the label), 32x32x3; '
    f'{num_epochs} epochs each, same batches, one seed.',
    '  real conv: conv1 has 3 filters of 5x5x3; each sums over all 3 input channels into one map.',
    '  misreading: conv1 has 3 shared 5x5 filters; every channel is a separate one-channel example through the whole',
    '    network (conv1 .. fc2), and the 3 logit vectors of an image are averaged.',
    f'  {"network":12}{"params":>8}{"final batch loss":>18}{"test accuracy":>15}',
  ]
  for name, label in (('real', 'real'), ('misread', 'misreading')):
    lines.append(f'  {label:12}{params[name]:>8,}{loss[name]:>18.4f}{accuracy[name]:>15.4f}')
  lines += [
    '  Matched weights (real conv1 slices = shared filter / 3, the rest shared), trained misreading weights, '
    f'{num_compared} test images:',
    f'    {"input":48}{"max |logit difference|":>24}{"same predicted class":>22}',
  ]
  for name, description in MATCHED_INPUTS.items():
    difference, agreement = results['max_logit_difference'][name], results['same_class'][name]
    lines.append(f'    {description:48}{difference:>24.2e}{agreement:>22.3f}')
  return '\n'.join(lines)


def _plot_channels(results: dict, num_epochs: int, logits: dict, examples: tuple, path: str) -> str:
  """`logits`: {input name: (real [N, K], misread [N, K])}; `examples`: (RGB images [8, H, W, 3], labels [8])."""
  fig = plt.figure(figsize=(13, 4.8))
  grid = fig.add_gridspec(2, 8, width_ratios=(1, 1, 1, 1, 0.3, 4, 0.3, 4))
  for i, (image, label) in enumerate(zip(*examples, strict=True)):
    ax = fig.add_subplot(grid[i // 4, i % 4])
    ax.imshow(image)
    ax.set(xticks=[], yticks=[], title=f'label {int(label)}')
  ax = fig.add_subplot(grid[:, 5])
  accuracy, params = results['test_accuracy'], results['params']
  bars = ax.bar(('real conv\n(3D filters)', 'misreading\n(channels as\nexamples)'), list(accuracy.values()))
  ax.bar_label(bars, [f'{a:.3f}\n{params[n]:,} params' for n, a in accuracy.items()], padding=3)
  ax.set(ylim=(0, 1.15), ylabel='test accuracy', title=f'After {num_epochs} epochs each')
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
  fresh = model.init_params(config, jax.random.key(config.seed))
  trained, _ = trainer(config, train_data)(fresh, config.seed)
  accuracy = accuracy_of(cnn.apply, trained, test_data)
  images = test_data['image'][:num_images]
  background = float(jnp.min(test_data['image']))  # Pixel value 0 after normalisation.
  shifts = list(range(max_shift + 1))
  moved = {s: [shift_images(images, s * dy, s * dx, background) for dy, dx in DIRECTIONS] for s in shifts}

  def ink(x):  # float64 so that a shift that drops nothing loses exactly nothing, not a rounding error.
    return np.asarray(x - background, np.float64).sum(axis=(1, 2, 3))

  lost = {s: np.stack([np.clip(1 - ink(m) / ink(images), 0, 1) for m in moved[s]]) for s in shifts}
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
    'ink_lost': [float(lost[s].mean()) for s in shifts],
    'digits_losing_ink': [float(np.mean(np.any(lost[s] > 1e-6, axis=0))) for s in shifts],
    'test_accuracy': accuracy,
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
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
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
  run(flags.FLAGS.experiment, flags.FLAGS.out_dir, flags.FLAGS.num_epochs)


if __name__ == '__main__':
  # Defined here rather than at import, as in train.py, so that importing this module defines no flags.
  flags.DEFINE_enum('experiment', None, EXPERIMENTS, 'Which claim to test.')
  flags.DEFINE_string('out_dir', 'runs/explain', 'Directory for the PNG.')
  flags.DEFINE_integer('num_epochs', 3, 'Training epochs of every run (the default config trains for 20).')
  flags.mark_flag_as_required('experiment')
  app.run(main)
