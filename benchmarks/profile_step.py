"""Where a training step's time goes: a jax.profiler trace of train_step, its ops summed per layer and kind.

    python benchmarks/profile_step.py                              # step mode, C=3, B=512
    python benchmarks/profile_step.py --channels=1 --batch_size=128 --top=20
    python benchmarks/profile_step.py --mode=epoch --channels=3 --batch_size=128

The step is train.py's (--mode: train_mode 'step' or 'epoch'), on workload.py's random data with momentum SGD.
Each op XLA runs is attributed to the model layer and pass (forward, or backward: the transpose of the forward)
named in its HLO metadata, e.g. 'conv1 forward: concatenate' or 'conv2 backward: dot_general'; the table gives each
group's share of the summed op time. On the CPU, some of the dots' work is missing from their ops' time (C=3
B=512: conv1's forward dot, 0.35 GFLOP, showed as 0.2 ms, and all ops summed to 13.9 ms of a 25.2 ms step; XLA
seems to finish such dots in Eigen's thread pool after the traced op returns). The raw trace stays in --trace_dir
for TensorBoard's profile plugin or Perfetto.
"""

import collections
import glob
import os
import re
import sys
import time

# XLA:CPU records each op it runs in a profiler trace only with this flag, which must be set before jax starts.
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true'

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import workload  # noqa: E402

import train  # noqa: E402
import workdir as workdir_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 512, 'Batch size B.', lower_bound=1)
flags.DEFINE_integer('channels', 3, 'Input channels C.', lower_bound=1)
flags.DEFINE_integer('steps', 20, 'Traced training steps (one epoch of them in epoch mode).', lower_bound=1)
flags.DEFINE_enum('mode', 'step', ('step', 'epoch'), "train.py's train_mode: a jitted call per step, or one scan.")
flags.DEFINE_integer('num_models', 1, 'Models trained side by side with jax.vmap (config.num_models).', lower_bound=1)
flags.DEFINE_integer('top', 12, 'Groups to print.', lower_bound=1)
flags.DEFINE_string(
  'trace_dir',
  os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'trace'),
  'Where the jax.profiler trace is written (default: benchmarks/results/trace).',
)

# pool<i> is conv i's activation and pooling (`model.CNN` names them with jax.named_scope).
LAYERS = ('conv1', 'conv2', 'pool1', 'pool2', 'fc1', 'fc2')


def op_groups(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> 'layer pass: kind', from the op_name metadata jax writes into every instruction."""
  groups = {}
  pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*op_name="([^"]*)"', re.MULTILINE)
  for name, op_name in pattern.findall(hlo_text):
    kind = re.sub(r'[.\-]\d+$', '', name)  # 'dot_general.13' -> 'dot_general': the op's kind, as XLA names it.
    layer = next((layer for layer in LAYERS if f'/{layer}/' in op_name or op_name.endswith(f'/{layer}')), None)
    if layer is None:
      # train_step's named_scope: '.../optimizer/add', or '.../vmap(optimizer)/add' in a sweep.
      layer = 'optimizer' if re.search(r'\boptimizer\b', op_name) else 'loss, data and other'
    direction = ' backward' if 'transpose(' in op_name else (' forward' if layer in LAYERS else '')
    groups[name] = f'{layer}{direction}: {kind}'
  return groups


def main(argv):
  del argv
  workdir_lib.make_directory(FLAGS.trace_dir, '--trace_dir', app.UsageError)  # Now, not after compiling and tracing.
  train.tune_cpu_runtime()
  train_epoch, compiled, _ = workload.training_epoch(
    FLAGS.batch_size, FLAGS.channels, FLAGS.steps, FLAGS.mode, FLAGS.num_models
  )
  groups = op_groups(compiled.as_text())
  train_epoch()
  with jax.profiler.trace(FLAGS.trace_dir):
    start = time.perf_counter()
    train_epoch()
    wall = time.perf_counter() - start

  newest_trace = max(glob.glob(f'{FLAGS.trace_dir}/**/*.xplane.pb', recursive=True), key=os.path.getmtime)
  seconds = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(newest_trace).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in groups:
          seconds[groups[event.name]] += event.duration_ns / 1e9
  total = sum(seconds.values())
  models = f' K={FLAGS.num_models} models' if FLAGS.num_models > 1 else ''
  rate = FLAGS.num_models * FLAGS.batch_size * FLAGS.steps / wall
  print(
    f'{jax.devices()[0].device_kind} ({jax.default_backend()}), {FLAGS.mode} mode, C={FLAGS.channels} '
    f'B={FLAGS.batch_size}{models}: {1e3 * wall / FLAGS.steps:.2f} ms per step, '
    f'{rate:.0f} {"model-images" if models else "images"}/s; ops {1e3 * total / FLAGS.steps:.2f} ms per step summed '
    'over threads'
  )
  if not total:
    print('No op events in the trace (this backend names its ops differently): open it in TensorBoard instead.')
  for group, group_seconds in seconds.most_common(FLAGS.top):
    print(f'{100 * group_seconds / total:5.1f}%  {1e3 * group_seconds / FLAGS.steps:7.3f} ms/step  {group}')
  print(f'Trace: {newest_trace}')


if __name__ == '__main__':
  app.run(main)
