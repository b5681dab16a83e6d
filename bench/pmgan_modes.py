"""Mode coverage of pmgan.py: ring8, grid25 and stacked-digits, several seeds per setting.

    OMP_NUM_THREADS=1 python bench/pmgan_modes.py ring8     # K=8 balance / const / K=1, 5 seeds
    OMP_NUM_THREADS=1 python bench/pmgan_modes.py grid25    # K=1 / 8 / 25 (+ const), 5 seeds
    OMP_NUM_THREADS=1 python bench/pmgan_modes.py stacked   # stacked-digits, K = 1, 4, 8 (reduced)
    OMP_NUM_THREADS=1 python bench/pmgan_modes.py stacked_gb   # K = 4, 8 with 128 fakes per generator
    OMP_NUM_THREADS=1 python bench/pmgan_modes.py stacked_ablation   # beta scale / const / decay / share_dc, K = 8
    OMP_NUM_THREADS=1 python bench/pmgan_modes.py stacked_stage2     # its two best settings, K = 1, 4, 8, 3 seeds
    OMP_NUM_THREADS=1 python bench/pmgan_modes.py stacked_stage2 --report   # the table so far

Each run is the plain command line printed before it (run folders under bench/work/pmgan/; a
finished run is reused, a stopped one continues from its checkpoint: --resume auto). Writes
bench/results/pmgan_modes_<experiment>.md (table: mean +- sd over seeds of modes, KL (and on the
2-D sets high-quality fraction, precision, recall, density, coverage), the mean over generators
of each generator's own modes, per-seed modes, training CPU seconds) and, for 2-D sets, one
scatter figure per setting
(bench/results/pmgan_<experiment>_<setting>.png, one panel per seed, one colour per generator).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402
import pmgan   # noqa: E402

WORK = os.path.join(REPO, 'bench', 'work', 'pmgan')
RESULTS = os.path.join(REPO, 'bench', 'results')
LOG = ['--log_interval', '1000', '--sample_interval', '0', '--ckpt_interval', '500', '--resume', 'auto']
STACKED = ['--dataset', 'stacked-digits', '--width', '32', '--batch_size', '128', '--n_iters', '1500']
LONG = STACKED[:-1] + ['4500']
EXPERIMENTS = {   # name: (seeds, [(setting, flags)])
    'ring8': (range(5), [('K8_balance', ['--dataset', 'ring8', '--n_gen', '8']),
                         ('K8_const', ['--dataset', 'ring8', '--n_gen', '8', '--beta_mode', 'const']),
                         ('K1', ['--dataset', 'ring8', '--n_gen', '1'])]),
    'grid25': (range(5), [('K1', ['--dataset', 'grid25', '--n_gen', '1']),
                          ('K8_balance', ['--dataset', 'grid25', '--n_gen', '8']),
                          ('K25_balance', ['--dataset', 'grid25', '--n_gen', '25']),
                          ('K25_const', ['--dataset', 'grid25', '--n_gen', '25', '--beta_mode', 'const'])]),
    'stacked': (range(2), [('K1', STACKED + ['--n_gen', '1']), ('K4', STACKED + ['--n_gen', '4']),
                           ('K8', STACKED + ['--n_gen', '8'])]),
    'stacked_gb': (range(1), [('K4_gen_batch128', STACKED + ['--n_gen', '4', '--gen_batch', '128']),
                              ('K8_gen_batch128', STACKED + ['--n_gen', '8', '--gen_batch', '128'])]),
    # stage 1 of the balance ablation: one seed per setting, 3x the iterations of 'stacked'
    'stacked_ablation': (range(1), [
        ('K1', LONG + ['--n_gen', '1']),
        ('K8_scale1', LONG + ['--n_gen', '8']),
        ('K8_scaleK', LONG + ['--n_gen', '8', '--beta_scale', '8']),
        ('K8_const1', LONG + ['--n_gen', '8', '--beta_mode', 'const', '--beta', '1']),
        ('K8_const0.01', LONG + ['--n_gen', '8', '--beta_mode', 'const', '--beta', '0.01']),
        ('K8_no_share_dc', LONG + ['--n_gen', '8', '--no-share_dc']),
        ('K8_decay', LONG + ['--n_gen', '8', '--beta_decay', '0.001'])]),
    # stage 2: stage 1's two best K = 8 settings (the default balance, 626 modes; const beta 1, 590)
    # for K = 1, 4, 8 over 3 seeds (at K = 1 the classifier term is 0: one baseline for both)
    'stacked_stage2': (range(3), [
        ('K1', LONG + ['--n_gen', '1']),
        ('K4_scale1', LONG + ['--n_gen', '4']),
        ('K8_scale1', LONG + ['--n_gen', '8']),
        ('K4_const1', LONG + ['--n_gen', '4', '--beta_mode', 'const', '--beta', '1']),
        ('K8_const1', LONG + ['--n_gen', '8', '--beta_mode', 'const', '--beta', '1'])]),
}


def run(experiment, setting, flags, seed):
    """The run's summary, training it first unless it has finished (--resume auto: a stopped run
    continues from its checkpoint)."""
    if finished(experiment, setting, seed) is None:
        out = os.path.join(WORK, experiment, f'{setting}-seed{seed}')
        cmd = ['python', 'pmgan.py'] + flags + ['--seed', str(seed), '--out_dir', out] + LOG
        print('$ OMP_NUM_THREADS=1 ' + ' '.join(cmd), flush=True)
        subprocess.run([sys.executable] + cmd[1:], cwd=REPO, check=True, capture_output=True,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    return finished(experiment, setting, seed)


def scatter(experiment, setting, seeds):
    """One panel per seed: 2,500 samples of the mixture, coloured by generator, over the modes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(seeds), figsize=(3 * len(seeds), 3.2), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        out = os.path.join(WORK, experiment, f'{setting}-seed{seed}')
        with open(os.path.join(out, 'args.json')) as f:
            ns = argparse.Namespace(**json.load(f))
        with open(os.path.join(out, 'summary.json')) as f:
            summary = json.load(f)
        data = common.load_data(ns.dataset)
        K = ns.n_gen
        gens = pmgan.build_generators(ns, data, K)
        states = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['generators']
        gens.load_state_dict(pmgan.join_members(states))
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            pts = gens(torch.randn(K, -(-2500 // K), ns.latent_dim))
        ax.scatter(data.centres[:, 0], data.centres[:, 1], marker='x', c='0.6', s=12)
        colours = plt.cm.tab10.colors if K <= 10 else plt.cm.turbo([k / (K - 1) for k in range(K)])
        for k in range(K):
            ax.scatter(pts[k, :, 0], pts[k, :, 1], s=2, alpha=0.5, color=colours[k])
        lim = 2.6 if ns.dataset == 'ring8' else 5.2
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect='equal', xticks=[], yticks=[])
        ax.set_title(f'seed {seed}: {summary["modes_covered"]} modes, hq {summary["hq_fraction"]:.2f}', fontsize=8)
    fig.suptitle(f'pmgan.py {experiment} {setting}', fontsize=9)
    fig.tight_layout()
    path = os.path.join(RESULTS, f'pmgan_{experiment}_{setting}.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def n_gen(flags):
    return int(flags[flags.index('--n_gen') + 1])


def mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.3g} +- {sd:.2g}'


def finished(experiment, setting, seed):
    """The run's summary.json, or None while it has not finished."""
    path = os.path.join(WORK, experiment, f'{setting}-seed{seed}', 'summary.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def main():
    experiment = sys.argv[1]
    report_only = '--report' in sys.argv   # the table from the runs that have finished
    numbers = [a for a in sys.argv[2:] if a.isdigit()]
    jobs = int(numbers[0]) if numbers else 2
    seeds, settings = EXPERIMENTS[experiment]
    todo = [(setting, flags, seed) for seed in seeds for setting, flags in settings]   # seed-major
    if report_only:
        results = [finished(experiment, setting, seed) for setting, _, seed in todo]
    else:
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda t: run(experiment, *t), todo))
    by_setting, seeds_of = {}, {}
    for (setting, flags, seed), summary in zip(todo, results):
        if summary is not None:
            by_setting.setdefault(setting, []).append(summary)
            seeds_of.setdefault(setting, []).append(seed)
    settings = [(setting, flags) for setting, flags in settings if setting in by_setting]

    two_d = not experiment.startswith('stacked')
    keys = ['modes_covered', 'kl_uniform']
    keys += ['hq_fraction', 'precision_2d', 'recall_2d', 'density_2d', 'coverage_2d'] if two_d else []
    lines = ['| setting (seeds) | ' + ' | '.join(keys) + ' | modes of one generator (mean over '
             'generators) | modes per seed | CPU s per run |', '|---' * (len(keys) + 4) + '|']
    for setting, flags in settings:
        rows = by_setting[setting]
        own_modes = [statistics.mean(r[f'modes_covered_{k}'] for k in range(K)) if (K := n_gen(flags)) > 1
                     else r['modes_covered'] for r in rows]
        cells = [mean_sd([r[k] for r in rows]) for k in keys] + [mean_sd(own_modes)]
        per_seed = ', '.join(str(r['modes_covered']) for r in rows)
        cpu = statistics.mean(r['cpu_seconds'] for r in rows)
        lines.append(f'| {setting}: `{" ".join(flags)}` ({len(rows)}) | ' + ' | '.join(cells) +
                     f' | {per_seed} | {cpu:.0f} |')
    figures = [scatter(experiment, s, seeds_of[s]) for s, _ in settings] if two_d else []
    text = '\n'.join([f'Command: `OMP_NUM_THREADS=1 python bench/pmgan_modes.py {experiment}` '
                      f'(2-core CPU, one thread per run); each run: `python pmgan.py <flags> --seed S {" ".join(LOG)}`. '
                      'CPU s: training only (summary.json cpu_seconds, evaluations not counted).', '']
                     + lines + [''] + [f'![{os.path.basename(p)}]({os.path.basename(p)})' for p in figures])
    with open(os.path.join(RESULTS, f'pmgan_modes_{experiment}.md'), 'w') as f:
        f.write(text + '\n')
    print(text)


if __name__ == '__main__':
    main()
