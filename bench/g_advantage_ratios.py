"""The experiment of Weaver, "Robot vs. Robot: Evening the Field in Deep Convolutional GANs for Small
Datasets", on a CPU: R = 1, 2, 4, 50 generator updates per discriminator update,
192 images, the same seed and the same number of discriminator updates for every R.

    OMP_NUM_THREADS=1 python bench/g_advantage_ratios.py                    # digits --subset 192, seeds 0-2
    OMP_NUM_THREADS=1 python bench/g_advantage_ratios.py --folder mice/ --img_size 64   # your 192 images
    OMP_NUM_THREADS=1 python bench/g_advantage_ratios.py --same_z --tag _same_z   # DCGAN-tensorflow's z

Each run is the plain g_advantage_dcgan.py command printed before it (run folders under
bench/work/g_advantage/; a finished run is reused). Writes, under bench/results/:
  g_advantage_<set>_logratio.png   log(L_G / L_D) over discriminator updates, one line per R: left the
                                   paper's Figure-1 statistic (log_ratio_after: after the D step and all
                                   G steps), right the before-update log_ratio
  g_advantage_<set>_samples.png    sample grids side by side: rows early / end, one column per R
  g_advantage_<set>.md             tables: per seed, and mean +- sd over seeds of mean |log ratio| over
                                   the last quarter (both statistics), fd_digits, precision / recall /
                                   density / coverage (digit features), CPU s (training only)
(with --tag T, g_advantage_<set>T_...). The control of the README's results section, R = 1 trained
for as many generator updates as R = 4 gets:
    OMP_NUM_THREADS=1 python bench/g_advantage_ratios.py --ratios 1 --n_iters 600 --seeds 0 1 2 --tag _control
"""
import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from fractions import Fraction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(REPO, 'bench', 'work', 'g_advantage')
RESULTS = os.path.join(REPO, 'bench', 'results')

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--ratios', nargs='+', default=['1', '2', '4', '50'], help='values of --g_advantage')
p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
p.add_argument('--n_iters', type=int, default=150, help='discriminator updates per run (50 epochs of 192)')
p.add_argument('--img_size', type=int, default=16)
p.add_argument('--width', type=int, default=32, help='--ngf and --ndf')
p.add_argument('--batch_size', type=int, default=64)
p.add_argument('--folder', default=None, help='also run on this folder of images (--dataset folder)')
p.add_argument('--same_z', action='store_true', help="pass --same_z: DCGAN-tensorflow's one U(-1, 1) z per iteration")
p.add_argument('--tag', default='', help='suffix for the result file names (e.g. _control)')
args = p.parse_args()


def run(dataset_flags, name, R, seed):
    same_z = '-same_z' if args.same_z else ''
    out = os.path.join(WORK, f'{name}-s{args.img_size}-w{args.width}-n{args.n_iters}-R{R}{same_z}-seed{seed}')
    every = max(args.n_iters // 4, 1)
    cmd = [sys.executable, os.path.join(REPO, 'g_advantage_dcgan.py'), *dataset_flags,
           '--img_size', args.img_size, '--ngf', args.width, '--ndf', args.width, '--batch_size', args.batch_size,
           '--n_iters', args.n_iters, '--g_advantage', R, '--seed', seed, '--log_interval', 3,
           '--eval_interval', every, '--sample_interval', every, '--ckpt_interval', 0, '--out_dir', out]
    cmd += ['--same_z'] if args.same_z else []
    cmd = [str(c) for c in cmd]
    print(' '.join(['OMP_NUM_THREADS=1', 'python'] + [os.path.relpath(c, REPO) if c.startswith(REPO) else c
                                                      for c in cmd[1:]]), flush=True)
    if not os.path.exists(os.path.join(out, 'summary.json')):
        subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'),
                       stdout=subprocess.DEVNULL)
    with open(os.path.join(out, 'metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(out, 'summary.json')) as f:
        summary = json.load(f)
    last_quarter = [r for r in rows if int(r['iteration']) > 0.75 * args.n_iters]
    return {'out': out, 'rows': rows, 'summary': summary, 'every': every,
            **{key: statistics.mean(abs(float(r[key])) for r in last_quarter) for key in STATISTICS}}


STATISTICS = ('log_ratio_after', 'log_ratio')   # the paper's Figure-1 statistic first
PRDC = ('precision_digits', 'recall_digits', 'density_digits', 'coverage_digits')


def figures(name, results):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image

    seed = args.seeds[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
    titles = {'log_ratio_after': 'after the D step and all G steps (Figure 1)',
              'log_ratio': "on the D step's batch, before the updates"}
    for ax, key in zip(axes, STATISTICS):
        for R in args.ratios:
            for seed_ in args.seeds:
                rows = results[R, seed_]['rows']
                ax.plot([int(r['iteration']) for r in rows], [float(r[key]) for r in rows], lw=1,
                        color=f'C{args.ratios.index(R)}', alpha=1.0 if seed_ == seed else 0.35,
                        label=f'R = {R}' if seed_ == seed else None)
        ax.axhline(0, color='k', lw=0.6, ls='--')
        ax.set_xlabel('discriminator updates')
        ax.set_title(f'{key}: {titles[key]}', fontsize=9)
    axes[0].set_ylabel('ln(L_G / L_D)')
    axes[0].legend(fontsize=8)
    others = f'; seed {seed} bold, seeds {args.seeds[1:]} faint' if len(args.seeds) > 1 else ''
    fig.suptitle(f'{name}{" --same_z" if args.same_z else ""}: log loss ratio (Weaver, Figure 1){others}', fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f'g_advantage_{name}{args.tag}_logratio.png'), dpi=100)
    plt.close(fig)

    every = results[args.ratios[0], seed]['every']
    when = [every, args.n_iters]
    fig, axes = plt.subplots(2, len(args.ratios), figsize=(2.6 * len(args.ratios), 5.6), squeeze=False)
    for col, R in enumerate(args.ratios):
        for row, it in enumerate(when):
            path = os.path.join(results[R, seed]['out'], 'samples', f'iter_{it:06d}.png')
            ax = axes[row, col]
            with Image.open(path) as im:
                ax.imshow(im.convert('RGB'))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f'R = {R}')
            if col == 0:
                ax.set_ylabel(f'after {it} D updates')
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f'g_advantage_{name}{args.tag}_samples.png'), dpi=100)
    plt.close(fig)


def mean_sd(values, digits=3):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return 'n/a'
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.{digits}g} +- {sd:.2g}'


def table(name, results, command):
    lines = [f'Command: `{command}`', '', 'Machine: 2-core CPU, one thread per run. CPU s: the run\'s training CPU '
             'seconds (summary.json\'s cpu_seconds; evaluations not counted). |log ratio|: mean over the last quarter '
             'of the D updates; "after" is the paper\'s Figure-1 statistic (after the D step and all G steps), '
             '"before" the D step\'s batch before the updates. PRDC: precision / recall / density / coverage of '
             '2,000 samples against the 192 images in the digit classifier\'s feature space.', '',
             '| R | seed | abs log ratio after | abs log ratio before | final log ratio after | fd_digits | '
             'precision | recall | density | coverage | G updates | CPU s |', '|---' * 12 + '|']
    for R in args.ratios:
        for seed in args.seeds:
            r = results[R, seed]
            s = r['summary']
            lines.append(f"| {R} | {seed} | {r['log_ratio_after']:.3f} | {r['log_ratio']:.3f} | "
                         f"{s['log_ratio_after']:.3f} | {s.get('fd_digits', math.nan):.1f} | "
                         + ' | '.join(f"{s.get(k, math.nan):.3f}" for k in PRDC) +
                         f" | {math.ceil(args.n_iters * Fraction(R))} | {s['cpu_seconds']:.0f} |")
    lines += ['', f'Mean +- sd over seeds {args.seeds}:', '',
              '| R | abs log ratio after | abs log ratio before | fd_digits | precision | recall | density | '
              'coverage | CPU s |', '|---' * 9 + '|']
    for R in args.ratios:
        runs = [results[R, seed] for seed in args.seeds]
        cols = [[r[key] for r in runs] for key in STATISTICS]
        cols += [[r['summary'].get(key, math.nan) for r in runs] for key in ('fd_digits',) + PRDC + ('cpu_seconds',)]
        lines.append(f'| {R} | ' + ' | '.join(mean_sd(c) for c in cols) + ' |')
    with open(os.path.join(RESULTS, f'g_advantage_{name}{args.tag}.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def main():
    os.makedirs(RESULTS, exist_ok=True)
    command = 'OMP_NUM_THREADS=1 python bench/g_advantage_ratios.py ' + ' '.join(sys.argv[1:])
    sets = [('digits', ['--dataset', 'digits', '--subset', '192'])]
    if args.folder:
        sets.append(('folder', ['--dataset', 'folder', '--data_root', args.folder, '--flip']))
    for name, flags in sets:
        results = {(R, seed): run(flags, name, R, seed) for seed in args.seeds for R in args.ratios}
        figures(name, results)
        table(name, results, command.strip())


if __name__ == '__main__':
    main()
