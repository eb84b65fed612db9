"""The tinycnn network written out in NumPy: the forward pass, the loss and every gradient, derived by hand.

A reference to read and to test against, not to train with. It takes the same parameter pytree as model.py
({'conv1': {'kernel': [kh, kw, C_in, C_out], 'bias': [C_out]}, ..., 'fc1': {'kernel': [D_in, D_out], 'bias'}, ...})
and the same `config.model` settings, and computes in float64 so that any disagreement with `model.CNN` and
`jax.grad` (tests/reference_test.py) is a mistake in one of them, not rounding.

    logits, cache = reference.forward(params, config.model, images)
    loss, grads = reference.loss_and_grads(params, config.model, images, labels)

Each layer has a forward function and a backward function that maps the gradient of the loss with respect to
the layer's output to the gradients with respect to its input and its parameters (the chain rule, one layer at
a time). Loops run only over the kh*kw kernel positions; batch, space and channels are vectorised.
"""

from collections.abc import Mapping

import numpy as np

import model

# Settings of `config.model` this file implements; any other one raises NotImplementedError rather than being
# silently ignored.
SETTINGS = (
  'conv_features',
  'kernel_size',
  'strides',
  'padding',
  'pool',
  'pool_window',
  'activation',
  'hidden_features',
  'num_classes',
  'flatten_order',
  'flatten_seed',
)
_GELU_C = np.sqrt(2 / np.pi)


def _gelu_grad(z: np.ndarray) -> np.ndarray:
  u = _GELU_C * (z + 0.044715 * z**3)
  t = np.tanh(u)
  return 0.5 * (1 + t) + 0.5 * z * (1 - t**2) * _GELU_C * (1 + 3 * 0.044715 * z**2)


# name -> (f(z), f'(z)), both of the pre-activation z.
ACTIVATIONS = {
  # f'(0) = 0, as jax.nn.relu defines it.
  'relu': (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
  'tanh': (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
  # sigmoid(z) = (1 + tanh(z/2)) / 2 exactly, and this form cannot overflow in exp.
  'sigmoid': (lambda z: 0.5 * (1 + np.tanh(z / 2)), lambda z: 0.25 * (1 - np.tanh(z / 2) ** 2)),
  # flax's nn.gelu defaults to the tanh approximation: z/2 * (1 + tanh(sqrt(2/pi) * (z + 0.044715 z^3))).
  'gelu': (lambda z: 0.5 * z * (1 + np.tanh(_GELU_C * (z + 0.044715 * z**3))), _gelu_grad),
}


def _settings(model_config: Mapping) -> model.CNN:
  """The settings with model.CNN's defaults and validation, so both implementations accept the same configs."""
  unknown = sorted(set(model_config.keys()) - set(SETTINGS))
  if unknown:
    raise NotImplementedError(f'reference.py does not implement config.model.{unknown[0]}; it knows only {SETTINGS}.')
  return model.CNN(**dict(model_config))


def _padding(size: int, kernel_size: int, strides: int, padding: str) -> tuple[int, int, int]:
  """(output size, padding before, padding after) along one axis, with XLA's convention for SAME."""
  if padding == 'VALID':
    if kernel_size > size:
      raise ValueError(f'model.kernel_size={kernel_size} is larger than the input ({size}); VALID needs it to fit.')
    return (size - kernel_size) // strides + 1, 0, 0
  out = -(-size // strides)
  total = max((out - 1) * strides + kernel_size - size, 0)
  return out, total // 2, total - total // 2


def _tap(x: np.ndarray, p: int, q: int, out_h: int, out_w: int, strides: int) -> np.ndarray:
  """The [B, out_h, out_w, C] input values that kernel position (p, q) multiplies, one per output position."""
  return x[:, p : p + (out_h - 1) * strides + 1 : strides, q : q + (out_w - 1) * strides + 1 : strides, :]


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, strides: int = 1, padding: str = 'VALID'):
  """[B, H, W, C_in] * [kh, kw, C_in, C_out] + [C_out] -> [B, H', W', C_out] (a cross-correlation).

  y[b, i, j, o] = bias[o] + sum_{p, q, c} x_pad[b, i*s + p, j*s + q, c] * kernel[p, q, c, o]: each filter
  kernel[..., o] is a kh x kw x C_in volume, and the sum over c adds all input channels into one map per filter.
  """
  kh, kw, _, c_out = kernel.shape
  out_h, top, bottom = _padding(x.shape[1], kh, strides, padding)
  out_w, left, right = _padding(x.shape[2], kw, strides, padding)
  x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  y = np.zeros((x.shape[0], out_h, out_w, c_out))
  for p in range(kh):
    for q in range(kw):
      # One kernel position for every output position at once; the matmul sums over the input channels.
      y += _tap(x, p, q, out_h, out_w, strides) @ kernel[p, q]
  return y + bias


def conv2d_backward(x: np.ndarray, kernel: np.ndarray, grad_y: np.ndarray, strides: int = 1, padding: str = 'VALID'):
  """Gradients of conv2d: (x [B, H, W, C_in], kernel, grad_y [B, H', W', C_out]) -> (grad_x, grad_kernel, grad_bias).

  grad_kernel is the correlation of the layer input with the upstream gradient:
      grad_kernel[p, q, c, o] = sum_{b, i, j} x_pad[b, i*s + p, j*s + q, c] * grad_y[b, i, j, o].
  grad_x is the full convolution of the upstream gradient with the flipped kernel:
      grad_x_pad[b, r, t, c] = sum_{p, q, o} grad_y_full[b, r + p, t + q, o] * kernel[kh-1-p, kw-1-q, c, o],
  where grad_y_full is grad_y with s-1 zeros between its rows and columns (the stride) and kh-1, kw-1 zeros
  around it (the 'full' in full convolution: every output that an input value touched contributes to it).
  """
  kh, kw, _, _ = kernel.shape
  b, out_h, out_w, c_out = grad_y.shape
  _, top, bottom = _padding(x.shape[1], kh, strides, padding)
  _, left, right = _padding(x.shape[2], kw, strides, padding)
  x_pad = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))

  grad_kernel = np.zeros(kernel.shape)
  for p in range(kh):
    for q in range(kw):
      grad_kernel[p, q] = np.einsum('bhwc,bhwo->co', _tap(x_pad, p, q, out_h, out_w, strides), grad_y)
  # The bias is added at every output position, so its gradient sums over all of them.
  grad_bias = grad_y.sum(axis=(0, 1, 2))

  dilated = np.zeros((b, (out_h - 1) * strides + 1, (out_w - 1) * strides + 1, c_out))
  dilated[:, ::strides, ::strides] = grad_y
  # Rows and columns past the last window that the stride reached get no gradient: pad them too, after the full
  # padding, so the result covers all of x_pad.
  extra_h = x_pad.shape[1] - ((out_h - 1) * strides + kh)
  extra_w = x_pad.shape[2] - ((out_w - 1) * strides + kw)
  grad_y_full = np.pad(dilated, ((0, 0), (kh - 1, kh - 1 + extra_h), (kw - 1, kw - 1 + extra_w), (0, 0)))
  flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # [kh, kw, C_out, C_in]: maps C_out back to C_in.
  grad_x_pad = conv2d(grad_y_full, flipped, np.zeros(flipped.shape[-1]))
  grad_x = grad_x_pad[:, top : top + x.shape[1], left : left + x.shape[2]]
  return grad_x, grad_kernel, grad_bias


def _windows(x: np.ndarray, window: int) -> np.ndarray:
  """[B, H, W, C] -> [B, H/window, window, W/window, window, C]: the non-overlapping pooling windows."""
  b, h, w, c = x.shape
  if h % window or w % window:
    raise ValueError(f'model.pool_window={window} does not divide the {h}x{w} feature map.')
  return x.reshape(b, h // window, window, w // window, window, c)


def pool2d(x: np.ndarray, kind: str, window: int) -> np.ndarray:
  """Non-overlapping max or average pooling, [B, H, W, C] -> [B, H/window, W/window, C]."""
  blocks = _windows(x, window)
  return blocks.max(axis=(2, 4)) if kind == 'max' else blocks.mean(axis=(2, 4))


def pool2d_backward(x: np.ndarray, grad_y: np.ndarray, kind: str, window: int) -> np.ndarray:
  """Gradient of pool2d: (x [B, H, W, C], grad_y [B, H/window, W/window, C]) -> grad_x [B, H, W, C].

  avg: every input in a window contributed 1/window^2 of the output, so it gets 1/window^2 of its gradient.
  max: the gradient goes to the argmax of each window; the others did not affect the output. When several
  entries tie for the maximum, the gradient is split equally among them: that is what jax.grad gives for jnp.max
  (reduce_max's derivative rule) and what model.max_pool_windows does, and this file matches it. With random
  inputs the only ties are relu windows that are all zero, where relu's zero slope discards the gradient whichever
  rule is used; the rule shows only for ties with a nonzero slope, such as a constant positive feature map.
  """
  blocks = _windows(x, window)
  b, h, _, w, _, c = blocks.shape
  grad_y = grad_y.reshape(b, h, 1, w, 1, c)
  if kind == 'max':
    is_max = blocks == blocks.max(axis=(2, 4), keepdims=True)
    grad_blocks = is_max * grad_y / is_max.sum(axis=(2, 4), keepdims=True)
  else:
    grad_blocks = np.broadcast_to(grad_y / window**2, blocks.shape)
  return grad_blocks.reshape(x.shape)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
  """Mean cross-entropy of softmax(logits [B, K]) with integer labels [B] -> (loss, grad_logits [B, K]).

  d loss / d logits = (softmax(logits) - one_hot(labels)) / B: the 1/B from the mean over the batch.
  """
  shifted = logits - logits.max(axis=1, keepdims=True)  # Same softmax, no overflow in exp.
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  rows = np.arange(len(labels))
  loss = -log_probs[rows, labels].mean()
  grad = np.exp(log_probs)
  grad[rows, labels] -= 1
  return float(loss), grad / len(labels)


def _check_layer(name: str, layer: Mapping, kernel_shape: tuple[int, ...]) -> None:
  """The params must be those of the config's network: the kernel and bias shapes are not taken on trust (a bias
  of the wrong shape would broadcast)."""
  for part, expected in (('kernel', kernel_shape), ('bias', kernel_shape[-1:])):
    if tuple(np.shape(layer[part])) != expected:
      raise ValueError(
        f"params['{name}']['{part}'] has shape {tuple(np.shape(layer[part]))}, but config.model and the input give "
        f'{expected} (kernel_size, conv_features, hidden_features or num_classes differ).'
      )


def forward(params: Mapping, model_config: Mapping, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """images [B, H, W, C] -> (logits [B, num_classes], cache).

  The cache holds every layer's output under model.CNN.layer_outputs' names ('conv1', 'pool1', ..., 'flatten',
  'fc1', ...), plus 'input' and the pre-activations 'conv1_pre', ..., 'fc1_pre', ...: what the backward pass needs.
  """
  cnn = _settings(model_config)
  f, _ = ACTIVATIONS[cnn.activation]
  cache = {}
  x = cache['input'] = np.asarray(images, np.float64)
  for i, features in enumerate(cnn.conv_features, start=1):
    layer = params[f'conv{i}']
    _check_layer(f'conv{i}', layer, (cnn.kernel_size, cnn.kernel_size, x.shape[-1], features))
    kernel, bias = np.asarray(layer['kernel'], np.float64), np.asarray(layer['bias'], np.float64)
    z = cache[f'conv{i}_pre'] = conv2d(x, kernel, bias, cnn.strides, cnn.padding)
    x = cache[f'conv{i}'] = f(z)
    x = cache[f'pool{i}'] = pool2d(x, cnn.pool, cnn.pool_window)
  perm = model.flatten_permutation(cnn.flatten_order, x.shape[1:], cnn.flatten_seed)
  x = cache['flatten'] = x.reshape(x.shape[0], -1)[:, perm]
  n_dense = len(cnn.hidden_features) + 1
  for i, features in enumerate((*cnn.hidden_features, cnn.num_classes), start=1):
    layer = params[f'fc{i}']
    _check_layer(f'fc{i}', layer, (x.shape[-1], features))
    z = x @ np.asarray(layer['kernel'], np.float64) + np.asarray(layer['bias'], np.float64)
    if i == n_dense:  # The logits: no activation.
      x = cache[f'fc{i}'] = z
    else:
      cache[f'fc{i}_pre'] = z
      x = cache[f'fc{i}'] = f(z)
  return x, cache


def loss_and_grads(params: Mapping, model_config: Mapping, images: np.ndarray, labels: np.ndarray):
  """(images [B, H, W, C], integer labels [B]) -> (mean softmax cross-entropy, grads: the same pytree as params).

  The backward pass runs the layers in reverse; `grad` is always d loss / d (the current layer's output).
  """
  cnn = _settings(model_config)
  _, f_grad = ACTIVATIONS[cnn.activation]
  n_conv, n_dense = len(cnn.conv_features), len(cnn.hidden_features) + 1
  logits, cache = forward(params, model_config, images)
  loss, grad = softmax_cross_entropy(logits, np.asarray(labels))
  grads = {}

  for i in range(n_dense, 0, -1):
    if i < n_dense:
      grad = grad * f_grad(cache[f'fc{i}_pre'])
    x = cache[f'fc{i - 1}'] if i > 1 else cache['flatten']
    kernel = np.asarray(params[f'fc{i}']['kernel'], np.float64)
    # z = x @ kernel + bias, so d z / d kernel[m, n] = x[:, m] in column n, and d z / d x = kernel^T.
    grads[f'fc{i}'] = {'kernel': x.T @ grad, 'bias': grad.sum(axis=0)}
    grad = grad @ kernel.T

  # Flattening only reorders values: scatter each gradient back to the position its value came from.
  pooled = cache[f'pool{n_conv}']
  perm = model.flatten_permutation(cnn.flatten_order, pooled.shape[1:], cnn.flatten_seed)
  grad_hwc = np.empty_like(grad)
  grad_hwc[:, perm] = grad
  grad = grad_hwc.reshape(pooled.shape)

  for i in range(n_conv, 0, -1):
    grad = pool2d_backward(cache[f'conv{i}'], grad, cnn.pool, cnn.pool_window)
    grad = grad * f_grad(cache[f'conv{i}_pre'])
    x = cache[f'pool{i - 1}'] if i > 1 else cache['input']
    kernel = np.asarray(params[f'conv{i}']['kernel'], np.float64)
    grad, grad_kernel, grad_bias = conv2d_backward(x, kernel, grad, cnn.strides, cnn.padding)
    grads[f'conv{i}'] = {'kernel': grad_kernel, 'bias': grad_bias}
  return loss, {name: grads[name] for name in params}
