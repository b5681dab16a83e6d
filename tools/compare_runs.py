"""Compare run folders: overlay their metrics.csv in one PNG (one panel per loss or metric, one
line per run, per generator too, against iterations), or print the leaderboard's table of them.

    python tools/compare_runs.py runs/racing_dcgan/digits-001 runs/racing_dcgan/digits-002 -o cmp.png
    python tools/compare_runs.py runs/*/digits-00[1-3] --labels wgan dcgan pmgan -o cmp.png
    python tools/compare_runs.py --table bench/leaderboard_runs/ring8/* my_runs/ring8-* --budgets 50 100

A run is named by its folder; where two folders share a name, by as much of the path as tells
them apart. A path to a metrics.csv itself works as well as its folder.

--table groups the runs into methods by label, a trailing -s<N> or -seed<N> (the seed) taken
off, so the seeds of one method share a row, and prints, per data set, the figures of the
evaluation that every script makes (bench/leaderboard.py writes the same table): mean +- sd over
the seeds at each CPU-second budget (the last evaluation within it; cpu_seconds in metrics.csv
count training only, evaluation left out) and at the end, with the iterations reached.
"""
import argparse
import csv
import json
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

parser = common.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('runs', nargs='+', help='run folders (or their metrics.csv files)')
parser.add_argument('-o', '--out', default='compare_runs.png', help='the PNG to write')
parser.add_argument('--labels', nargs='+', default=None, help='one legend label per run (default: folder names)')
parser.add_argument('--table', action='store_true', help='print the table instead of drawing the PNG')
parser.add_argument('--budgets', nargs='*', type=common.positive_float, default=[],
                    help='with --table: CPU-second budgets, one column group each (besides the end)')

# The one evaluation of the leaderboard, per kind of data set: (figures, the main figure, better).
# Each generator's copy of a figure is <figure>_<k>; overlap_mean is how far the generators' modes overlap.
FIGURES = {'2d': ['modes_covered', 'hq_fraction', 'kl_uniform', 'precision_2d', 'recall_2d', 'density_2d',
                  'coverage_2d'],
           'stacked': ['modes_covered', 'kl_uniform'],
           'digits': ['fd_digits', 'class_accuracy', 'precision_digits', 'recall_digits', 'density_digits',
                      'coverage_digits']}
MAIN_FIGURE = {'2d': ('coverage_2d', 'higher'), 'stacked': ('modes_covered', 'higher'),
               'digits': ('fd_digits', 'lower')}


def short_labels(folders):
    """The shortest trailing part of each path that no other path shares."""
    parts = [os.path.normpath(os.path.abspath(f)).split(os.sep) for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ['/'.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(i) for i in range(len(folders))]     # the same folder given twice


def run_folders(runs):
    """(folders, their metrics.csv paths); one line when a path is no run folder."""
    folders, csvs = [], []
    for run in runs:
        path = run if run.endswith('.csv') else os.path.join(run, 'metrics.csv')
        if not os.path.isfile(path):
            raise common.UserError(f'{run} has no metrics.csv: pass run folders written by the training scripts')
        folders.append(os.path.dirname(path) or '.')
        csvs.append(path)
    return folders, csvs


# ---- the table -------------------------------------------------------------------------------

def run_dataset(folder):
    with open(os.path.join(folder, 'args.json')) as f:
        return json.load(f)['dataset']


def data_kind(folder):
    """'2d', 'stacked' or 'digits' (the evaluation a run's data set gets), from its args.json."""
    dataset = run_dataset(folder)
    return '2d' if dataset in common.TOY_SETS else 'stacked' if dataset.startswith('stacked') else 'digits'


def evaluations(folder):
    """A run's metrics.csv rows that hold an evaluation, as {column: float}, empty cells left out."""
    with open(os.path.join(folder, 'metrics.csv')) as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ('', None)} for row in csv.DictReader(f)]
    kind = data_kind(folder)
    return [r for r in rows if any(name in r for name in FIGURES[kind])]


def per_generator(values, figure):
    """The mean over generators of <figure>_<k>, or None for a single generator."""
    own = [v for k, v in values.items() if re.fullmatch(re.escape(figure) + r'_\d+', k)]
    return statistics.mean(own) if len(own) > 1 else None


def run_points(folder, budgets):
    """One point per budget (the last evaluation with cpu_seconds within it, None when the run has
    none yet) and the end (summary.json when the run finished, else its last evaluation)."""
    rows = evaluations(folder)
    points = [next((r for r in reversed(rows) if r.get('cpu_seconds', math.inf) <= budget), None)
              for budget in budgets]
    summary_path = os.path.join(folder, 'summary.json')
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        end = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        end['iteration'] = end.pop('iterations')
    else:
        end = rows[-1] if rows else None
    return points + [end]


def method_name(label):
    """A run's method: its label without a trailing seed (-s3, -seed3, _s3)."""
    return re.sub(r'[-_](s|seed)\d+$', '', label)


def mean_sd(values, digits):
    if not values:
        return '-'
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}'


def digits_for(figure):
    return 1 if figure.removesuffix(' per generator') in ('modes_covered', 'fd_digits') else 3


def method_rows(groups, budgets):
    """{method: [per point: {figure: [value per seed]}]} for the points of run_points."""
    out = {}
    for method, folders in groups.items():
        per_point = [dict() for _ in range(len(budgets) + 1)]
        for folder in folders:
            main, _ = MAIN_FIGURE[data_kind(folder)]
            for slot, point in zip(per_point, run_points(folder, budgets)):
                if point is None:
                    continue
                values = dict(point)
                mean_own = per_generator(point, main)
                if mean_own is not None:
                    values[f'{main} per generator'] = mean_own
                for name, value in values.items():
                    slot.setdefault(name, []).append(value)
        out[method] = per_point
    return out


def table(groups, budgets):
    """Markdown lines: per data set among the runs, one table per budget and one for the end, one row
    per method, each figure's mean +- sd over the method's runs (its seeds)."""
    datasets = {}
    for method, folders in groups.items():
        for folder in folders:
            datasets.setdefault(run_dataset(folder), {}).setdefault(method, []).append(folder)
    lines = []
    for dataset, kind_groups in datasets.items():
        kind = data_kind(kind_groups[next(iter(kind_groups))][0])
        rows = method_rows(kind_groups, budgets)
        main, better = MAIN_FIGURE[kind]
        names = [f for f in FIGURES[kind] if any(f in p for per in rows.values() for p in per)]
        names += [n for n in (f'{main} per generator', 'overlap_mean')
                  if any(n in p for per in rows.values() for p in per)]
        points = [f'at {b:g} CPU s' for b in budgets] + ['at the end']
        for point, title in enumerate(points):
            lines += [f'**{dataset}, {title}** (main figure {main}, {better} is better; mean +- sd over seeds)', '',
                      '| method | runs | iterations | CPU s | ' + ' | '.join(names) + ' |',
                      '|---' * (len(names) + 4) + '|']
            for method, per_point in rows.items():
                values = per_point[point]
                cells = [mean_sd(values.get(n, []), digits_for(n)) for n in names]
                lines.append(f'| {method} | {len(values.get("iteration", []))}/{len(kind_groups[method])} | '
                             f'{mean_sd(values.get("iteration", []), 0)} | '
                             f'{mean_sd(values.get("cpu_seconds", []), 0)} | ' + ' | '.join(cells) + ' |')
            lines.append('')
    return lines


def main():
    args = parser.parse_args()
    folders, csvs = run_folders(args.runs)
    labels = args.labels or short_labels(folders)
    if len(labels) != len(csvs):
        raise common.UserError(f'{len(labels)} --labels for {len(csvs)} runs: give one label per run')
    if args.table:
        groups = {}
        for label, folder in zip(labels, folders):
            groups.setdefault(method_name(label), []).append(folder)
        print('\n'.join(table(groups, args.budgets)))
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if os.path.exists(args.out):
        os.remove(args.out)
    common.plot_metrics(csvs, args.out, labels)
    if not os.path.exists(args.out):
        raise common.UserError('the metrics.csv files have no rows yet: let the runs log first')
    print(f'wrote {args.out}: {", ".join(labels)}')


if __name__ == '__main__':
    common.run_main(main)
