"""Seconds per iteration of pmgan.py against the number of generators K, and what batching the K
generators into one ensemble module buys over a Python loop of K separate generators.

    OMP_NUM_THREADS=1 python bench/pmgan_speed.py            # writes bench/results/pmgan_speed.{md,png}

Part 1 runs the real training script in this process (pmgan.main), all settings interleaved
(round r runs every setting once), and reads s/iteration from metrics.csv between two log rows
(warm-up and the final evaluation excluded); the median over rounds is reported.
Part 2 times one generator forward + backward: common.MLPGenerators / DCGANGenerators with K
members versus K separate single-member modules called in a loop, interleaved likewise.
"""
import csv
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402
import pmgan   # noqa: E402

KS = (1, 2, 4, 8, 16)
ROUNDS = 3
RESULTS = os.path.join(REPO, 'bench', 'results')
SETTINGS = {   # name: (flags, first and last logged iteration to time between)
    'ring8 (batch 256 split over K)': (['--dataset', 'ring8', '--n_iters', '401', '--log_interval', '100'], 100, 400),
    'ring8 (32 fakes per generator)': (['--dataset', 'ring8', '--n_iters', '401', '--log_interval', '100',
                                        '--gen_batch', '32'], 100, 400),
    'digits 16px DCGAN (batch 64 split over K)': (['--dataset', 'digits', '--batch_size', '64', '--n_iters', '41',
                                                   '--log_interval', '10'], 10, 40),
}


def seconds_per_iter(flags, first, last, K, data_root):
    with tempfile.TemporaryDirectory() as out:
        sys.argv = ['pmgan.py', '--n_gen', str(K), '--out_dir', out, '--data_root', data_root, '--sample_interval', '0',
                    '--ckpt_interval', '0', '--eval_samples', '500'] + flags
        pmgan.main()
        with open(os.path.join(out, 'metrics.csv')) as f:
            wall = {int(r['iteration']): float(r['wall_seconds']) for r in csv.DictReader(f)}
    return (wall[last] - wall[first]) / (last - first)


def loop_vs_ensemble(kind, K, reps):
    """Seconds per generator forward + backward: one K-member module vs K modules in a loop."""
    make = (lambda n: common.MLPGenerators(n, 100, (2,), hidden=(128, 128), batchnorm=False, tanh=False)) \
        if kind == 'mlp' else (lambda n: common.DCGANGenerators(n, 100, 16, 1, ngf=64))
    m = max(1, (256 if kind == 'mlp' else 64) // K)
    ensemble, loop = make(K), [make(1) for _ in range(K)]
    z = torch.randn(K, m, 100)
    times = {}
    for name, fn in [('ensemble', lambda: ensemble(z).square().mean().backward()),
                     ('loop', lambda: sum(g(z[k:k + 1]).square().mean() for k, g in enumerate(loop)).backward())]:
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times[name] = (time.perf_counter() - start) / reps
    return times


def main():
    torch.manual_seed(0)
    data_root = os.path.join(REPO, 'data')
    table = {name: {K: [] for K in KS} for name in SETTINGS}
    micro = {kind: {K: {'ensemble': [], 'loop': []} for K in KS} for kind in ('mlp', 'dcgan')}
    for r in range(ROUNDS):
        for K in KS:
            for name, (flags, first, last) in SETTINGS.items():
                table[name][K].append(seconds_per_iter(flags, first, last, K, data_root))
            for kind in micro:
                for impl, t in loop_vs_ensemble(kind, K, 200 if kind == 'mlp' else 10).items():
                    micro[kind][K][impl].append(t)
            print(f'round {r + 1}/{ROUNDS} K={K} done', file=sys.stderr, flush=True)

    med = lambda xs: statistics.median(xs)
    lines = ['# pmgan.py speed (2-core CPU, shared by other jobs; OMP_NUM_THREADS=1)', '',
             'Command: `OMP_NUM_THREADS=1 python bench/pmgan_speed.py` (all settings interleaved, median of '
             f'{ROUNDS} rounds).', '',
             '## Training: seconds per iteration (whole step: G forward, D/C step, beta, G step)', '',
             '| setting | ' + ' | '.join(f'K={K}' for K in KS) + ' | K=8 / K=1 |', '|---' * (len(KS) + 2) + '|']
    for name in SETTINGS:
        s = [med(table[name][K]) for K in KS]
        lines.append(f'| {name} | ' + ' | '.join(f'{v * 1000:.2f} ms' for v in s) + f' | {s[3] / s[0]:.2f}x |')
    lines += ['', '## Generator forward + backward: one K-member ensemble vs a Python loop over K modules', '',
              '| nets | ' + ' | '.join(f'K={K}' for K in KS) + ' |', '|---' * (len(KS) + 1) + '|']
    for kind, label in [('mlp', 'ring8 MLP 128x2, 256 samples split'), ('dcgan', 'DCGAN 16px ngf 64, 64 split')]:
        for impl in ('ensemble', 'loop'):
            lines.append(f'| {label}, {impl} | ' + ' | '.join(f'{med(micro[kind][K][impl]) * 1000:.2f} ms'
                                                             for K in KS) + ' |')
        lines.append(f'| {label}, loop / ensemble | ' + ' | '.join(
            f'{med(micro[kind][K]["loop"]) / med(micro[kind][K]["ensemble"]):.2f}x' for K in KS) + ' |')
    with open(os.path.join(RESULTS, 'pmgan_speed.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in SETTINGS:
        axes[0].plot(KS, [med(table[name][K]) * 1000 for K in KS], 'o-', label=name)
    axes[0].set(xscale='log', yscale='log', xlabel='K generators', ylabel='ms / iteration', title='pmgan.py training')
    axes[0].set_xticks(KS, [str(k) for k in KS])
    for kind in micro:
        for impl, style in [('ensemble', 'o-'), ('loop', 's--')]:
            axes[1].plot(KS, [med(micro[kind][K][impl]) * 1000 for K in KS], style, label=f'{kind} {impl}')
    axes[1].set(xscale='log', yscale='log', xlabel='K generators', ylabel='ms (G fwd + bwd)',
                title='ensemble module vs loop of K modules')
    axes[1].set_xticks(KS, [str(k) for k in KS])
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, 'pmgan_speed.png'), dpi=100)


if __name__ == '__main__':
    main()
