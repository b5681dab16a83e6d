"""One table for the field: every script on the same tasks, with the same evaluation, quality
against training compute.

    OMP_NUM_THREADS=1 python bench/leaderboard.py                  # all of it (hours: see TASKS)
    OMP_NUM_THREADS=1 python bench/leaderboard.py --tasks ring8 grid25 --methods pmgan pmgan_K1
    python bench/leaderboard.py --report                           # tables and figures of the runs so far
    python bench/leaderboard.py --quick                            # a tiny version (the tests run it)

Tasks: ring8 and grid25 (2-D, 5 seeds), stacked-digits and digits (images, 3 seeds). Methods: each
script that applies, in the configuration its docs page gives for the task, and the single-generator
(or no-auction, or R = 1) baseline it reduces to. Every run is an ordinary run folder,
bench/leaderboard_runs/<task>/<method>-s<seed>/, started with --resume auto: a run with a summary.json is
skipped, a stopped one continues from its checkpoint, so a stopped leaderboard continues where it
was. Runs go --jobs at a time, one thread each.

Every method gets about the same training CPU seconds on a task (its iterations are set from its
measured cost per iteration) and evaluates five times, every n_iters / 5, with the scripts' own
evaluation (the same code for every method): modes covered, high-quality fraction and KL to uniform on the
2-D and stacked sets, fd_digits (and class accuracy, for the conditional biggan_sn.py) on digits,
precision/recall/density/coverage (on the 2-D points or the digit classifier's features; not on
the stacked sets), each generator's figures and their overlap. metrics.csv records, at every
evaluation, the run's wall seconds and its training CPU seconds (process CPU time, evaluation left
out). The report (bench/results/leaderboard.md, or --results_dir) gives per task the figures at
half the budget, at the budget and at the end, mean +- sd over seeds; a figure of the main quality figure
against CPU seconds; one panel of final samples (seed 0) per method. tools/compare_runs.py --table
prints the same table for any run folders.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tools'))
import compare_runs  # noqa: E402

# method: (script, flags). The configurations of the docs pages; the baselines each reduces to.
METHODS_2D = {
    'racing_wgan': ('racing_wgan.py', ['--n_gen', '4', '--gp', '10']),
    'racing_wgan_K1': ('racing_wgan.py', ['--n_gen', '1', '--gp', '10']),
    'pmgan': ('pmgan.py', ['--n_gen', '8']),
    'pmgan_K1': ('pmgan.py', ['--n_gen', '1']),
    'auction_gan': ('auction_gan.py', ['--n_gans', '6']),
    'auction_gan_none': ('auction_gan.py', ['--n_gans', '6', '--no_auction']),
}
METHODS_IMAGES = {
    'racing_wgan': ('racing_wgan.py', ['--n_gen', '2']),
    'racing_wgan_K1': ('racing_wgan.py', ['--n_gen', '1']),
    'racing_dcgan': ('racing_dcgan.py', ['--n_gen', '2', '--joint_fake_bn']),
    'racing_dcgan_K1': ('racing_dcgan.py', ['--n_gen', '1']),
    'pmgan': ('pmgan.py', ['--n_gen', '8']),
    'pmgan_K1': ('pmgan.py', ['--n_gen', '1']),
    'auction_gan': ('auction_gan.py', ['--img_size', '16']),
    'auction_gan_none': ('auction_gan.py', ['--img_size', '16', '--no_auction']),
    'g_advantage_dcgan': ('g_advantage_dcgan.py', ['--g_advantage', '4']),
    'g_advantage_R1': ('g_advantage_dcgan.py', ['--g_advantage', '1']),
    'biggan_sn': ('biggan_sn.py', []),
}
# task: dataset, seeds, a CPU-second budget, and per method the iterations that take about that
# long (from one thread's CPU time per iteration in 30-200-iteration runs, 2026-12-01; longer runs
# are cheaper per iteration, so they end somewhat below it): about the same training compute for
# every method, so the iterations differ. Each run evaluates 5 times, every n_iters / 5. The
# tables: at half the budget, at the budget, and at the end. The whole leaderboard is about 4
# hours on a 2-core CPU with --jobs 2.
TASKS = {
    'ring8': dict(dataset='ring8', seeds=range(5), cpu_budget=60, methods=METHODS_2D, n_iters={
        'racing_wgan': 7000, 'racing_wgan_K1': 9500, 'pmgan': 6000, 'pmgan_K1': 8000,
        'auction_gan': 3500, 'auction_gan_none': 5500}),
    'grid25': dict(dataset='grid25', seeds=range(5), cpu_budget=60, methods=METHODS_2D, n_iters={
        'racing_wgan': 7000, 'racing_wgan_K1': 9500, 'pmgan': 6000, 'pmgan_K1': 8000,
        'auction_gan': 3500, 'auction_gan_none': 5500}),
    'digits': dict(dataset='digits', seeds=range(3), cpu_budget=300, methods=METHODS_IMAGES, n_iters={
        'racing_wgan': 12000, 'racing_wgan_K1': 15000, 'racing_dcgan': 400, 'racing_dcgan_K1': 800,
        'pmgan': 900, 'pmgan_K1': 1100, 'auction_gan': 350, 'auction_gan_none': 500,
        'g_advantage_dcgan': 270, 'g_advantage_R1': 650, 'biggan_sn': 180}),
    'stacked-digits': dict(dataset='stacked-digits', seeds=range(3), cpu_budget=240, eval_samples=10000,
                           methods={m: METHODS_IMAGES[m] for m in METHODS_IMAGES if m != 'biggan_sn'}, n_iters={
        'racing_wgan': 6000, 'racing_wgan_K1': 8000, 'racing_dcgan': 300, 'racing_dcgan_K1': 500,
        'pmgan': 600, 'pmgan_K1': 800, 'auction_gan': 240, 'auction_gan_none': 350,
        'g_advantage_dcgan': 180, 'g_advantage_R1': 400}),
}
QUICK = {   # the same code path in seconds: two tasks, two methods, one seed, a few iterations
    'ring8': dict(TASKS['ring8'], seeds=range(1), cpu_budget=0.5, evaluations=2,
                  methods={m: METHODS_2D[m] for m in ('racing_wgan', 'racing_wgan_K1')},
                  n_iters={'racing_wgan': 20, 'racing_wgan_K1': 20}),
    'digits': dict(TASKS['digits'], seeds=range(1), cpu_budget=5, evaluations=2,
                   methods={m: METHODS_IMAGES[m] for m in ('racing_wgan', 'racing_wgan_K1')},
                   n_iters={'racing_wgan': 10, 'racing_wgan_K1': 10}),
}
QUICK_FLAGS = ['--eval_samples', '200', '--batch_size', '32']


def run_folder(runs_dir, task, method, seed):
    return os.path.join(runs_dir, task, f'{method}-s{seed}')


def finished(folder):
    return os.path.exists(os.path.join(folder, 'summary.json'))


def budgets(task):
    """The tables' two CPU-second budgets: half the runs' budget, and the budget."""
    return (task['cpu_budget'] / 2, task['cpu_budget'])


def command(a, tasks, task, method, seed):
    t = tasks[task]
    script, flags = t['methods'][method]
    n_iters = t['n_iters'][method]
    every = str(max(n_iters // t.get('evaluations', 5), 1))
    return ([sys.executable, os.path.join(REPO, script), '--dataset', t['dataset']] + flags +
            ['--seed', str(seed), '--n_iters', str(n_iters), '--eval_interval', every,
             '--sample_interval', '0', '--log_interval', every,
             '--ckpt_interval', str(max(n_iters // 4, 1)), '--data_root', a.data_root,
             '--out_dir', run_folder(a.runs_dir, task, method, seed), '--resume', 'auto'] +
            (['--eval_samples', str(t['eval_samples'])] if 'eval_samples' in t else []) +
            (QUICK_FLAGS if a.quick else []))


def train(a, tasks, jobs):
    """Run the jobs not finished yet, a.jobs at a time. A failed run (or a stopped one: Ctrl-C stops
    every run at a checkpoint) starts no further runs; the leaderboard then stops with its log's end."""
    todo = [j for j in jobs if not finished(run_folder(a.runs_dir, *j))]
    print(f'{len(jobs) - len(todo)} of {len(jobs)} runs finished already; {len(todo)} to run', flush=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    failures = []

    def one(job):
        if failures:
            return
        cmd = command(a, tasks, *job)
        log_path = os.path.join(a.runs_dir, job[0], 'logs', f'{job[1]}-s{job[2]}.txt')
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        print('$ OMP_NUM_THREADS=1 python ' + ' '.join(os.path.relpath(c, REPO) if c.startswith(REPO) else c
                                                     for c in cmd[1:]), flush=True)
        began = time.time()
        with open(log_path, 'a') as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        if code != 0:
            with open(log_path) as log:
                tail = log.read().strip().splitlines()[-3:]
            failures.append(f'{" ".join(map(str, job))} failed (exit {code}, log {log_path}): {" / ".join(tail)}')
            return
        print(f'finished {job[0]} {job[1]} seed {job[2]} in {time.time() - began:.0f} s', flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, todo))
    if failures:
        raise SystemExit('\n'.join(failures))


# ---- the report ----------------------------------------------------------------------------

def groups_of(a, tasks, task):
    """{method: [its finished run folders]}, in the order of the task's methods (a run still going,
    or stopped, joins the tables when it has finished: tools/compare_runs.py --table shows it now)."""
    out = {}
    for method in tasks[task]['methods']:
        folders = [run_folder(a.runs_dir, task, method, s) for s in tasks[task]['seeds']]
        folders = [f for f in folders if finished(f)]
        if folders:
            out[method] = folders
    return out


def curve_figure(groups, task, path):
    """The main quality figure against training CPU seconds: per method the mean over seeds at each
    evaluation (at the seeds' mean CPU seconds), shaded +- one sd."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    main, better = compare_runs.MAIN_FIGURE[compare_runs.data_kind(next(iter(groups.values()))[0])]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (method, folders) in enumerate(groups.items()):
        by_iteration = {}
        for folder in folders:
            for row in compare_runs.evaluations(folder):
                if main in row:
                    by_iteration.setdefault(row['iteration'], []).append((row['cpu_seconds'], row[main]))
        its = sorted(by_iteration)
        cpu = [statistics.mean(c for c, _ in by_iteration[i]) for i in its]
        mean = [statistics.mean(v for _, v in by_iteration[i]) for i in its]
        sd = [statistics.stdev([v for _, v in by_iteration[i]]) if len(by_iteration[i]) > 1 else 0 for i in its]
        colour = f'C{i % 10}'
        ax.plot(cpu, mean, label=method, color=colour, ls='--' if i >= 10 else '-', marker='.')
        ax.fill_between(cpu, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                        color=colour, alpha=0.15)
    ax.set(xlabel='training CPU seconds (evaluation left out)', ylabel=f'{main} ({better} is better)', title=task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def final_samples(folder):
    """The run's last sample grid (or scatter plot), or None."""
    samples = os.path.join(folder, 'samples')
    names = sorted(n for n in os.listdir(samples) if n.endswith('.png')) if os.path.isdir(samples) else []
    return os.path.join(samples, names[-1]) if names else None


def samples_figure(groups, task, path):
    """One panel per method: the final samples of its first seed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image
    panels = [(m, final_samples(f[0])) for m, f in groups.items()]
    panels = [(m, p) for m, p in panels if p]
    if not panels:
        return False
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for ax, (method, png) in zip(axes.flat, panels):
        ax.imshow(Image.open(png))
        ax.set_title(method, fontsize=9)
    fig.suptitle(f'{task}: final samples, seed 0', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def reading(groups, budgets):
    """One plain sentence per point (budgets, end): the best method by the main figure and whether the
    runner-up is within the spread (the difference of means below the larger sd)."""
    rows = compare_runs.method_rows(groups, budgets)
    main, better = compare_runs.MAIN_FIGURE[compare_runs.data_kind(next(iter(groups.values()))[0])]
    sentences = []
    for point, title in enumerate([f'at {b:g} CPU s' for b in budgets] + ['at the end']):
        scored = [(statistics.mean(v[point][main]), statistics.stdev(v[point][main]) if len(v[point][main]) > 1
                   else 0.0, m) for m, v in rows.items() if v[point].get(main)]
        if not scored:
            continue
        scored.sort(reverse=better == 'higher')
        best = scored[0]
        if len(scored) == 1:
            sentences.append(f'{title}: only {best[2]} has an evaluation ({main} {best[0]:.3g}).')
            continue
        second = scored[1]
        within = abs(best[0] - second[0]) <= max(best[1], second[1])
        sentences.append(f'{title}: best {main} {best[2]} ({best[0]:.3g} +- {best[1]:.2g}), then {second[2]} '
                         f'({second[0]:.3g} +- {second[1]:.2g}): ' +
                         ('within the spread.' if within else 'apart by more than the spread.'))
    return sentences


def overview(a, tasks):
    """Markdown lines: one row per method, one column per task, the task's main figure at the end
    (mean +- sd over the finished seeds, their number): the README's table."""
    columns = {}
    for task, t in tasks.items():
        groups = groups_of(a, tasks, task)
        if groups:
            rows = compare_runs.method_rows(groups, [])
            columns[task] = ({m: v[-1] for m, v in rows.items()},
                             compare_runs.MAIN_FIGURE[compare_runs.data_kind(next(iter(groups.values()))[0])])
    if not columns:
        return []
    methods = list(dict.fromkeys(m for t in tasks.values() for m in t['methods']))
    lines = ['| method | ' + ' | '.join(f'{task}: {main} ({"higher" if better == "higher" else "lower"} is better)'
                                        for task, (_, (main, better)) in columns.items()) + ' |',
             '|---' * (len(columns) + 1) + '|']
    for method in methods:
        cells = []
        for task, (ends, (main, _)) in columns.items():
            values = ends.get(method, {}).get(main, [])
            cells.append(f'{compare_runs.mean_sd(values, compare_runs.digits_for(main))} ({len(values)})'
                         if values else '')
        if any(cells):
            lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    return lines


def report(a, tasks):
    os.makedirs(a.results_dir, exist_ok=True)
    command_line = 'python bench/leaderboard.py' + (' --quick' if a.quick else '')
    text = ['# Leaderboard: every method on the same tasks, quality against training CPU seconds', '',
            f'Written by `{command_line}` (bench/leaderboard.py). Machine: '
            f'{os.cpu_count()}-core CPU, one thread per run, --jobs {a.jobs} runs at a time. CPU seconds count '
            'training only (the evaluation, identical for every method, is left out); each cell is mean +- sd '
            'over the finished seeds that reached it, "runs" says how many did.', '',
            '## Overview: the main figure at the end (mean +- sd over seeds, how many)', '']
    text += overview(a, tasks) + ['']
    for task, t in tasks.items():
        groups = groups_of(a, tasks, task)
        if not groups:
            continue
        n_done = sum(finished(f) for fs in groups.values() for f in fs)
        n_all = len(t['methods']) * len(t['seeds'])
        text += [f'## {task}', '',
                 f'Seeds {", ".join(map(str, t["seeds"]))}; each run gets about {t["cpu_budget"]:g} training CPU '
                 f'seconds (its iterations below), evaluating every n_iters / {t.get("evaluations", 5)}; {n_done} of {n_all} runs '
                 f'finished. Methods:', '']
        text += [f'- {m}: `python {s} --dataset {t["dataset"]} {" ".join(f)} --n_iters {t["n_iters"][m]}`'
                 for m, (s, f) in t['methods'].items() if m in groups] + ['']
        text += compare_runs.table(groups, budgets(t))
        text += ['Reading (generated from the numbers above):', '']
        text += [f'- {s}' for s in reading(groups, budgets(t))] + ['']
        curve = f'leaderboard_{task}.png'
        curve_figure(groups, task, os.path.join(a.results_dir, curve))
        text += [f'![{task}: quality against CPU seconds]({curve})', '']
        panel = f'leaderboard_{task}_samples.png'
        if samples_figure(groups, task, os.path.join(a.results_dir, panel)):
            text += [f'![{task}: final samples]({panel})', '']
    path = os.path.join(a.results_dir, 'leaderboard.md')
    with open(path, 'w') as f:
        f.write('\n'.join(text) + '\n')
    print(f'wrote {path}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', nargs='+', default=None, help=f'some of {", ".join(TASKS)} (default: all)')
    p.add_argument('--methods', nargs='+', default=None, help='some methods (default: all that apply)')
    p.add_argument('--quick', action='store_true', help='a tiny version: two tasks, two methods, seconds')
    p.add_argument('--report', action='store_true', help='only the tables and figures (of all runs so far)')
    p.add_argument('--jobs', type=int, default=2, help='runs at once (one thread each)')
    p.add_argument('--runs_dir', default=None, help='default bench/leaderboard_runs (kept in the repository '
                   'without checkpoints); with --quick runs/leaderboard-quick')
    p.add_argument('--results_dir', default=None, help='default bench/results; with --quick <runs_dir>/results')
    p.add_argument('--data_root', default=os.path.join(REPO, 'data'))
    a = p.parse_args()
    tasks = QUICK if a.quick else TASKS
    unknown = [t for t in a.tasks or [] if t not in tasks] + [m for m in a.methods or []
                                                               if not any(m in t['methods'] for t in tasks.values())]
    if unknown:
        p.error(f'unknown {", ".join(unknown)}: tasks are {", ".join(tasks)}; methods '
                f'{", ".join(dict.fromkeys(m for t in tasks.values() for m in t["methods"]))}')
    tasks = {name: t for name, t in tasks.items() if not a.tasks or name in a.tasks}
    a.runs_dir = a.runs_dir or (os.path.join(REPO, 'runs', 'leaderboard-quick') if a.quick
                                else os.path.join(REPO, 'bench', 'leaderboard_runs'))
    a.results_dir = a.results_dir or (os.path.join(a.runs_dir, 'results') if a.quick
                                      else os.path.join(REPO, 'bench', 'results'))
    if not a.report:
        # seed by seed across the tasks: a leaderboard stopped early has every task's first seeds
        jobs = [(task, method, seed) for seed in range(max(len(t['seeds']) for t in tasks.values()))
                for task, t in tasks.items() if seed in t['seeds']
                for method in t['methods'] if not a.methods or method in a.methods]
        train(a, tasks, jobs)
    report(a, QUICK if a.quick else TASKS)   # every run so far, not only the ones selected


if __name__ == '__main__':
    main()
