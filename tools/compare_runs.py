"""Overlay the metrics.csv of several run folders in one PNG: one panel per loss or metric,
one line per run (per generator too), against iterations.

    python tools/compare_runs.py runs/racing_dcgan/digits-001 runs/racing_dcgan/digits-002 -o cmp.png
    python tools/compare_runs.py runs/*/digits-00[1-3] --labels wgan dcgan pmgan -o cmp.png

A run is named by its folder; where two folders share a name, by as much of the path as tells
them apart. A path to a metrics.csv itself works as well as its folder.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

parser = common.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('runs', nargs='+', help='run folders (or their metrics.csv files)')
parser.add_argument('-o', '--out', default='compare_runs.png', help='the PNG to write')
parser.add_argument('--labels', nargs='+', default=None, help='one legend label per run (default: folder names)')


def short_labels(folders):
    """The shortest trailing part of each path that no other path shares."""
    parts = [os.path.normpath(os.path.abspath(f)).split(os.sep) for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ['/'.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(i) for i in range(len(folders))]     # the same folder given twice


def main():
    args = parser.parse_args()
    folders, csvs = [], []
    for run in args.runs:
        path = run if run.endswith('.csv') else os.path.join(run, 'metrics.csv')
        if not os.path.isfile(path):
            raise common.UserError(f'{run} has no metrics.csv: pass run folders written by the training scripts')
        folders.append(os.path.dirname(path) or '.')
        csvs.append(path)
    labels = args.labels or short_labels(folders)
    if len(labels) != len(csvs):
        raise common.UserError(f'{len(labels)} --labels for {len(csvs)} runs: give one label per run')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if os.path.exists(args.out):
        os.remove(args.out)
    common.plot_metrics(csvs, args.out, labels)
    if not os.path.exists(args.out):
        raise common.UserError('the metrics.csv files have no rows yet: let the runs log first')
    print(f'wrote {args.out}: {", ".join(labels)}')


if __name__ == '__main__':
    common.run_main(main)
