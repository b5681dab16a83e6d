"""bench/leaderboard.py --quick (real tiny runs) and tools/compare_runs.py --table, which prints the
same table: the outputs exist, their numbers are the runs' own, and a second start reruns nothing."""
import csv
import hashlib
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO

QUICK_RUNS = [(task, method) for task in ('ring8', 'digits') for method in ('racing_wgan', 'racing_wgan_K1')]
BUDGETS = {'ring8': (0.25, 0.5), 'digits': (2.5, 5)}   # the --quick tasks' budgets
MAIN = {'ring8': 'coverage_2d', 'digits': 'fd_digits'}


def leaderboard(tmp, data_root, *extra):
    cmd = [sys.executable, os.path.join(REPO, 'bench', 'leaderboard.py'), '--quick', '--runs_dir', str(tmp / 'runs'),
           '--results_dir', str(tmp / 'results'), '--data_root', data_root, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def folder(tmp, task, method):
    return tmp / 'runs' / task / f'{method}-s0'


def section(markdown, task, title):
    """{method: {column: cell}} of one table of leaderboard.md (or compare_runs' output)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'**{task}, {title}**'))
    header = [c.strip() for c in lines[start + 2].strip('|').split('|')]
    rows = {}
    for line in lines[start + 4:]:
        if not line.startswith('|'):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def mean_of(cell):
    mean, sd = cell.split(' +- ')
    assert float(sd) == 0.0   # one seed
    return float(mean)


def fingerprints(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def quick(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp('leaderboard')
    stdout = leaderboard(tmp, data_root)
    return tmp, stdout


def test_quick_writes_the_table_the_figures_and_the_samples(quick):
    tmp, stdout = quick
    assert '0 of 4 runs finished already; 4 to run' in stdout
    markdown = (tmp / 'results' / 'leaderboard.md').read_text()
    for task in ('ring8', 'digits'):
        assert f'## {task}' in markdown
        for name in (f'leaderboard_{task}.png', f'leaderboard_{task}_samples.png'):
            assert f']({name})' in markdown
            with Image.open(tmp / 'results' / name) as image:
                assert image.size[0] > 200 and image.size[1] > 200
        for method in ('racing_wgan', 'racing_wgan_K1'):
            assert (folder(tmp, task, method) / 'summary.json').exists()
            assert f'- {method}: `python racing_wgan.py --dataset {task} --n_gen' in markdown
    assert 'Reading (generated from the numbers above)' in markdown


@pytest.mark.parametrize('task', ['ring8', 'digits'])
def test_table_numbers_are_the_runs_own(quick, task):
    tmp, _ = quick
    markdown = (tmp / 'results' / 'leaderboard.md').read_text()
    end = section(markdown, task, 'at the end')
    for method in ('racing_wgan', 'racing_wgan_K1'):
        run = folder(tmp, task, method)
        summary = json.loads((run / 'summary.json').read_text())
        row = end[method]
        assert mean_of(row['iterations']) == summary['iterations'] == (20 if task == 'ring8' else 10)
        assert mean_of(row['CPU s']) == round(summary['cpu_seconds'])
        main = MAIN[task]
        places = 1 if main == 'fd_digits' else 3
        assert mean_of(row[main]) == pytest.approx(round(summary[main], places), abs=1e-9)
        assert row['runs'] == '1/1'
        n_gen = json.loads((run / 'args.json').read_text())['n_gen']
        if method == 'racing_wgan':   # several generators: their mean figure and their overlap
            own = [summary[f'{main}_{k}'] for k in range(n_gen)]
            assert n_gen > 1 and mean_of(row[f'{main} per generator']) == \
                pytest.approx(round(sum(own) / n_gen, places), abs=1e-9)
            assert mean_of(row['overlap_mean']) == pytest.approx(round(summary['overlap_mean'], 3), abs=1e-9)
        else:
            assert row[f'{main} per generator'] == '-'
        # at each budget: the last evaluation in metrics.csv whose training CPU seconds are within it
        with open(run / 'metrics.csv') as f:
            rows = [r for r in csv.DictReader(f) if r.get(main)]
        assert [int(r['iteration']) for r in rows] == ([10, 20] if task == 'ring8' else [5, 10])
        for budget in BUDGETS[task]:
            cell = section(markdown, task, f'at {budget:g} CPU s')[method]
            within = [r for r in rows if float(r['cpu_seconds']) <= budget]
            if not within:
                assert cell['iterations'] == '-' and cell[main] == '-' and cell['runs'] == '0/1'
            else:
                assert mean_of(cell['iterations']) == int(within[-1]['iteration'])
                assert mean_of(cell[main]) == pytest.approx(round(float(within[-1][main]), places), abs=1e-9)


def test_cpu_seconds_leave_the_evaluation_out(quick):
    tmp, _ = quick
    with open(folder(tmp, 'digits', 'racing_wgan') / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    cpu = [float(r['cpu_seconds']) for r in rows]
    wall = [float(r['wall_seconds']) for r in rows]
    assert all(b >= a for a, b in zip(cpu, cpu[1:])) and cpu[0] > 0
    # one thread: training CPU time without the evaluations (the digit classifier, prdc) stays below the wall time
    assert cpu[-1] < wall[-1]


def test_a_second_start_reruns_nothing_and_a_missing_run_is_rerun_alone(quick, data_root):
    tmp, _ = quick
    before = fingerprints(tmp / 'runs')
    stdout = leaderboard(tmp, data_root)
    assert '4 of 4 runs finished already; 0 to run' in stdout and '$ ' not in stdout
    after = fingerprints(tmp / 'runs')
    assert {p: h for p, h in after.items() if '/results/' not in p} == \
           {p: h for p, h in before.items() if '/results/' not in p}
    # a stopped leaderboard: one run gone (never started); only it runs again
    gone = folder(tmp, 'ring8', 'racing_wgan_K1')
    subprocess.run(['rm', '-rf', str(gone)], check=True)
    stdout = leaderboard(tmp, data_root, '--tasks', 'ring8')
    assert '1 of 2 runs finished already; 1 to run' in stdout
    assert stdout.count('$ ') == 1 and 'racing_wgan_K1-s0' in stdout
    again = fingerprints(tmp / 'runs')
    for path, digest in before.items():
        if str(gone) not in path and '/results/' not in path and '/logs/' not in path:
            assert again[path] == digest, path


def test_compare_runs_prints_the_same_table(quick):
    tmp, _ = quick
    markdown = (tmp / 'results' / 'leaderboard.md').read_text()
    runs = [str(folder(tmp, 'ring8', m)) for m in ('racing_wgan', 'racing_wgan_K1')]
    result = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'compare_runs.py'), '--table', *runs,
                             '--budgets', '0.25', '0.5'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.count('| racing_wgan |') == 3 and printed in markdown


def test_unknown_task_or_method_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'leaderboard.py'), '--methods', 'nope',
                             '--runs_dir', str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'unknown nope' in result.stderr and 'pmgan_K1' in result.stderr
    assert not os.listdir(tmp_path)


def test_a_failed_run_starts_no_further_runs(tmp_path):
    broken = tmp_path / 'runs' / 'ring8' / 'racing_wgan-s0'
    broken.mkdir(parents=True)
    (broken / 'ckpt.pt').write_bytes(b'not a checkpoint')     # --resume auto refuses it in one line
    cmd = [sys.executable, os.path.join(REPO, 'bench', 'leaderboard.py'), '--quick', '--tasks', 'ring8', '--jobs', '1',
           '--runs_dir', str(tmp_path / 'runs'), '--results_dir', str(tmp_path / 'results'), '--data_root', str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 1 and 'ring8 racing_wgan 0 failed (exit 2' in result.stderr
    assert not (tmp_path / 'runs' / 'ring8' / 'racing_wgan_K1-s0').exists()
