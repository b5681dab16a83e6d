"""Digits at 32x32: conditional BigGAN (biggan_sn.py defaults) against SN-DCGAN (the paper's D: SN
conv -> BatchNorm -> channel dropout -> LeakyReLU; and the BN-free D) and a plain DCGAN of similar
size, by fd_digits, precision / recall / density / coverage (digit features) and, for the
conditional BigGAN, class_accuracy, at the same number of G steps, over several seeds.

Each run is a subprocess writing bench/work/digits/<name>-seed<S> with --resume auto: a finished
run is reused, a stopped one continues from its last checkpoint. Runs go seed by seed, --jobs at a
time (one thread each). Then the figures and the tables:

  bench/results/biggan_digits.md            mean +- sd over seeds at 1/8, 1/2 and all of --n_iters
  bench/results/biggan_digits_fd.png        fd_digits (and class_accuracy) against iteration
  bench/results/biggan_digits_samples.png   the BigGAN's last per-class grid (seed 0, one row per digit)
  bench/results/biggan_digits_truncation.png  its truncation sheet (rows psi = 0.25, 0.5, 0.75, 1.0)
  bench/results/biggan_digits_baselines.png  the last SN-DCGAN and DCGAN grids (seed 0)
  bench/results/biggan_digits.json          the summaries and the commands

    OMP_NUM_THREADS=1 python bench/biggan_digits.py                       # 2,000 G steps, seeds 0-2
    OMP_NUM_THREADS=1 python bench/biggan_digits.py --runs sndcgan sndcgan_nobn --seeds 0
"""
import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(REPO, 'bench', 'work', 'digits')
RESULTS = os.path.join(REPO, 'bench', 'results')
# biggan ch 8: G 138k / D 68k parameters; SN-DCGAN and DCGAN at width 16: G 164k / D 42k
RUNS = {
    'biggan': ['biggan_sn.py'],
    'sndcgan': ['biggan_sn.py', '--arch', 'sndcgan'],                   # default --ch 16, D with BN
    'sndcgan_nobn': ['biggan_sn.py', '--arch', 'sndcgan', '--no-d_bn'],
    'dcgan': ['bench/biggan_dcgan_baseline.py', '--ngf', '16'],
}
FIGURES = ('fd_digits', 'class_accuracy', 'precision_digits', 'recall_digits', 'density_digits', 'coverage_digits')


def folder(name, seed):
    return os.path.join(WORK, f'{name}-seed{seed}')


def finished(name, seed, n_iters):
    path = os.path.join(folder(name, seed), 'summary.json')
    return os.path.exists(path) and json.load(open(path))['iterations'] == n_iters


def command(name, seed, args):
    every = args.eval_interval
    return RUNS[name] + ['--n_iters', str(args.n_iters), '--seed', str(seed), '--eval_interval', str(every),
                         '--log_interval', str(every), '--ckpt_interval', str(every),
                         '--sample_interval', str(args.n_iters), '--out_dir', folder(name, seed), '--resume', 'auto']


def train(args):
    """Every (seed, run) not finished, seed-major, --jobs at a time; stops at the first failure."""
    todo = [(name, seed) for seed in args.seeds for name in args.runs if not finished(name, seed, args.n_iters)]
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            name, seed = todo.pop(0)
            os.makedirs(folder(name, seed), exist_ok=True)
            cmd = command(name, seed, args)
            print('$ OMP_NUM_THREADS=1 python ' + ' '.join(os.path.relpath(c, REPO) if c.startswith(REPO) else c
                                                          for c in cmd), flush=True)
            with open(os.path.join(folder(name, seed), 'stdout.txt'), 'a') as log:   # the child keeps its copy
                running.append(((name, seed), subprocess.Popen([sys.executable] + cmd, cwd=REPO, stdout=log,
                                                               stderr=subprocess.STDOUT,
                                                               env=dict(os.environ, OMP_NUM_THREADS='1'))))
        time.sleep(2)
        for entry in list(running):
            job, proc = entry
            if proc.poll() is not None:
                running.remove(entry)
                if proc.returncode:
                    for _, other in running:
                        other.wait()
                    raise SystemExit(f'run {job} failed: see {folder(*job)}/stdout.txt')


def rows(name, seed):
    with open(os.path.join(folder(name, seed), 'metrics.csv')) as f:
        return [r for r in csv.DictReader(f) if r.get('fd_digits')]


def at(name, seed, iteration, column):
    """The evaluation at `iteration` (None if the run has no such column)."""
    for r in rows(name, seed):
        if int(r['iteration']) == iteration and r.get(column):
            return float(r[column])
    return None


def mean_sd(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.{digits}g} +- {sd:.2g}'


def table(args):
    e = args.eval_interval   # evaluated iterations at about 1/8, 1/2 and all of the run
    points = sorted({max(p - p % e, e) for p in (args.n_iters // 8, args.n_iters // 2, args.n_iters)})
    head = ['run', 'seeds'] + [f'fd_digits at {p:,}' for p in points] + [
        f'{c} at {args.n_iters:,}' for c in FIGURES[1:]] + ['CPU s (training)']
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for name in args.runs:
        seeds = [s for s in args.seeds if finished(name, s, args.n_iters)]
        if not seeds:
            continue
        cells = [mean_sd([at(name, s, p, 'fd_digits') for s in seeds]) for p in points]
        cells += [mean_sd([at(name, s, args.n_iters, c) for s in seeds]) for c in FIGURES[1:]]
        cpu = [json.load(open(os.path.join(folder(name, s), 'summary.json')))['cpu_seconds'] for s in seeds]
        lines.append(f'| `{" ".join(RUNS[name])}` | {len(seeds)} | ' + ' | '.join(cells) + f' | {mean_sd(cpu)} |')
    return '\n'.join(lines)


def figures(args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, name in enumerate(args.runs):
        seeds = [s for s in args.seeds if finished(name, s, args.n_iters)]
        if not seeds:
            continue
        for column, ax in (('fd_digits', axes[0]), ('class_accuracy', axes[1])):
            curves = [[(int(r['iteration']), float(r[column])) for r in rows(name, s) if r.get(column)] for s in seeds]
            if not curves[0]:
                continue
            its = [i_ for i_, _ in curves[0]]
            values = list(zip(*[[v for _, v in c] for c in curves]))   # per iteration, one value per seed
            ax.plot(its, [statistics.mean(v) for v in values], marker='o', color=f'C{i}', label=name)
            ax.fill_between(its, [min(v) for v in values], [max(v) for v in values], color=f'C{i}', alpha=0.15)
    axes[0].set(xlabel='iteration (G steps)', ylabel='fd_digits (lower is better)', yscale='log',
                title=f'mean and min-max over seeds {args.seeds}')
    axes[0].legend()
    axes[1].axhline(0.8, ls='--', c='grey', lw=1)
    axes[1].set(xlabel='iteration (G steps)', ylabel='class_accuracy (biggan)', ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, 'biggan_digits_fd.png'), dpi=90)
    plt.close(fig)
    seed = args.seeds[0]
    samples = lambda name: os.path.join(folder(name, seed), 'samples')
    if 'biggan' in args.runs and finished('biggan', seed, args.n_iters):
        shutil.copy(os.path.join(samples('biggan'), f'iter_{args.n_iters:06d}.png'),
                    os.path.join(RESULTS, 'biggan_digits_samples.png'))
        shutil.copy(os.path.join(samples('biggan'), 'truncation.png'),
                    os.path.join(RESULTS, 'biggan_digits_truncation.png'))
    others = [n for n in args.runs if n != 'biggan' and finished(n, seed, args.n_iters)]
    if others:
        fig, axes = plt.subplots(1, len(others), figsize=(4 * len(others), 4), squeeze=False)
        for ax, name in zip(axes[0], others):
            ax.imshow(plt.imread(os.path.join(samples(name), f'iter_{args.n_iters:06d}.png')))
            ax.set_title(f'{name}, seed {seed}')
            ax.axis('off')
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, 'biggan_digits_baselines.png'), dpi=90)
        plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n_iters', type=int, default=2000)
    p.add_argument('--eval_interval', type=int, default=250)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--runs', nargs='+', choices=list(RUNS), default=list(RUNS))
    p.add_argument('--jobs', type=int, default=2, help='runs at once (one thread each)')
    p.add_argument('--report', action='store_true', help='only the tables and figures, from finished runs')
    args = p.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    if not args.report:
        train(args)
    figures(args)
    text = table(args)
    cmd = 'OMP_NUM_THREADS=1 python bench/biggan_digits.py ' + ' '.join(sys.argv[1:])
    with open(os.path.join(RESULTS, 'biggan_digits.md'), 'w') as f:
        f.write(f'# Digits at 32x32: BigGAN, SN-DCGAN, DCGAN (written by bench/biggan_digits.py)\n\nCommand: '
                f'`{cmd.strip()}`; machine: 2-core CPU, one thread per run. Each cell: mean +- sd over the seeds '
                f'that finished. fd_digits and PRDC on 2,000 samples in the digit classifier\'s feature space; '
                f'class_accuracy on 2,000 class-balanced samples (conditional BigGAN only); CPU s: training '
                f'only (evaluations not counted).\n\n{text}\n')
    print(text)
    runs = {f'{name}-seed{s}': json.load(open(os.path.join(folder(name, s), 'summary.json')))
            for name in args.runs for s in args.seeds if finished(name, s, args.n_iters)}
    with open(os.path.join(RESULTS, 'biggan_digits.json'), 'w') as f:
        json.dump(dict(command=cmd.strip(), machine='2-core CPU, one thread per run',
                       commands={name: 'OMP_NUM_THREADS=1 python ' + ' '.join(RUNS[name] + ['--n_iters', str(args.n_iters)])
                                 for name in args.runs}, runs=runs), f, indent=2)


if __name__ == '__main__':
    main()
