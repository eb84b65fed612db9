"""Training throughput of tinycnn's step in each training mode, side by side with its PyTorch peer.

    python benchmarks/throughput.py                       # the full table (several minutes)
    python benchmarks/throughput.py --batch_sizes=128 --channels=1 --repeats=3

A training step is the gather of a shuffled batch from a split held in memory, forward, softmax cross-entropy,
backward and an SGD-with-momentum update, exactly as train.py runs it (`train.training_functions`), without the
default's random shifts, which the peer does not make either; the peer gathers its batches from the same arrays
(`workload.random_examples`). Rows, per input channels C and batch size B:
  step      one jitted call per batch (train_mode='step'), images/s
  epoch     a whole epoch in one jitted lax.scan (train_mode='epoch'), images/s
  sweep8    8 models in one vmapped step (num_models=8), model-images/s; compare with `step`, which is what 8
            sequential runs would each reach
  sweep8_epoch  the same 8 models, a whole epoch of them in one lax.scan (num_models=8, train_mode='epoch')
  torch:*   benchmarks/torch_peer.py, when torch is installed (pip install -r benchmarks/requirements.txt); on the
            GPU when jax runs on one and torch was built with CUDA
Warm-up is excluded; each variant is timed `--repeats` times, interleaved with the others so that machine noise
hits all alike, and reported as median (min-max). The ratio to PyTorch is the median over repeats of each repeat's
ratio to the best PyTorch variant in that repeat. Each row also gives its process CPU time per wall second (2.0: both
threads busy all along): PyTorch's threads wait for each other at every op, so load from other processes slows it
far more than XLA, and a figure of the CPU peer's well under the thread count flags a disturbed run (on a GPU, one
thread launches the peer's kernels: about 1.0). The process is pinned to `--threads` CPUs, so that XLA's thread pool
and PyTorch's both have that many (--nopin_cpus on a GPU or TPU host). Each tinycnn row gives the compile time of the
program it times: `train_step` (vmapped in sweep8), or the whole epoch's scan in the epoch modes. Results are also
saved as JSON, in a new file per run, with the versions and every flag's value; a run stopped
early saves the rows it measured, marked "complete": false; a row keeps each repeat's rate, in the order run, and
the images a repeat trains (model-images in the sweeps). The `peak` line times a 4096x4096 fp32 matmul, the machine's
practical peak; GFLOP/s count the nominal FLOPs of `model.layer_info`.
"""

import importlib.metadata
import json
import os
import platform
import signal
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flag_checks  # noqa: E402
import workload  # noqa: E402

import model  # noqa: E402
import train  # noqa: E402
import workdir as workdir_lib  # noqa: E402
from configs import default  # noqa: E402

try:
  import torch_peer
except ImportError:  # torch is a benchmark-only dependency.
  torch_peer = None

FLAGS = flags.FLAGS
SWEEP_MODELS = 8
# Each mode's (config.train_mode, config.num_models).
MODES = {
  'step': ('step', 1),
  'epoch': ('epoch', 1),
  'sweep8': ('step', SWEEP_MODELS),
  'sweep8_epoch': ('epoch', SWEEP_MODELS),
}


def available_cpus() -> int:
  """The CPUs this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


flag_checks.define_positive_integers('batch_sizes', ['32', '128', '512', '2048'], 'Batch sizes B.')
flag_checks.define_positive_integers('channels', ['1', '3'], 'Input channels C.')
flag_checks.define_choices('modes', list(MODES), MODES, 'tinycnn training modes to time.')
flags.DEFINE_bool('torch', True, 'Time the PyTorch peer too, when torch is installed.')
flag_checks.define_choices(
  'torch_variants', None, torch_peer and torch_peer.VARIANTS, 'PyTorch peer variants (default: all of them).'
)
flags.register_multi_flags_validator(
  ['torch', 'torch_variants'],
  lambda values: values['torch'] or not values['torch_variants'],
  '--torch_variants names PyTorch variants to time, but --notorch times none: drop one of them',
)
flags.DEFINE_integer('repeats', 5, 'Timed repeats per variant.', lower_bound=1)
flags.DEFINE_integer('images_per_repeat', 16384, 'Training images per timed repeat (at least 10 steps).', lower_bound=1)

AVAILABLE_CPUS = available_cpus()  # Before --threads pins the process to fewer.
flags.DEFINE_integer(
  'threads', min(2, AVAILABLE_CPUS), 'CPUs the process is pinned to, and threads of the PyTorch peer (default 2, '
  'or the CPUs available if fewer).', lower_bound=1,
)  # fmt: skip
flags.register_validator(
  'threads', lambda threads: threads <= AVAILABLE_CPUS, f'--threads must be at most the {AVAILABLE_CPUS} CPUs available'
)
flags.DEFINE_bool('pin_cpus', True, 'Pin the process to --threads CPUs; --nopin_cpus on a GPU or TPU host.')
flags.DEFINE_string(
  'output', None,
  'Where to save the results as JSON (default: benchmarks/results/throughput_<date>_<time>.json); an existing file '
  'is never overwritten.',
)  # fmt: skip


def training_flops_per_image(channels: int) -> int:
  """Forward FLOPs of every conv/dense layer, twice more for the weight and input gradients, less conv1's input
  gradient, which nothing needs."""
  config = default.get_config()
  config.input_shape = (32, 32, channels)
  forward = {layer.name: layer.flops for layer in model.layer_info(config)}
  return 3 * sum(forward.values()) - forward['conv1']


def steps_per_repeat(batch_size: int) -> int:
  return max(10, FLAGS.images_per_repeat // batch_size)


def prepare_tinycnn(batch_size: int, channels: int, mode: str):
  """Builds and warms up one mode on `workload.random_examples`; returns (run() -> images, compile seconds)."""
  steps = steps_per_repeat(batch_size)
  train_mode, models = MODES[mode]
  train_epoch, _, compile_seconds = workload.training_epoch(batch_size, channels, steps, train_mode, models)

  def run():
    train_epoch()
    return steps * batch_size * models

  run()
  return run, compile_seconds


def torch_device() -> str:
  """Where the PyTorch peer runs: on the GPU when jax runs on one and this torch build has CUDA, else the CPU."""
  return 'cuda' if jax.default_backend() == 'gpu' and torch_peer.torch.cuda.is_available() else 'cpu'


def prepare_torch(batch_size: int, channels: int, variant: str, data: dict[str, np.ndarray]):
  """Builds and warms up one PyTorch variant on `data`; returns (run() -> images, None)."""
  steps = steps_per_repeat(batch_size)
  run_steps = torch_peer.prepare(batch_size, channels, variant, threads=FLAGS.threads, data=data, device=torch_device())

  def run():
    run_steps(steps)
    return steps * batch_size

  return run, None


def peak_gflops(size: int = 4096, repeats: int = 5) -> float:
  """fp32 GFLOP/s of a size x size matmul, the best of `repeats`."""
  a = jax.random.normal(jax.random.key(0), (size, size))
  matmul = jax.jit(jnp.matmul)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo on Linux), since these figures depend on it."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def timed(run) -> tuple[float, float, int]:
  """(wall seconds, process CPU seconds over all threads, images) of one run()."""
  wall, cpu = time.perf_counter(), time.process_time()
  images = run()
  return time.perf_counter() - wall, time.process_time() - cpu, images


def reserve_output(output: str):
  """Creates `output`, empty, and returns it open for writing: before any work, so that an existing file is never
  overwritten and a path that cannot be written is refused now, not after the whole benchmark."""
  if os.path.lexists(output):
    raise app.UsageError(f'--output={output} exists; name a new file, or move that one away first.')
  if not os.path.basename(output):
    raise app.UsageError(f'--output={output} names a directory; name a file, such as {output}results.json.')
  try:
    os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
    return open(output, 'x')
  except OSError as error:
    raise app.UsageError(f'--output={output} cannot be written: {error}') from None


def flag_values() -> dict:
  """{name: value} of this script's flags as run, defaults included."""
  modules = (sys.argv[0], flag_checks.__name__)  # absl files a script's own flags under its path.
  return {flag.name: flag.value for module in modules for flag in FLAGS.get_flags_for_module(module)}


def main(argv):
  del argv
  # The default is beside this script whatever the working directory, and never an earlier run's file.
  default_stem = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'results', time.strftime('throughput_%Y%m%d_%H%M%S')
  )
  output = FLAGS.output or workdir_lib.unused_path(default_stem, '.json')
  with reserve_output(output) as output_file:
    # A run stopped by `kill` or `timeout` then saves what it measured too (or removes its empty output).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = {'complete': False, 'machine': {}, 'rows': []}
    try:
      measure(results)
      results['complete'] = True
    except Exception as error:
      if not isinstance(error.__cause__, SystemExit):
        raise
      # The handler's exit, raised while Python code ran inside a C call that wrapped it: numpy's dtype check (a
      # SystemError), or jax's comparison of pytree metadata (a ValueError), say.
      raise error.__cause__ from None
    finally:
      if results['rows']:
        output_file.write(json.dumps(results, indent=1))  # Encoded first: a second interrupt cannot cut it short.
        if not results['complete']:
          print(f'Stopped: saved the {len(results["rows"])} rows measured to {output}, marked "complete": false.')
      else:
        os.remove(output)  # The empty file reserved above: nothing was measured.
  print(f'Saved {output}; load average {results["machine"]["load_average_end"]:.2f} at the end')


def measure(results: dict) -> None:
  """Times every (C, B, variant) of the flags, printing a row each, into results' 'machine' and 'rows'."""
  if FLAGS.pin_cpus and hasattr(os, 'sched_setaffinity'):
    # Before jax starts its CPU client, which sizes its pool by these CPUs. Not on an accelerator's host, whose
    # compiler uses every CPU: on an H100's, pinned to 2, train_step took 18 s to compile, not 2.3 s.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: FLAGS.threads])
  cpus = available_cpus()
  train.tune_cpu_runtime()  # As train.py does; the PyTorch peer, in this process too, gets it as well.
  peak = peak_gflops()
  machine = results['machine']
  machine.update({
    'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(), 'cpu': cpu_model(), 'cpus': cpus,
    'platform': platform.platform(), 'peak_gflops': peak, 'load_average_start': os.getloadavg()[0],
    'jax': jax.__version__, 'jaxlib': importlib.metadata.version('jaxlib'),
    'torch': torch_peer.torch.__version__ if torch_peer else None,
    'torch_device': torch_device() if torch_peer else None, 'flags': flag_values(),
  })  # fmt: skip
  print(f'{machine["device"]} ({machine["backend"]}): {machine["cpu"]}, {cpus} CPUs, jax {jax.__version__}; '
        f'peak fp32 matmul {peak:.0f} GFLOP/s; load average {machine["load_average_start"]:.2f}')  # fmt: skip
  torch_variants = (FLAGS.torch_variants or list(torch_peer.VARIANTS)) if torch_peer and FLAGS.torch else []
  if torch_variants:
    print(f'PyTorch {machine["torch"]} on {machine["torch_device"]}')
  if FLAGS.torch and not torch_peer:
    print('torch is not installed: no PyTorch peer rows (pip install -r benchmarks/requirements.txt).')
  for channels in map(int, FLAGS.channels):
    flops = training_flops_per_image(channels)
    for batch_size in map(int, FLAGS.batch_sizes):
      runners = {}
      for mode in FLAGS.modes:
        runners[mode] = prepare_tinycnn(batch_size, channels, mode)
      # The arrays tinycnn's modes train on (workload.random_examples is seeded), held once for all variants.
      data = workload.random_examples(steps_per_repeat(batch_size) * batch_size, channels) if torch_variants else None
      for variant in torch_variants:
        try:
          runners[f'torch:{variant}'] = prepare_torch(batch_size, channels, variant, data)
        except Exception as error:  # noqa: BLE001 -- torch.compile needs a working toolchain; report, go on.
          print(f'C={channels} B={batch_size} torch:{variant} failed: {type(error).__name__}: {error}'.splitlines()[0])
      rates, cpu_per_wall, images_per_repeat = {name: [] for name in runners}, {name: [] for name in runners}, {}
      for _ in range(FLAGS.repeats):
        for name, (run, _) in runners.items():
          wall, cpu, images_per_repeat[name] = timed(run)
          rates[name].append(images_per_repeat[name] / wall)
          cpu_per_wall[name].append(cpu / wall)
      torch_names = [name for name in rates if name.startswith('torch:')]
      best_torch = [max(rates[n][i] for n in torch_names) for i in range(FLAGS.repeats)] if torch_names else None
      for name, r in rates.items():
        median = statistics.median(r)
        nominal = not name.startswith('sweep')  # A sweep's model-images are not one model's work.
        row = {
          'channels': channels, 'batch_size': batch_size, 'variant': name,
          'steps_per_repeat': steps_per_repeat(batch_size), 'images_per_repeat': images_per_repeat[name],
          'images_per_second': r,
          'images_per_second_median': median, 'images_per_second_min': min(r), 'images_per_second_max': max(r),
          'cpu_seconds_per_second': statistics.median(cpu_per_wall[name]), 'compile_seconds': runners[name][1],
          'ratio_to_best_torch': statistics.median(np.divide(r, best_torch)) if best_torch else None,
          'gflops': median * flops / 1e9 if nominal else None,
          'fraction_of_peak': median * flops / 1e9 / peak if nominal else None,
        }  # fmt: skip
        results['rows'].append(row)
        print(
          f'C={channels} B={batch_size:5} {name:28} {median:9.0f} img/s ({min(r):.0f}-{max(r):.0f})'
          f'  cpu {row["cpu_seconds_per_second"]:.2f}'
          + (f'  x{row["ratio_to_best_torch"]:.2f} best torch' if best_torch else '')
          + (f'  {row["gflops"]:.1f} GFLOP/s, {100 * row["fraction_of_peak"]:.1f}% of peak' if nominal else '')
          + (f'  compile {row["compile_seconds"]:.2f} s' if row['compile_seconds'] else ''),
          flush=True,
        )
  machine['load_average_end'] = os.getloadavg()[0]


if __name__ == '__main__':
  app.run(main)
