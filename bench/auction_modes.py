"""Figures 1-2 of Shim, Choe and Kim, "A Study on Auction-Inspired Multi-GAN Training": six vanilla
GANs and six WGANs on ring8 and grid25, with and without the auction.

    OMP_NUM_THREADS=1 python bench/auction_modes.py             # runs, then tables + figures
    OMP_NUM_THREADS=1 python bench/auction_modes.py --report    # tables + figures from finished runs

Every (loss, data set, seed) is trained twice with identical flags, once with the auction every
iteration and once with --no_auction, 20,000 iterations (the baselines need about that to
reach real quality on grid25). Runs go to runs/bench_auction_modes/, seed by seed (a finished run
is skipped, a stopped one continues from its checkpoint, so an interrupted sweep continues and
holds every condition for its first seeds). The report gives, per condition, mean +- std over seeds
of the union's modes covered / high-quality fraction / KL to uniform, and the same for single pairs
(over all seeds x 6 pairs); it writes bench/results/auction_modes.md and one scatter figure per
(loss, data set): seed 0, each pair's generator in its own panel, top row without the auction,
bottom row with it (the layout of the seed's figures).
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

LOSS_FLAGS = {'gan': ['--loss', 'gan'],
              'wgan': ['--loss', 'wgan', '--gp', '0.1', '--n_critic', '1'],                  # WGAN-GP, toy lambda
              'wganstd': ['--loss', 'wgan', '--gp', '0.1', '--n_critic', '1', '--bid_norm', 'standard'],
              'wganclip': ['--loss', 'wgan', '--lr', '2e-4', '--n_critic', '5']}             # WGAN, clipping 0.01
TITLES = {'gan': 'vanilla GANs', 'wgan': 'WGAN-GPs (gp 0.1)', 'wganstd': 'WGAN-GPs (gp 0.1), standardised bids',
          'wganclip': 'WGANs (weight clipping)'}
AUCTION_ONLY = {'wganstd'}   # --bid_norm changes the auction only: without it the run is wgan's
COMMON_FLAGS = ['--n_gans', '6', '--width', '64', '--batch_size', '64', '--lr', '5e-4', '--lot_size', '32',
                '--log_interval', '1000', '--eval_interval', '2000', '--sample_interval', '0',
                '--ckpt_interval', '2000', '--resume', 'auto']   # a stopped run continues from its checkpoint
MODES = {'none': ['--no_auction'], 'auction': []}


def folder(runs_dir, loss, dataset, mode, seed):
    return os.path.join(runs_dir, f'{loss}-{dataset}-{mode}-s{seed}')


def sweep(a):
    jobs = [(loss, ds, mode, seed) for seed, loss, ds, mode in   # seed-major: a stopped sweep has every condition
            itertools.product(a.seeds, a.losses, ('ring8', 'grid25'), MODES)
            if not (loss in AUCTION_ONLY and mode == 'none')]
    todo = [j for j in jobs if not os.path.exists(os.path.join(folder(a.runs_dir, *j), 'summary.json'))]
    running = []
    env = dict(os.environ, OMP_NUM_THREADS='1')
    while todo or running:
        while todo and len(running) < a.jobs:
            loss, ds, mode, seed = job = todo.pop(0)
            out = folder(a.runs_dir, *job)
            cmd = ([sys.executable, os.path.join(REPO, 'auction_gan.py'), '--dataset', ds, '--seed', str(seed),
                    '--n_iters', str(a.n_iters), '--out_dir', out] + COMMON_FLAGS + LOSS_FLAGS[loss] + MODES[mode])
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, 'stdout.txt'), 'w')
            running.append((job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
            print('started', ' '.join(cmd[1:]), flush=True)
        time.sleep(2)
        for entry in list(running):
            job, proc, t0 = entry
            if proc.poll() is not None:
                running.remove(entry)
                print(f'finished {job} rc={proc.returncode} in {time.time() - t0:.0f}s', flush=True)


PRDC = ('precision_2d', 'recall_2d', 'density_2d', 'coverage_2d')


def mean_std(values):
    return [round(statistics.mean(values), 4), round(statistics.stdev(values) if len(values) > 1 else 0.0, 4)]


def report(a):
    table = {}
    for loss, ds, mode in itertools.product(LOSS_FLAGS, ('ring8', 'grid25'), MODES):
        summaries = []
        for seed in a.seeds:
            path = os.path.join(folder(a.runs_dir, loss, ds, mode, seed), 'summary.json')
            if os.path.exists(path):
                with open(path) as f:
                    summaries.append(json.load(f))
        if not summaries:
            continue
        row = {'seeds': len(summaries), 'wall_seconds': mean_std([s['wall_seconds'] for s in summaries]),
               'cpu_seconds': mean_std([s['cpu_seconds'] for s in summaries])}
        pair = lambda s, key: [s[f'{key}_{i}'] for i in range(len(s['wins']))]   # <figure>_<i>: pair i's
        for key in ('modes_covered', 'hq_fraction', 'kl_uniform') + PRDC:
            if key not in summaries[0]:   # runs from before the precision/recall figures
                continue
            row['union_' + key] = mean_std([s[key] for s in summaries])
            row['pair_' + key] = mean_std([v for s in summaries for v in pair(s, key)])
        row['union_modes_per_seed'] = [s['modes_covered'] for s in summaries]
        row['pair_modes_per_seed'] = [pair(s, 'modes_covered') for s in summaries]
        if mode == 'auction':  # does the auction's favourite pair look best by the metrics?
            row['wins_per_seed'] = [[int(w) for w in s['wins']] for s in summaries]
            top = [max(range(len(s['wins'])), key=lambda i: s['wins'][i]) for s in summaries]
            for key in ('modes_covered', 'hq_fraction'):
                row['top_winner_' + key] = mean_std([pair(s, key)[t] for s, t in zip(summaries, top)])
                row['others_' + key] = mean_std([v for s, t in zip(summaries, top)
                                                 for i, v in enumerate(pair(s, key)) if i != t])
        table[f'{loss}-{ds}-{mode}'] = row
    n_modes = {'ring8': 8, 'grid25': 25}
    lines = ['| loss | data | auction | union modes | union HQ | union KL | union precision / recall / coverage | '
             'pair modes | pair HQ | pair KL | pair coverage | CPU s | seeds |', '|---' * 13 + '|']
    for key, r in table.items():
        loss, ds, mode = key.split('-')
        f = lambda v, d=2: f'{v[0]:.{d}f} +- {v[1]:.{d}f}' if v else '-'
        lines.append(f'| {loss} | {ds} | {"yes" if mode == "auction" else "no"} | {f(r["union_modes_covered"], 1)} '
                     f'/ {n_modes[ds]} | {f(r["union_hq_fraction"], 3)} | {f(r["union_kl_uniform"])} | '
                     f'{f(r.get("union_precision_2d"))} / {f(r.get("union_recall_2d"))} / '
                     f'{f(r.get("union_coverage_2d"))} | '
                     f'{f(r["pair_modes_covered"], 1)} | {f(r["pair_hq_fraction"], 3)} | {f(r["pair_kl_uniform"])} | '
                     f'{f(r.get("pair_coverage_2d"))} | {f(r["cpu_seconds"], 0)} | {r["seeds"]} |')
    lines += ['', '| loss | data | most-winning pair: modes, HQ | the other pairs: modes, HQ |', '|---|---|---|---|']
    for key, r in table.items():
        if key.endswith('-auction'):
            lines.append(f'| {key.split("-")[0]} | {key.split("-")[1]} | {r["top_winner_modes_covered"][0]:.1f}, '
                         f'{r["top_winner_hq_fraction"][0]:.3f} | {r["others_modes_covered"][0]:.1f}, '
                         f'{r["others_hq_fraction"][0]:.3f} |')
    print('\n'.join(lines))
    os.makedirs(os.path.join(REPO, 'bench', 'results'), exist_ok=True)
    raw = {'n_iters': a.n_iters, 'flags': COMMON_FLAGS, 'loss_flags': LOSS_FLAGS, 'table': table}
    with open(os.path.join(REPO, 'bench', 'results', 'auction_modes.md'), 'w') as f:
        f.write('# auction_gan.py: modes with and without the auction (written by bench/auction_modes.py)\n\n'
                f'Command: `OMP_NUM_THREADS=1 python bench/auction_modes.py` (sweep, then this report); machine: '
                f'2-core CPU, one thread per run. {a.n_iters:,} iterations per run. Each cell: mean +- std over seeds '
                f'(union) or over seeds x 6 pairs (pair). CPU s: training only (cpu_seconds, evaluations not '
                f'counted).\n\n'
                + '\n'.join(lines) + '\n\nRaw numbers:\n\n```json\n' + json.dumps(raw, indent=1) + '\n```\n')
    for loss, ds in itertools.product(LOSS_FLAGS, ('ring8', 'grid25')):
        scatter_figure(a, loss, ds)


def pair_samples(run_folder, n=500):
    """n samples from each pair's generator of a finished run: (N, n, 2)."""
    with open(os.path.join(run_folder, 'args.json')) as f:
        args = json.load(f)
    gens = common.MLPGenerators(args['n_gans'], args['latent_dim'], (2,), hidden=(args['width'],) * 3,
                                batchnorm=False, tanh=False)
    gens.load_state_dict(torch.load(os.path.join(run_folder, 'ckpt.pt'), weights_only=False)['generators'])
    torch.manual_seed(0)
    with torch.no_grad():
        return gens(torch.randn(args['n_gans'], n, args['latent_dim']))


def scatter_figure(a, loss, ds):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = {mode: folder(a.runs_dir, 'wgan' if loss in AUCTION_ONLY and mode == 'none' else loss, ds, mode,
                         a.seeds[0]) for mode in MODES}
    if not all(os.path.exists(os.path.join(r, 'summary.json')) for r in runs.values()):   # both finished
        return
    centres = common.toy_centres(ds)[0]
    lim = 3 if ds == 'ring8' else 6
    fig, axes = plt.subplots(2, 6, figsize=(15, 5.4))
    for row, (mode, run) in enumerate(runs.items()):
        with open(os.path.join(run, 'summary.json')) as f:
            summary = json.load(f)
        for i, pts in enumerate(pair_samples(run)):
            ax = axes[row, i]
            ax.scatter(centres[:, 0], centres[:, 1], marker='x', c='k', s=20)
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, c=f'C{i}')
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect('equal')
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f'G{i}: {summary[f"modes_covered_{i}"]} modes, HQ {summary[f"hq_fraction_{i}"]:.2f}',
                         fontsize=8)
        axes[row, 0].set_ylabel(('with the auction' if mode == 'auction' else 'independent (--no_auction)') +
                                f'\nunion {summary["modes_covered"]} modes', fontsize=9)
    fig.suptitle(f'6 {TITLES[loss]} on {ds}, seed {a.seeds[0]}, '
                 f'{a.n_iters} iterations')
    fig.tight_layout()
    path = os.path.join(REPO, 'bench', 'results', f'auction_{loss}_{ds}.png')
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print('wrote', path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n_iters', type=int, default=20000)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    p.add_argument('--jobs', type=int, default=2, help='runs at once')
    p.add_argument('--losses', nargs='+', choices=list(LOSS_FLAGS), default=list(LOSS_FLAGS))
    p.add_argument('--runs_dir', default=os.path.join(REPO, 'runs', 'bench_auction_modes'))
    p.add_argument('--report', action='store_true', help='only the tables and figures')
    a = p.parse_args()
    if not a.report:
        sweep(a)
    report(a)


if __name__ == '__main__':
    main()
