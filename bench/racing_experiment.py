"""The experiment the Racing-GAN paper (Paul and Saha) asked and left inconclusive: does racing
reach a given quality sooner than the single-generator model, counted in iterations and in wall-clock seconds?

For racing_wgan.py and racing_dcgan.py on digits: --n_gen 1 against --n_gen 2 with each
--race_mode (lag, paper, off), and for racing_dcgan also lag and off with --joint_fake_bn, over --seeds seeds, fd_digits every --*_eval iterations (FID as well
when the Inception weights are on this machine). Every run is a subprocess; runs go seed by seed
(seed 0: every configuration, then seed 1, ...) so that load drift on a shared machine touches
all configurations alike. A finished run (summary.json present) is not run again: rerunning the
command only redraws the figure and the table.

Reduced settings (CPU minutes, not the seed's GPU hours): racing_wgan at 16x16 with the classic
MLPs, clipping and n_critic 5 for 1,500 iterations; racing_dcgan at 16x16 (the digits are 8x8, so
nothing is lost) with ngf = ndf = 16 for 800 iterations; 1,000 samples per fd_digits.

Output: bench/results/racing_experiment.md (the tables), a PNG (fd_digits against iterations, wall seconds and CPU seconds; mean over seeds with
the min-max band), a PNG of each configuration's final samples (seed 0) and a markdown table: iterations, wall seconds and CPU seconds to reach two
thresholds, set relative to the single generator's mean final value, and the final value.
Wall seconds are metrics.csv's clock (evaluations included, the same for every configuration);
on a shared machine they move with the load. CPU seconds are the load-independent cost: the
cpu_seconds column of metrics.csv (process CPU time since the training loop started, the time
inside evaluations not counted). A second table gives the final precision, recall, density and
coverage (digit features), per generator where there are two.

    OMP_NUM_THREADS=1 python bench/racing_experiment.py      # 40 min wall, 2-core CPU shared with 2 jobs
    python bench/racing_experiment.py --seeds 5 --wgan_iters 5000 --dcgan_iters 3000
"""
import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--seeds', type=int, default=3)
parser.add_argument('--scripts', nargs='+', default=['racing_wgan', 'racing_dcgan'])
parser.add_argument('--wgan_iters', type=int, default=1500)
parser.add_argument('--wgan_eval', type=int, default=100, help='iterations between fd_digits (wgan)')
parser.add_argument('--dcgan_iters', type=int, default=800)
parser.add_argument('--dcgan_eval', type=int, default=50, help='iterations between fd_digits (dcgan)')
parser.add_argument('--eval_samples', type=int, default=1000)
parser.add_argument('--thresholds', type=float, nargs='+', default=[2.0, 1.2],
                    help='thresholds as multiples of the --n_gen 1 mean final fd_digits')
parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'racing_experiment'))
parser.add_argument('--data_root', default=os.path.join(REPO, 'data'), help='digit classifier cache')
parser.add_argument('--png', default=os.path.join(REPO, 'bench', 'results', 'racing_experiment.png'))

CONFIGS = [('n_gen 1', ['--n_gen', '1']),
           ('n_gen 2 lag', ['--n_gen', '2', '--race_mode', 'lag']),
           ('n_gen 2 paper', ['--n_gen', '2', '--race_mode', 'paper']),
           ('n_gen 2 off', ['--n_gen', '2', '--race_mode', 'off'])]
EXTRA = {'racing_dcgan': [('n_gen 2 lag, joint fake BN', ['--n_gen', '2', '--race_mode', 'lag', '--joint_fake_bn']),
                          ('n_gen 2 off, joint fake BN', ['--n_gen', '2', '--race_mode', 'off', '--joint_fake_bn'])]}


def configs(script):
    return CONFIGS + EXTRA.get(script, [])


def script_args(script, args):
    if script == 'racing_wgan':
        return ['--img_size', '16', '--n_iters', args.wgan_iters, '--eval_interval', args.wgan_eval]
    return ['--img_size', '16', '--ngf', '16', '--ndf', '16', '--n_iters', args.dcgan_iters,
            '--eval_interval', args.dcgan_eval]


def fid_weights_present():
    """FID only where the Inception weights are already here (no download attempt offline)."""
    sys.path.insert(0, REPO)
    import fid
    return bool(os.environ.get('FID_WEIGHTS')) or os.path.isfile(fid.hub_weights_path())


def run_once(script, config, seed, args, with_fid):
    """One training run (skipped when its summary.json exists); returns its folder."""
    name, flags = config
    slug = name.replace(' ', '_').replace(',', '')
    out = os.path.join(args.work, script, f'{slug}-seed{seed}')
    if os.path.exists(os.path.join(out, 'summary.json')):
        return out
    every = script_args(script, args)[-1]
    cmd = [sys.executable, os.path.join(REPO, f'{script}.py'), *flags, '--seed', seed, '--out_dir', out,
           '--data_root', args.data_root, '--eval_samples', args.eval_samples, '--log_interval', every,
           '--sample_interval', 0, '--ckpt_interval', 0, *script_args(script, args)]
    if with_fid:
        cmd += ['--fid_every', every, '--fid_samples', 2000]
    cmd = [str(c) for c in cmd]
    print(' '.join(cmd[1:]), flush=True)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1')))
    if result.returncode:
        sys.exit(f'run failed: {" ".join(cmd)}\n{result.stderr[-2000:]}')
    print(f'  {result.stdout.strip().splitlines()[-1]}', flush=True)
    return out


def read_curve(folder, metric):
    """(iterations, wall seconds, CPU seconds, values) of one metric from a run's metrics.csv. CPU
    seconds are the run's training clock (common.TrainingClock: process CPU time since the loop
    started, evaluations not counted), so they do not move with the machine's load."""
    with open(os.path.join(folder, 'metrics.csv')) as f:
        rows = [r for r in csv.DictReader(f) if r.get(metric) not in (None, '')]
    return tuple(np.array([float(r[key]) for r in rows]) for key in ('iteration', 'wall_seconds', 'cpu_seconds', metric))


def first_reach(its, wall, cpu, values, threshold):
    """(iteration, wall s, CPU s) of the first evaluation at or below threshold (nan if none)."""
    hit = np.nonzero(values <= threshold)[0]
    return (its[hit[0]], wall[hit[0]], cpu[hit[0]]) if len(hit) else (np.nan,) * 3


def fmt(values, digits=0):
    """mean +- sd over the seeds that got there, and how many did."""
    ok = [v for v in values if np.isfinite(v)]
    if not ok:
        return f'not reached (0/{len(values)})'
    sd = np.std(ok, ddof=1) if len(ok) > 1 else 0.0    # sample sd over the seeds
    text = f'{np.mean(ok):.{digits}f} ± {sd:.{digits}f}'
    return text + ('' if len(ok) == len(values) else f' ({len(ok)}/{len(values)} seeds)')


PRDC = ('precision_digits', 'recall_digits', 'density_digits', 'coverage_digits')


def analyse(runs, args, metric):
    """Markdown tables and figure from {(script, config name): [run folder, ...]}: the first
    evaluation reaching each threshold, then the final figures (PRDC, per generator where K > 1)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    scripts = [s for s in args.scripts if any(k[0] == s for k in runs)]
    fig, axes = plt.subplots(len(scripts), 3, figsize=(15, 3.6 * len(scripts)), squeeze=False)
    lines = ['| script | configuration | ' + ' | '.join(
        f'iterations to {t:g}x | wall s to {t:g}x | CPU s to {t:g}x' for t in args.thresholds) +
        f' | final {metric} | CPU s / 100 it |',
        '|' + '---|' * (4 + 3 * len(args.thresholds))]
    finals = ['| script | configuration | ' + ' | '.join(k.split('_')[0] for k in PRDC) +
              ' | coverage per generator | seeds |', '|' + '---|' * 8]
    for row, script in enumerate(scripts):
        base = [read_curve(folder, metric)[-1][-1] for folder in runs[(script, 'n_gen 1')]]
        thresholds = [t * float(np.mean(base)) for t in args.thresholds]
        for name, _ in configs(script):
            folders = runs[(script, name)]
            curves = [read_curve(folder, metric) for folder in folders]
            its = curves[0][0]
            values = np.stack([c[-1] for c in curves])            # (seeds, evals); same iterations
            for col in range(3):
                x = np.stack([c[col] for c in curves]).mean(0)
                line, = axes[row, col].plot(x, values.mean(0), lw=1.5, label=name)
                axes[row, col].fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
            cells = []
            for t in thresholds:
                reach = [first_reach(*c, t) for c in curves]
                cells += [fmt([r[0] for r in reach]), fmt([r[1] for r in reach], 1), fmt([r[2] for r in reach], 1)]
            rates = [100 * c[2][-1] / c[0][-1] for c in curves]
            lines.append(f'| {script} | {name} | ' + ' | '.join(cells) +
                         f' | {fmt(values[:, -1], 1)} | {fmt(rates, 2)} |')
            summaries = [json.load(open(os.path.join(folder, 'summary.json'))) for folder in folders]
            if metric == 'fd_digits' and PRDC[0] in summaries[0]:
                per_gen = [[s[f'coverage_digits_{k}'] for s in summaries] for k in range(2) if f'coverage_digits_{k}' in summaries[0]]
                finals.append(f'| {script} | {name} | ' + ' | '.join(fmt([s[k] for s in summaries], 3) for k in PRDC) +
                              ' | ' + (' / '.join(fmt(v, 3) for v in per_gen) or '-') + f' | {len(summaries)} |')
        xlabels = ('iteration', 'wall seconds (metrics.csv, mean over seeds)',
                   'CPU seconds (metrics.csv cpu_seconds: training only, mean over seeds)')
        for col, xlabel in enumerate(xlabels):
            ax = axes[row, col]
            for t, level in zip(args.thresholds, thresholds):
                ax.axhline(level, color='grey', ls='--', lw=0.8)
                ax.annotate(f'{t:g}x', (ax.get_xlim()[1], level), fontsize=7, color='grey', ha='right', va='bottom')
            ax.set_yscale('log')
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(metric)
            ax.set_title(f'{script}: {metric}, mean and min-max over {len(base)} seeds', fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    fig.savefig(args.png, dpi=80)
    plt.close(fig)
    if len(finals) > 2:
        lines += ['', f'At the end (mean ± sd over seeds): precision / recall / density / coverage of the samples '
                  f'against the digits in the classifier\'s feature space ({args.eval_samples} samples); per generator: '
                  f'coverage of generator 0 / 1 alone.', ''] + finals
    return '\n'.join(lines)


def sample_sheet(runs, args, png):
    """Every configuration's final sample grid (one row per generator), seed 0, one sheet per script."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image
    cells = [(script, name, folders[0]) for (script, name), folders in runs.items()]
    fig, axes = plt.subplots(len(cells), 1, figsize=(6, 1.3 * len(cells)), squeeze=False)
    for ax, (script, name, folder) in zip(axes[:, 0], cells):
        grids = sorted(os.listdir(os.path.join(folder, 'samples')))
        ax.imshow(Image.open(os.path.join(folder, 'samples', grids[-1])), cmap='gray')
        ax.set_title(f'{script} {name}, seed 0, {grids[-1][5:-4].lstrip("0")} iterations', fontsize=7)
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main():
    args = parser.parse_args()
    with_fid = fid_weights_present()
    print(f'FID: {"on" if with_fid else "off (no Inception weights on this machine)"}', flush=True)
    runs = {}
    for seed in range(args.seeds):
        for script in args.scripts:
            for config in configs(script):
                runs.setdefault((script, config[0]), []).append(run_once(script, config, seed, args, with_fid))
    tables = [analyse(runs, args, 'fd_digits')]
    sample_sheet(runs, args, args.png.replace('.png', '_samples.png'))
    if with_fid:
        fid_png = args.png.replace('.png', '_fid.png')
        tables.append(analyse(runs, argparse.Namespace(**{**vars(args), 'png': fid_png}), 'fid'))
    text = '\n\n'.join(tables)
    command = 'OMP_NUM_THREADS=1 python bench/racing_experiment.py ' + ' '.join(sys.argv[1:])
    header = (f'# The racing question: sooner to a quality? (written by bench/racing_experiment.py)\n\n'
              f'Command: `{command.strip()}`; machine: 2-core CPU, one thread per run. Thresholds: '
              f'{" and ".join(f"{t:g}x" for t in args.thresholds)} the --n_gen 1 mean final fd_digits; each cell '
              f'mean ± sd over the seeds that reached it. CPU s: training only (metrics.csv cpu_seconds).\n\n')
    with open(args.png.replace('.png', '.md'), 'w') as f:
        f.write(header + text + '\n')
    print(text)
    print(f'figure: {args.png}')


if __name__ == '__main__':
    main()
