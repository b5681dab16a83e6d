"""Digits at 32x32: conditional BigGAN (biggan_sn.py defaults) against SN-DCGAN and a plain DCGAN of
similar size, by fd_digits (and class_accuracy for the conditional BigGAN), at the same number of
G steps. Each run is a subprocess writing bench/work/digits/<name>; a run folder that already holds a
summary.json for that many iterations is reused. Then the figures and the table:

  bench/results/biggan_digits_fd.png        fd_digits (and class_accuracy) against iteration
  bench/results/biggan_digits_samples.png   the BigGAN's last per-class grid (one row per digit)
  bench/results/biggan_digits_truncation.png  its truncation sheet (rows psi = 0.25, 0.5, 0.75, 1.0)
  bench/results/biggan_digits_baselines.png  the last SN-DCGAN and DCGAN grids
  bench/results/biggan_digits.json          the summaries and the commands

    OMP_NUM_THREADS=1 python bench/biggan_digits.py --n_iters 2000
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(REPO, 'bench', 'work', 'digits')
RESULTS = os.path.join(REPO, 'bench', 'results')
# biggan ch 8: G 138k / D 68k parameters; SN-DCGAN and DCGAN at width 16: G 164k / D 42k
RUNS = {
    'biggan': ['biggan_sn.py'],
    'sndcgan': ['biggan_sn.py', '--arch', 'sndcgan'],  # default --ch 16
    'dcgan': ['bench/biggan_dcgan_baseline.py', '--ngf', '16'],
}


def run(name, n_iters, eval_interval):
    out = os.path.join(WORK, name)
    summary = os.path.join(out, 'summary.json')
    if os.path.exists(summary) and json.load(open(summary))['iterations'] == n_iters:
        return
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable] + RUNS[name] + ['--n_iters', str(n_iters), '--eval_interval', str(eval_interval),
                                           '--log_interval', str(eval_interval), '--ckpt_interval', str(eval_interval),
                                           '--sample_interval', str(n_iters), '--out_dir', out]
    with open(os.path.join(WORK, f'{name}.log'), 'w') as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))


def curve(name, column):
    with open(os.path.join(WORK, name, 'metrics.csv')) as f:
        return [(int(r['iteration']), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n_iters', type=int, default=2000)
    p.add_argument('--eval_interval', type=int, default=250)
    args = p.parse_args()
    os.makedirs(WORK, exist_ok=True)
    procs = []
    for name in RUNS:  # the three runs side by side
        procs.append(subprocess.Popen([sys.executable, __file__, '--_one', name, str(args.n_iters),
                                       str(args.eval_interval)], cwd=REPO))
    for pr in procs:
        if pr.wait():
            raise SystemExit('a run failed: see bench/work/digits/*.log')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in RUNS:
        axes[0].plot(*zip(*curve(name, 'fd_digits')), marker='o', label=name)
    axes[0].set(xlabel='iteration (G steps)', ylabel='fd_digits (lower is better)', yscale='log')
    axes[0].legend()
    axes[1].plot(*zip(*curve('biggan', 'class_accuracy')), marker='o', color='C0')
    axes[1].axhline(0.8, ls='--', c='grey', lw=1)
    axes[1].set(xlabel='iteration (G steps)', ylabel='class_accuracy (biggan)', ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, 'biggan_digits_fd.png'), dpi=90)
    samples = lambda name: os.path.join(WORK, name, 'samples')
    shutil.copy(os.path.join(samples('biggan'), f'iter_{args.n_iters:06d}.png'),
                os.path.join(RESULTS, 'biggan_digits_samples.png'))
    shutil.copy(os.path.join(samples('biggan'), 'truncation.png'),
                os.path.join(RESULTS, 'biggan_digits_truncation.png'))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, name in zip(axes, ('sndcgan', 'dcgan')):
        ax.imshow(plt.imread(os.path.join(samples(name), f'iter_{args.n_iters:06d}.png')))
        ax.set_title(name)
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, 'biggan_digits_baselines.png'), dpi=90)
    table = {name: json.load(open(os.path.join(WORK, name, 'summary.json'))) for name in RUNS}
    for name, s in table.items():
        s['command'] = ' '.join(['OMP_NUM_THREADS=1 python'] + RUNS[name] + ['--n_iters', str(args.n_iters)])
        print(f'{name:8s} fd_digits {s["fd_digits"]:8.1f}  class_accuracy {s.get("class_accuracy", "-")}  '
              f'wall {s["wall_seconds"]:.0f} s')
    with open(os.path.join(RESULTS, 'biggan_digits.json'), 'w') as f:
        json.dump(dict(command=f'OMP_NUM_THREADS=1 python bench/biggan_digits.py --n_iters {args.n_iters}',
                       machine='2-core CPU, shared', runs=table), f, indent=2)


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--_one':
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
