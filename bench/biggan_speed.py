"""Iterations per second of biggan_sn.py on CPU at 32x32: fp32 vs --amp (bf16), --d_steps 2 vs 1,
and sndcgan, measured side by side in one process.

Each configuration is the real script (in-process, digits, defaults otherwise) run for --iters
iterations; configurations are interleaved over --rounds rounds so that load from other processes
hits them alike. Timing comes from the log lines (--log_interval 1): the first --warmup iterations
and the last one (which also computes the end-of-run metrics) are dropped. Reported: median wall
and CPU (process) seconds per iteration, and ratios to the default configuration.

    OMP_NUM_THREADS=1 python bench/biggan_speed.py --rounds 3 --iters 12
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402

import common  # noqa: E402

CONFIGS = {
    'biggan (defaults: fp32, d_steps 2)': [],
    'biggan --amp': ['--amp'],
    'biggan --d_steps 1': ['--d_steps', '1'],
    'biggan --amp --d_steps 1': ['--amp', '--d_steps', '1'],
    'sndcgan (defaults: ch 16, d_steps 1)': ['--arch', 'sndcgan'],
}


def load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location('biggan_sn', os.path.join(REPO, 'biggan_sn.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_run(script, flags, iters, warmup, data_root):
    """Per-iteration (wall, cpu) seconds of one in-process run, from the log calls."""
    stamps = []
    log = common.Run.log

    def timed_log(self, iteration, losses, metrics=None):
        stamps.append((iteration, time.perf_counter(), time.process_time()))
        return log(self, iteration, losses, metrics)

    common.Run.log = timed_log
    try:
        with tempfile.TemporaryDirectory() as out:
            sys.argv = ['biggan_sn.py', '--n_iters', str(iters), '--log_interval', '1', '--sample_interval', '0',
                        '--ckpt_interval', '0', '--eval_samples', '64', '--data_root', data_root,
                        '--out_dir', out] + flags
            script.main()
    finally:
        common.Run.log = log
    (i0, w0, c0), (i1, w1, c1) = stamps[warmup - 1], stamps[-2]  # drop warm-up and the metrics step
    return (w1 - w0) / (i1 - i0), (c1 - c0) / (i1 - i0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--iters', type=int, default=12)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--data_root', default=os.path.join(REPO, 'data'))
    p.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'biggan_speed.json'))
    args = p.parse_args()
    command = 'OMP_NUM_THREADS=1 python ' + ' '.join(sys.argv)
    torch.set_num_threads(1)
    script = load_script()
    times = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, flags in CONFIGS.items():
            times[name].append(time_run(script, flags, args.iters, args.warmup, args.data_root))
            print(f'round {r + 1} {name}: {times[name][-1][0]:.3f} s/it wall, {times[name][-1][1]:.3f} s/it cpu',
                  flush=True)
    base = next(iter(CONFIGS))
    rows = {}
    for name, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        rows[name] = dict(wall_s_per_it=wall, cpu_s_per_it=cpu, it_per_s_wall=1 / wall, it_per_s_cpu=1 / cpu)
    for name, row in rows.items():
        row['cpu_time_vs_default'] = row['cpu_s_per_it'] / rows[base]['cpu_s_per_it']
        row['wall_time_vs_default'] = row['wall_s_per_it'] / rows[base]['wall_s_per_it']
    print(f'\n{"configuration":38s} {"it/s (cpu)":>10s} {"it/s (wall)":>11s} {"cpu time x":>10s} {"wall time x":>11s}')
    for name, row in rows.items():
        print(f'{name:38s} {row["it_per_s_cpu"]:10.2f} {row["it_per_s_wall"]:11.2f} '
              f'{row["cpu_time_vs_default"]:10.2f} {row["wall_time_vs_default"]:11.2f}')
    with open(args.out, 'w') as f:
        json.dump(dict(command=command, machine='2-core CPU, shared', rounds=args.rounds, iters=args.iters,
                       threads=torch.get_num_threads(), results=rows), f, indent=2)


if __name__ == '__main__':
    main()
