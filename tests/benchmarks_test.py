"""The benchmark scripts' command lines: bad flags are refused before any work, and results are never lost."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import train

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
HAS_TORCH = importlib.util.find_spec('torch') is not None
AVAILABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def script_command(name, *flags):
  return [sys.executable, os.path.join(BENCHMARKS, name), *flags]


def run_script(name, *flags, cwd=None):
  return subprocess.run(script_command(name, *flags), capture_output=True, text=True, cwd=cwd, timeout=300)


def start_throughput(*flags):
  """throughput.py running in the background, its output read line by line as it prints."""
  command = script_command('throughput.py', '--batch_sizes=32', '--modes=step', '--notorch', '--nopin_cpus', *flags)
  return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


# The least work each script accepts: the flag under test, given after them, overrides theirs.
QUICK_FLAGS = {
  'throughput.py': ['--batch_sizes=32', '--channels=1', '--modes=step', '--notorch', '--repeats=1',
                    '--images_per_repeat=32', '--nopin_cpus', '--output=/dev/null/never'],
  'conv_variants.py': ['--batch_sizes=32', '--channels=1', '--repeats=1', '--images_per_repeat=32'],
  'profile_step.py': ['--batch_size=32', '--channels=1', '--steps=1', '--trace_dir=/dev/null/never'],
  'torch_peer.py': ['--batch_sizes=32', '--channels=1', '--repeats=1', '--images_per_repeat=32'],
}  # fmt: skip


@pytest.mark.parametrize(
  'script, flag, message',
  [
    ('throughput.py', '--batch_sizes=128,0', 'batch_sizes must be one or more distinct comma-separated integers >= 1'),
    ('throughput.py', '--channels=-1', '--channels must be one or more distinct comma-separated integers >= 1'),
    ('throughput.py', '--batch_sizes=', '--batch_sizes must be one or more distinct comma-separated integers >= 1'),
    ('throughput.py', '--modes=step,stp', "--modes must be one or more of ('step', 'epoch', 'sweep8', 'sweep8_epoch')"),
    ('throughput.py', '--modes=step,step', "('step', 'epoch', 'sweep8', 'sweep8_epoch'), comma-separated, each once"),
    ('throughput.py', '--batch_sizes=32,032', '--batch_sizes must be one or more distinct comma-separated integers'),
    ('throughput.py', '--repeats=0', '--repeats=0: 0 is not a positive integer'),
    ('throughput.py', '--threads=0', '--threads=0: 0 is not a positive integer'),
    ('throughput.py', f'--threads={AVAILABLE_CPUS + 1}', '--threads must be at most the'),
    ('throughput.py', '--torch_variants=eager', 'but --notorch times none'),  # The quick flags have --notorch.
    ('conv_variants.py', '--batch_sizes=0', '--batch_sizes must be one or more distinct comma-separated integers >= 1'),
    ('profile_step.py', '--num_models=0', '--num_models=0: 0 is not a positive integer'),
    ('profile_step.py', '--steps=-3', '--steps=-3: -3 is not a positive integer'),
    pytest.param(
      'throughput.py', '--torch_variants=eagre', "--torch_variants must be one or more of ('eager',",
      marks=pytest.mark.skipif(not HAS_TORCH, reason='torch_peer.VARIANTS needs torch'),
    ),
    pytest.param(
      'torch_peer.py', '--variants=eager,compiled', "--variants must be one or more of ('eager',",
      marks=pytest.mark.skipif(not HAS_TORCH, reason='torch is a benchmark-only dependency'),
    ),
  ],
)  # fmt: skip
def test_a_bad_flag_is_refused_as_the_flags_are_parsed(script, flag, message):
  result = run_script(script, *QUICK_FLAGS[script], flag)  # A flag wrongly accepted then fails in seconds.
  assert result.returncode != 0
  assert 'Flags parsing error' in result.stderr and message in result.stderr
  assert result.stdout == ''  # Nothing was measured or printed.


@pytest.mark.parametrize(
  'output, message',
  [
    ('results.json', 'exists; name a new file'),
    ('a_dir/', 'names a directory; name a file'),
    ('results.json/new.json', 'cannot be written'),  # Under a file.
  ],
  ids=['an existing file', 'a directory', 'a path under a file'],
)
def test_throughput_refuses_an_output_that_is_not_a_new_file_before_any_work(tmp_path, output, message):
  (tmp_path / 'results.json').write_text('{"rows": "earlier"}')
  result = run_script('throughput.py', f'--output={tmp_path}/{output}')
  assert result.returncode != 0
  assert f'--output={tmp_path}/{output} {message}' in result.stderr
  assert 'GFLOP/s' not in result.stdout  # Refused before the peak matmul, the first thing measured.
  assert os.listdir(tmp_path) == ['results.json'] and (tmp_path / 'results.json').read_text() == '{"rows": "earlier"}'


def test_a_throughput_run_stopped_after_a_row_saves_the_rows_measured_as_incomplete(tmp_path):
  output = tmp_path / 'results.json'
  flags = ['--channels=1', '--batch_sizes=32,64', '--repeats=1', '--images_per_repeat=320', f'--output={output}']
  with start_throughput(*flags) as run:
    assert 'peak fp32 matmul' in run.stdout.readline()
    assert run.stdout.readline().startswith('C=1 B=   32 step')
    run.send_signal(signal.SIGTERM)  # While B=64's step compiles: within a channel, whose rows are saved as measured.
    assert run.wait(timeout=300) == 128 + signal.SIGTERM
    assert 'Stopped: saved the 1 rows measured' in run.stdout.read()
  saved = json.loads(output.read_text())
  assert saved['complete'] is False
  assert [(row['channels'], row['batch_size'], row['variant']) for row in saved['rows']] == [(1, 32, 'step')]


def test_a_throughput_run_stopped_by_sigterm_removes_its_reserved_output(tmp_path):
  output = tmp_path / 'results.json'
  with start_throughput('--channels=1', '--repeats=1000', f'--output={output}') as run:
    assert 'peak fp32 matmul' in run.stdout.readline()  # Printed once the output is reserved.
    assert output.exists()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 128 + signal.SIGTERM
  assert os.listdir(tmp_path) == []  # So the same --output can be given again.


# SIGTERM's handler raises SystemExit wherever Python code runs, which may be under a C call that wraps it as the
# cause of its own error: numpy's dtype check raises a SystemError, jax's comparison of pytree metadata a ValueError.
@pytest.mark.parametrize('wrapper', ['SystemError', 'ValueError'])
def test_a_throughput_run_stopped_inside_a_c_call_exits_as_stopped_and_saves_its_rows(tmp_path, wrapper):
  output = tmp_path / 'results.json'
  code = f"""
import sys, throughput
from absl import app
def measure(results):
  results['rows'].append({{'channels': 1}})
  try:
    raise SystemExit(143)  # As the handler of signal 15 raises it.
  except SystemExit as stop:
    raise {wrapper}('raised by a C call') from stop
throughput.measure = measure
sys.argv = ['throughput.py', '--output={output}']
app.run(throughput.main)
"""
  result = subprocess.run([sys.executable, '-c', code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)
  assert result.returncode == 128 + signal.SIGTERM, result.stderr
  assert 'Stopped: saved the 1 rows measured' in result.stdout and 'raised by a C call' not in result.stderr
  assert json.loads(output.read_text()) == {'complete': False, 'machine': {}, 'rows': [{'channels': 1}]}


@pytest.mark.parametrize('trace_dir', ['notes', ''])
def test_profile_step_refuses_a_trace_dir_that_cannot_be_a_directory_before_any_work(tmp_path, trace_dir):
  (tmp_path / 'notes').write_text('mine')
  result = run_script('profile_step.py', f'--trace_dir={tmp_path / trace_dir if trace_dir else ""}', cwd=tmp_path)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  problem = "notes' is not a directory" if trace_dir else "--trace_dir='' is empty"
  assert f'{problem}; name a directory.' in result.stderr and result.stdout == ''  # Nothing compiled or traced.
  assert os.listdir(tmp_path) == ['notes'] and (tmp_path / 'notes').read_text() == 'mine'


@pytest.mark.parametrize('flags', [[], ['--mode=epoch', '--num_models=2']], ids=['step', 'epoch sweep'])
def test_profile_step_groups_each_op_by_layer_pass_and_optimizer(tmp_path, flags):
  result = run_script(
    'profile_step.py', '--steps=2', '--batch_size=8', '--channels=1', '--top=1000', f'--trace_dir={tmp_path}', *flags
  )
  assert result.returncode == 0, result.stderr
  groups = {line.split('ms/step')[1].split(':')[0].strip() for line in result.stdout.splitlines() if 'ms/step' in line}
  layers = [
    f'{layer} {direction}'
    for layer in ('conv1', 'pool1', 'conv2', 'pool2', 'fc1', 'fc2')
    for direction in ('forward', 'backward')
  ]
  assert set(layers) | {'optimizer'} <= groups


def test_profile_step_names_each_op_by_its_layer_and_pass():
  # The op_name that jax writes into each HLO instruction: autodiff's backward pass is a transpose(...) of the jvp.
  hlo = """
  %dot.3 = f32[8,24]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(CNN)/conv1/dot_general"}
  %dot.7 = f32[144,24]{1,0} dot(%c, %d), metadata={op_name="jit(step)/transpose(jvp(CNN))/conv1/dot_general"}
  %max.2 = f32[8,14]{1,0} maximum(%e, %f), metadata={op_name="jit(step)/jvp(CNN)/pool1/max"}
  ROOT %add.1 = f32[3]{0} add(%g, %h), metadata={op_name="jit(step)/vmap(optimizer)/add"}
  %exp.5 = f32[8,10]{1,0} exponential(%i), metadata={op_name="jit(step)/jvp(log_softmax)/exp"}
  """
  code = f'import json, profile_step; print(json.dumps(profile_step.op_groups({hlo!r})))'
  result = subprocess.run([sys.executable, '-c', code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.splitlines()[-1]) == {
    'dot.3': 'conv1 forward: dot',
    'dot.7': 'conv1 backward: dot',
    'max.2': 'pool1 forward: max',
    'add.1': 'optimizer: add',
    'exp.5': 'loss, data and other: exp',
  }


def test_throughput_saves_every_row_it_prints_and_its_machine(tmp_path):
  output = tmp_path / 'new' / 'results.json'
  result = run_script(
    'throughput.py', '--batch_sizes=32', '--channels=1,3', '--modes=step,sweep8', '--notorch', '--repeats=3',
    '--images_per_repeat=64', f'--output={output}', '--nopin_cpus',
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  saved = json.loads(output.read_text())
  assert [(row['channels'], row['batch_size'], row['variant']) for row in saved['rows']] == [
    (1, 32, 'step'),
    (1, 32, 'sweep8'),
    (3, 32, 'step'),
    (3, 32, 'sweep8'),
  ]
  for row, flops_per_image in zip(saved['rows'], (throughput_flops(1), None, throughput_flops(3), None), strict=True):
    rates = row['images_per_second']
    assert len(rates) == 3 and min(rates) > 0
    assert row['images_per_second_median'] == sorted(rates)[1]  # Not the mean.
    assert (row['images_per_second_min'], row['images_per_second_max']) == (min(rates), max(rates))
    assert row['steps_per_repeat'] == 10  # At least 10 steps, though 64 images make 2 batches of 32.
    assert row['images_per_repeat'] == 10 * 32 * (8 if row['variant'] == 'sweep8' else 1)  # 8 models' images.
    assert row['compile_seconds'] > 0
    if flops_per_image is None:  # A sweep's model-images are not one model's work.
      assert row['gflops'] is None
      continue
    assert row['gflops'] * 1e9 == pytest.approx(row['images_per_second_median'] * flops_per_image)
  assert saved['complete'] is True and saved['machine']['peak_gflops'] > 0 and f'Saved {output}' in result.stdout
  # How the table was made: the versions, and every flag of the script with its value, defaults included.
  assert saved['machine']['jax'] == jax.__version__
  assert saved['machine']['flags'] == {
    'batch_sizes': ['32'], 'channels': ['1', '3'], 'modes': ['step', 'sweep8'], 'torch': False,
    'torch_variants': None, 'repeats': 3, 'images_per_repeat': 64, 'threads': min(2, AVAILABLE_CPUS), 'pin_cpus': False,
    'output': str(output),
  }  # fmt: skip


def test_throughputs_figures_follow_from_each_repeats_images_wall_and_cpu_time(tmp_path):
  # Each repeat timed as given here (wall seconds in turn, CPU time twice the wall): every figure a row saves is then
  # known from the images it counts.
  output = tmp_path / 'results.json'
  code = (
    'import itertools, throughput; from absl import app; walls = itertools.cycle([0.5, 0.25, 1.0]); '
    'throughput.timed = lambda run: (wall := next(walls), 2 * wall, run()); app.run(throughput.main)'
  )
  flags = ['--batch_sizes=32', '--channels=1', '--modes=step,sweep8', '--notorch', '--repeats=3',
           '--images_per_repeat=32', f'--output={output}', '--nopin_cpus']  # fmt: skip
  result = subprocess.run([sys.executable, '-c', code, *flags], cwd=BENCHMARKS, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  saved = json.loads(output.read_text())
  step, sweep = saved['rows']
  for row, models in ((step, 1), (sweep, 8)):  # The two variants take the walls in turn: each gets all three.
    images = 10 * 32 * models
    assert sorted(row['images_per_second']) == [images / 1.0, images / 0.5, images / 0.25]
    assert row['images_per_second_median'] == images / 0.5 and row['cpu_seconds_per_second'] == 2.0
  flops, peak = throughput_flops(1), saved['machine']['peak_gflops']
  assert step['gflops'] == pytest.approx(640 * flops / 1e9) and step['fraction_of_peak'] == pytest.approx(
    640 * flops / 1e9 / peak
  )


def throughput_flops(channels: int) -> int:
  """Forward FLOPs (conv1 117,600 per input channel, conv2 90,000, fc1 30,000, fc2 2,000) times 3, less conv1's
  input gradient: a training step's, per image."""
  return 3 * (117_600 * channels + 90_000 + 30_000 + 2_000) - 117_600 * channels


@pytest.mark.skipif(not HAS_TORCH, reason='torch is a benchmark-only dependency')
def test_throughputs_ratio_to_pytorch_is_the_median_of_each_repeats_ratio_to_the_best_variant(tmp_path):
  output = tmp_path / 'results.json'
  result = run_script(
    'throughput.py', '--batch_sizes=32', '--channels=1', '--modes=step', '--torch_variants=eager,eager_channels_last',
    '--repeats=3', '--images_per_repeat=32', f'--output={output}', '--nopin_cpus',
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  rows = {row['variant']: row for row in json.loads(output.read_text())['rows']}
  best_torch = np.maximum(*(rows[f'torch:{v}']['images_per_second'] for v in ('eager', 'eager_channels_last')))
  for name, row in rows.items():
    assert row['ratio_to_best_torch'] == pytest.approx(np.median(np.divide(row['images_per_second'], best_torch)))
    assert (row['ratio_to_best_torch'] <= 1) if name.startswith('torch:') else row['ratio_to_best_torch'] > 0


def test_throughputs_default_output_is_beside_the_script_whatever_the_working_directory(tmp_path):
  result = run_script(
    'throughput.py', '--batch_sizes=32', '--channels=1', '--modes=step', '--notorch', '--repeats=1',
    '--images_per_repeat=64', '--nopin_cpus', cwd=tmp_path,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  output = re.search(r'^Saved (\S+);', result.stdout, re.MULTILINE)[1]
  try:
    assert os.path.dirname(output) == os.path.join(BENCHMARKS, 'results') and os.listdir(tmp_path) == []
    assert re.fullmatch(r'throughput_\d{8}_\d{6}(_\d+)?\.json', os.path.basename(output))
  finally:
    os.remove(output)


@pytest.fixture
def benchmarks_on_path(monkeypatch):
  monkeypatch.syspath_prepend(BENCHMARKS)


def test_the_workload_refuses_what_train_py_would_refuse(benchmarks_on_path):
  import workload

  with pytest.raises(ValueError, match=r'input_shape=\(32, 32, 0\) is not valid'):
    workload.training_epoch(32, 0, 10, 'step')
  with pytest.raises(ValueError, match='config.num_models=0 is not valid'):
    workload.training_epoch(32, 1, 10, 'step', num_models=0)


def test_the_workload_trains_as_the_pytorch_peer_does(benchmarks_on_path):
  import workload

  config = workload.benchmark_config(32, 3)
  assert (config.optimizer, config.momentum) == ('momentum', 0.9)  # SGD with momentum,
  assert (config.learning_rate, config.schedule) == (0.01, 'constant')  # at a constant 0.01,
  assert config.random_crop_padding == 0 and config.random_flip is False  # The peer neither shifts nor mirrors,
  assert config.weight_decay == 0 and config.grad_clip_norm == 0  # nor decays or clips.
  assert (config.batch_size, config.input_shape) == (32, (32, 32, 3))


def test_the_workloads_random_examples_are_the_same_arrays_each_time(benchmarks_on_path):
  import workload

  # throughput.py's PyTorch rows train on a second call's arrays, tinycnn's on its own call's.
  first, second = workload.random_examples(100, 3), workload.random_examples(100, 3)
  assert first['image'].shape == (100, 32, 32, 3) and first['image'].dtype == np.float32
  assert first['label'].dtype == np.int32 and set(first['label']) == set(range(10))  # All ten classes.
  jax.tree.map(np.testing.assert_array_equal, first, second)


@pytest.mark.skipif(not HAS_TORCH, reason='torch is a benchmark-only dependency')
def test_the_pytorch_peer_gathers_each_batch_from_the_data_in_a_fixed_shuffled_order(benchmarks_on_path, monkeypatch):
  import torch
  import torch_peer
  import workload

  batches = []

  def recording_step(images, labels):
    batches.append((images.numpy(), labels.numpy()))
    return torch.zeros(())

  steps_made = []
  monkeypatch.setattr(
    torch_peer, 'make_step', lambda *args, **kwargs: steps_made.append(args) or (None, recording_step)
  )
  labels = np.arange(12, dtype=np.int32)  # Example i is labelled i and filled with i.
  data = {'image': np.broadcast_to(labels[:, None, None, None], (12, 32, 32, 1)).astype(np.float32), 'label': labels}
  torch_peer.prepare(4, 1, 'eager', warmup_steps=3, data=data)(6)  # A warm-up epoch of 3 batches, then 2 epochs.
  # As throughput.py calls it: the step of tinycnn's benchmark optimiser (the same learning rate).
  assert steps_made == [(4, 1, 'eager', workload.benchmark_config(4, 1).learning_rate)]
  order = [labels for _, labels in batches]
  assert sorted(np.concatenate(order[:3])) == list(range(12)) and not np.array_equal(np.concatenate(order[:3]), labels)
  np.testing.assert_array_equal(order[:3], order[3:6])  # The same order each epoch, as tinycnn's timed epochs.
  np.testing.assert_array_equal(order[3:6], order[6:])
  for images, labels in batches:
    assert images.shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(images, np.broadcast_to(labels[:, None, None, None], images.shape))


@pytest.mark.skipif(not HAS_TORCH, reason='torch is a benchmark-only dependency')
@pytest.mark.parametrize('variant', ['eager', 'eager_channels_last'])
def test_the_pytorch_peer_trains_the_same_network_with_the_same_optimiser(benchmarks_on_path, variant):
  import torch
  import torch_peer
  import workload

  batch_size, channels = 16, 3
  config = workload.benchmark_config(batch_size, channels)
  state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=2)
  peer, peer_step = torch_peer.make_step(batch_size, channels, variant)
  torch_peer.load_flax_params(peer, state.params)
  data = workload.random_examples(2 * batch_size, channels)
  for step in range(2):  # The second update carries the first one's momentum.
    batch = jax.tree.map(lambda x, step=step: x[step * batch_size : (step + 1) * batch_size], data)
    state, metrics = jax.jit(train.train_step)(state, batch)
    images = torch.from_numpy(batch['image']).permute(0, 3, 1, 2)  # [B, C, H, W], channels_last in memory.
    if variant == 'eager':
      images = images.contiguous()
    loss = peer_step(images, torch.from_numpy(batch['label']).long())
    np.testing.assert_allclose(loss.item(), metrics['loss_sum'] / batch_size, rtol=1e-5)
  for name, params in state.params.items():
    layer = getattr(peer, name)
    kernel = np.asarray(params['kernel'])
    np.testing.assert_allclose(
      layer.weight.detach().numpy(), kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T, atol=1e-6
    )
    np.testing.assert_allclose(layer.bias.detach().numpy(), params['bias'], atol=1e-6)
