"""Run lifecycle, for every script through common.Run: no overwritten run, --resume auto/last,
stop signals, elastic torchrun restarts, --generate, ckpt_best.pt, fp16 on the CPU, safe loading,
parse-time flag checks and --help."""
import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import REPO, assert_one_line_error, free_port, load_script, run_in_process, run_main, run_script

SCRIPTS = ('racing_wgan', 'racing_dcgan', 'pmgan', 'auction_gan', 'g_advantage_dcgan', 'biggan_sn')
RING8 = ['--dataset', 'ring8', '--batch_size', '32', '--latent_dim', '4', '--log_interval', '1',
         '--sample_interval', '0', '--ckpt_interval', '0', '--eval_samples', '200']
# Tiny digits runs of each script: a few iterations take about a second.
TINY = {
    'racing_wgan': ['--img_size', 8, '--batch_size', 16, '--latent_dim', 8, '--n_gen', 2],
    'racing_dcgan': ['--img_size', 16, '--batch_size', 8, '--latent_dim', 8, '--ngf', 4, '--ndf', 4, '--n_gen', 2],
    'pmgan': ['--img_size', 16, '--width', 4, '--batch_size', 16, '--latent_dim', 8, '--n_gen', 2],
    'auction_gan': ['--img_size', 16, '--n_gans', 2, '--width', 4, '--batch_size', 16, '--lot_size', 8,
                    '--latent_dim', 8],
    'g_advantage_dcgan': ['--img_size', 16, '--batch_size', 16, '--latent_dim', 8, '--ngf', 4, '--ndf', 4],
    'biggan_sn': ['--img_size', 32, '--ch', 2, '--batch_size', 8, '--latent_dim', 16, '--shared_dim', 8],
}
QUIET = ['--log_interval', 1, '--sample_interval', 0, '--ckpt_interval', 0, '--eval_samples', 100]


def tiny(name, data_root, out_dir, *extra):
    return TINY[name] + QUIET + ['--dataset', 'digits', '--data_root', data_root, '--out_dir', out_dir, *extra]


def ckpt(folder, name='ckpt.pt'):
    return torch.load(os.path.join(folder, name), weights_only=True)


def assert_same_state(a, b, *names):
    for name in names:
        for key, value in a[name].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[name][key]), (name, key)


def iterations_logged(folder):
    with open(os.path.join(folder, 'metrics.csv')) as f:
        return [int(r['iteration']) for r in csv.DictReader(f)]


def snapshot(folder):
    """Every file under folder (but generated/) with its bytes' hash: what a run 'touches'."""
    out = {}
    for root, _, files in os.walk(folder):
        if 'generated' in os.path.relpath(root, folder).split(os.sep):
            continue
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha1(open(path, 'rb').read()).hexdigest()
    return out


# --- never overwrite a run; --resume auto / last -----------------------------------------------

def test_fresh_run_into_a_used_folder_is_refused_and_touches_nothing(tmp_path, data_root, monkeypatch):
    args = ['--n_iters', 4] + tiny('racing_wgan', data_root, tmp_path / 'exp1')
    run_main(load_script('racing_wgan'), args, monkeypatch)
    before = snapshot(tmp_path / 'exp1')
    args[1] = 2   # the retyped command after a crash, --resume forgotten
    result = run_script('racing_wgan', args, tmp_path)
    assert_one_line_error(result, 'already holds a run', '--resume', '--resume auto', 'another --out_dir')
    assert snapshot(tmp_path / 'exp1') == before
    assert ckpt(tmp_path / 'exp1')['iteration'] == 4


def test_resume_auto_starts_fresh_then_continues_then_says_done(tmp_path, data_root, monkeypatch, capsys):
    out, racing_wgan = tmp_path / 'job', load_script('racing_wgan')
    base = tiny('racing_wgan', data_root, out, '--resume', 'auto')
    run_main(racing_wgan, ['--n_iters', 3] + base, monkeypatch)
    assert ckpt(out)['iteration'] == 3
    run_main(racing_wgan, ['--n_iters', 6] + base, monkeypatch)   # now it has a checkpoint
    assert ckpt(out)['iteration'] == 6 and iterations_logged(out) == list(range(1, 7))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:                   # finished: nothing to do, exit 0
        run_main(racing_wgan, ['--n_iters', 6] + base, monkeypatch)
    assert exit_.value.code == 0 and 'complete' in capsys.readouterr().out
    with pytest.raises(common.UserError, match='--resume auto needs --out_dir'):
        run_main(racing_wgan, ['--resume', 'auto'], monkeypatch)


def test_resume_takes_the_runs_flags_and_last_finds_the_newest(tmp_path, data_root, monkeypatch):
    work, racing_wgan = tmp_path / 'work', load_script('racing_wgan')
    work.mkdir()
    monkeypatch.chdir(work)
    args = ['--n_iters', 3, '--race_weight', 0.5] + tiny('racing_wgan', data_root, 'unused')[:-2]
    for _ in range(2):   # runs/racing_wgan/digits-001 and -002
        run_main(racing_wgan, args, monkeypatch)
    # only --n_iters given: every other flag (sizes, --race_weight, data root) comes from args.json
    run_main(racing_wgan, ['--resume', 'last', '--n_iters', 5], monkeypatch)
    newest = work / 'runs' / 'racing_wgan' / 'digits-002'
    assert ckpt(newest)['iteration'] == 5 and ckpt(work / 'runs' / 'racing_wgan' / 'digits-001')['iteration'] == 3
    assert json.loads((newest / 'args.json').read_text())['race_weight'] == 0.5


# --- stop signals -----------------------------------------------------------------------------

def start(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1')
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_log_lines(proc, n, timeout=120):
    deadline, seen = time.time() + timeout, 0
    while seen < n:
        line = proc.stdout.readline()
        assert line and time.time() < deadline, 'the run ended or stalled before it logged'
        if line.startswith('[Epoch'):
            seen += 1
            assert re.search(r'\[ETA (\d+h\d\dm|\d+m\d\ds|\d+s)\]$', line.rstrip()), line   # [ETA 3m12s]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_the_iteration_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, signum):
    args = RING8 + ['--n_gen', '2', '--gp', '1']
    proc = start([sys.executable, os.path.join(REPO, 'racing_wgan.py'), '--n_iters', '100000',
                  '--out_dir', str(tmp_path / 'cut')] + [str(a) for a in args], tmp_path)
    wait_for_log_lines(proc, 5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert 'Traceback' not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert 'stopped after iteration' in last and f'--resume {tmp_path / "cut"}' in last
    stopped_at = ckpt(tmp_path / 'cut')['iteration']
    assert stopped_at >= 5 and iterations_logged(tmp_path / 'cut') == list(range(1, stopped_at + 1))
    # --resume alone (plus the new length) continues; it equals one uninterrupted run
    end = stopped_at + 4
    racing_wgan = load_script('racing_wgan')   # in this process: the signal needed a real one, these do not
    monkeypatch.chdir(tmp_path)
    run_main(racing_wgan, ['--resume', tmp_path / 'cut', '--n_iters', end], monkeypatch)
    run_main(racing_wgan, ['--n_iters', end, '--out_dir', tmp_path / 'straight'] + args, monkeypatch)
    assert_same_state(ckpt(tmp_path / 'cut'), ckpt(tmp_path / 'straight'), 'generators', 'critic')
    assert iterations_logged(tmp_path / 'cut') == list(range(1, end + 1))


def test_second_interrupt_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(common.os, '_exit', lambda code: exits.append(code))
    before = signal.getsignal(signal.SIGINT)
    stop = common.StopSignals(watch_peers=False)
    try:
        stop.handle(signal.SIGTERM, None)
        assert stop.signum == signal.SIGTERM and not exits   # the first: finish the iteration
        stop.handle(signal.SIGTERM, None)
        assert not exits                                     # a repeated SIGTERM changes nothing
        stop.handle(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]                # a second Ctrl-C: now
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def torchrun_cmd(script, nproc=2, max_restarts=0):
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
            f'--max_restarts={max_restarts}', f'--master_port={free_port()}', script]


def test_sigterm_to_a_torchrun_job_checkpoints_every_rank_and_resumes(tmp_path):
    args = [str(a) for a in RING8 + ['--n_gen', '2', '--gp', '1']]
    proc = start(torchrun_cmd(os.path.join(REPO, 'racing_wgan.py')) + ['--n_iters', '100000', '--out_dir',
                 str(tmp_path / 'cut')] + args, tmp_path)
    wait_for_log_lines(proc, 5)
    os.killpg(proc.pid, signal.SIGTERM)   # as a cluster does: the whole job gets it
    _, err = proc.communicate(timeout=90)
    assert 'stopped after iteration' in err, err[-2000:]
    stopped_at = ckpt(tmp_path / 'cut')['iteration']
    assert stopped_at >= 5 and iterations_logged(tmp_path / 'cut') == list(range(1, stopped_at + 1))
    end = stopped_at + 3
    for cmd in (['--resume', str(tmp_path / 'cut'), '--n_iters', str(end)],
                ['--n_iters', str(end), '--out_dir', str(tmp_path / 'straight')] + args):
        result = subprocess.run(torchrun_cmd(os.path.join(REPO, 'racing_wgan.py')) + cmd, cwd=tmp_path,
                                env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_state(ckpt(tmp_path / 'cut'), ckpt(tmp_path / 'straight'), 'generators', 'critic')


# --- elastic restarts -------------------------------------------------------------------------

KILL_DRIVER = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
import common
module = __import__({name!r})
get = common.Batches.get
def get_or_die(self, iteration):
    """kill -9 of rank 1 at one iteration, in the first attempt only."""
    if (iteration == {die_at} and os.environ['RANK'] == '1'
            and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'):
        os.kill(os.getpid(), signal.SIGKILL)
    return get(self, iteration)
common.Batches.get = get_or_die
common.run_main(module.main)
'''


@pytest.mark.parametrize('name, flags', [
    ('racing_wgan', ['--n_gen', '2', '--gp', '1']),
    ('pmgan', ['--n_gen', '3', '--width', '16']),   # generators split across the ranks
])
def test_elastic_restart_after_kill_9_ends_as_an_uninterrupted_run(tmp_path, name, flags):
    driver = tmp_path / f'kill_{name}.py'
    driver.write_text(KILL_DRIVER.format(repo=REPO, name=name, die_at=13))
    args = [str(a) for a in RING8 + flags] + ['--n_iters', '20', '--ckpt_interval', '5']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    killed = subprocess.run(torchrun_cmd(str(driver), max_restarts=3) + args + ['--out_dir', str(tmp_path / 'run'),
                            '--resume', 'auto'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert 'exitcode: -9' in killed.stderr or 'another process of the job failed' in killed.stderr  # it died
    assert 'Traceback' not in killed.stderr
    plain = subprocess.run(torchrun_cmd(os.path.join(REPO, f'{name}.py')) + args + ['--out_dir',
                           str(tmp_path / 'plain')], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=240)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a, b = ckpt(tmp_path / 'run'), ckpt(tmp_path / 'plain')
    assert a['iteration'] == b['iteration'] == 20
    nets = ('generators', 'critic') if name == 'racing_wgan' else ('dc',)
    assert_same_state(a, b, *nets)
    if name == 'pmgan':
        for ga, gb in zip(a['generators'], b['generators']):
            assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert iterations_logged(tmp_path / 'run') == list(range(1, 21))   # each once, in order


# --- --generate and ckpt_best.pt --------------------------------------------------------------

@pytest.mark.parametrize('name', SCRIPTS)
def test_generate_writes_pngs_and_changes_nothing_else(tmp_path, data_root, name, monkeypatch):
    out, module = tmp_path / 'run', load_script(name)
    run_main(module, ['--n_iters', 2] + tiny(name, data_root, out), monkeypatch)
    before = snapshot(out)
    run_main(module, ['--resume', out, '--generate', 7], monkeypatch)
    assert snapshot(out) == before   # ckpt.pt, metrics.csv, summary.json, samples: untouched
    size = TINY[name][TINY[name].index('--img_size') + 1]
    folders = {'all'} | ({'g0', 'g1'} if name in ('racing_wgan', 'racing_dcgan', 'pmgan', 'auction_gan') else set())
    folders |= {f'class{c}' for c in range(10)} if name == 'biggan_sn' else set()   # conditional on digits
    assert set(os.listdir(out / 'generated')) == folders
    for folder in folders:
        files = sorted(os.listdir(out / 'generated' / folder))
        assert files == [f'{i:06d}.png' for i in range(7)]
        with Image.open(out / 'generated' / folder / files[0]) as im:
            assert im.size == (size, size) and im.mode == 'L'   # grey, as trained


def test_generate_2d_points_and_from_best(tmp_path, monkeypatch, capsys):
    out, racing_wgan = tmp_path / 'run', load_script('racing_wgan')
    args = RING8 + ['--n_gen', '2', '--gp', '1', '--n_iters', 6, '--eval_interval', 2, '--out_dir', out]
    run_main(racing_wgan, args, monkeypatch)
    summary = json.loads((out / 'summary.json').read_text())
    with open(out / 'metrics.csv') as f:
        kl = {int(r['iteration']): float(r['kl_uniform']) for r in csv.DictReader(f) if r.get('kl_uniform')}
    best_at = min(kl, key=kl.get)
    assert set(kl) == {2, 4, 6}
    assert summary['best_kl_uniform'] == pytest.approx(kl[best_at]) and summary['best_iteration'] == best_at
    assert ckpt(out, 'ckpt_best.pt')['iteration'] == best_at
    capsys.readouterr()
    run_main(racing_wgan, ['--resume', out, '--generate', 300, '--from', 'best'], monkeypatch)
    assert 'from ckpt_best.pt, iteration' in capsys.readouterr().out
    points = np.load(out / 'generated' / 'all.npy')
    assert points.shape == (300, 2) and np.load(out / 'generated' / 'g1.npy').shape == (300, 2)
    # the mixture interleaves the generators' draws: equal shares
    assert np.array_equal(points[1::2], np.load(out / 'generated' / 'g1.npy')[:150])
    assert np.array_equal(points[0::2], np.load(out / 'generated' / 'g0.npy')[:150])


def test_generate_uses_ema_and_truncation_in_biggan(tmp_path, data_root, monkeypatch):
    biggan_sn = load_script('biggan_sn')
    for name, flags in (('ema', ['--ema', '--ema_start', 0, '--ema_decay', 0.5]), ('plain', [])):
        args = ['--n_iters', 3, '--standing_stats', 2] + tiny('biggan_sn', data_root, tmp_path / name) + flags
        run_main(biggan_sn, args, monkeypatch)   # the same G both times (the EMA is a bystander)

    def generated(name, *flags):
        out = tmp_path / name
        run_main(biggan_sn, ['--resume', out, '--generate', 4, *flags], monkeypatch)
        return np.stack([np.asarray(Image.open(out / 'generated' / 'class3' / f'{i:06d}.png')) for i in range(4)])

    ema = generated('ema')
    assert np.array_equal(ema, generated('ema'))                      # seeded: the same images
    assert not np.array_equal(ema, generated('ema', '--truncation', 0.1))   # truncation reaches the sampler
    assert not np.array_equal(ema, generated('plain'))                # and so does the EMA generator


def test_generate_bad_input(tmp_path, data_root, monkeypatch):
    assert_one_line_error(run_script('racing_wgan', ['--generate', 5], tmp_path), '--generate', '--resume RUN')
    racing_wgan = load_script('racing_wgan')
    with pytest.raises(SystemExit):
        racing_wgan.parser.parse_args(['--generate', '0'])
    (tmp_path / 'empty_run').mkdir()
    with pytest.raises(common.UserError, match='no checkpoint'):
        run_main(racing_wgan, ['--resume', tmp_path / 'empty_run', '--generate', 5], monkeypatch)
    out = tmp_path / 'run'
    run_main(racing_wgan, ['--n_iters', 2] + tiny('racing_wgan', data_root, out), monkeypatch)
    os.remove(out / 'ckpt_best.pt')   # as in a run that tracked no quality figure
    with pytest.raises(common.UserError, match='ckpt_best.pt'):
        run_main(racing_wgan, ['--resume', out, '--generate', 5, '--from', 'best'], monkeypatch)


# --- safe loading -----------------------------------------------------------------------------

class RunsCodeOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))   # unpickling would create the marker file


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, data_root, monkeypatch):
    out, racing_wgan = tmp_path / 'run', load_script('racing_wgan')
    run_main(racing_wgan, ['--n_iters', 2] + tiny('racing_wgan', data_root, out), monkeypatch)
    state = ckpt(out)
    state['payload'] = RunsCodeOnLoad(str(tmp_path / 'marker'))
    torch.save(state, out / 'ckpt.pt')
    for extra in (['--n_iters', 4], ['--generate', 3]):
        with pytest.raises(common.UserError, match='refusing to load .* could run code'):
            run_main(racing_wgan, ['--resume', out] + extra, monkeypatch)
        assert not (tmp_path / 'marker').exists()
    assert_one_line_error(run_script('racing_wgan', ['--resume', out, '--n_iters', 4], tmp_path), 'refusing to load')


# --- fp16 on the CPU, NaN in pmgan's generators -------------------------------------------------

def test_amp_fp16_on_cpu_steps_and_resumes_with_its_scalers(tmp_path, monkeypatch, data_root):
    racing_dcgan = load_script('racing_dcgan')
    flags = ['--amp', 'fp16']
    run_main(racing_dcgan, ['--n_iters', 6] + tiny('racing_dcgan', data_root, tmp_path / 'straight', *flags),
             monkeypatch)
    run_main(racing_dcgan, ['--n_iters', 3] + tiny('racing_dcgan', data_root, tmp_path / 'split', *flags), monkeypatch)
    run_main(racing_dcgan, ['--n_iters', 6, '--resume', tmp_path / 'split'], monkeypatch)
    a, b = ckpt(tmp_path / 'straight'), ckpt(tmp_path / 'split')
    assert set(a['scalers']) == {'opt_G', 'opt_D'}                       # one GradScaler per optimizer
    assert a['scalers']['opt_G']['scale'] == b['scalers']['opt_G']['scale']
    assert_same_state(a, b, 'generators', 'discriminator')
    with open(tmp_path / 'straight' / 'metrics.csv') as f:
        assert all(np.isfinite(float(r['D'])) for r in csv.DictReader(f))


def test_pmgan_fp16_keeps_a_scaler_per_optimizer_and_nan_generators_are_never_saved(tmp_path, monkeypatch):
    pmgan = load_script('pmgan')
    run_main(pmgan, RING8 + ['--n_gen', 2, '--width', 16, '--n_iters', 3, '--amp', 'fp16',
                             '--out_dir', tmp_path / 'fp16'], monkeypatch)
    assert set(ckpt(tmp_path / 'fp16')['scalers']) == {'opt_G', 'opt_DC'}
    save = common.Run.save_checkpoint

    def poison_then_save(self, iteration, which='last', **objects):
        with torch.no_grad():
            next(self.objects['generators'].obj.parameters()).fill_(float('nan'))
        return save(self, iteration, which, **objects)

    monkeypatch.setattr(common.Run, 'save_checkpoint', poison_then_save)
    with pytest.raises(common.UserError, match='generators weights became NaN'):
        run_main(pmgan, RING8 + ['--n_gen', 2, '--width', 16, '--n_iters', 3, '--out_dir', tmp_path / 'nan'],
                 monkeypatch)
    assert not (tmp_path / 'nan' / 'ckpt.pt').exists()


# --- flags and --help -------------------------------------------------------------------------

@pytest.mark.parametrize('name', SCRIPTS)
def test_bad_shared_numbers_are_refused_when_parsed(name, capsys):
    parser = load_script(name).parser
    for flags, words in ((['--lr', '-1'], ['--lr', 'more than 0']), (['--b1', '1.5'], ['--b1', '[0, 1)']),
                         (['--batch_size', 'x'], ['--batch_size', 'not an integer']),
                         (['--lr', 'nan'], ['--lr', 'finite']), (['--amp', 'fp8'], ['--amp', 'fp16'])):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(flags)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_.value.code == 2 and len(err) == 1 and all(w in err[0] for w in words), err


@pytest.mark.parametrize('name', SCRIPTS)
def test_help_keeps_the_usage_lines_and_hides_none_defaults(tmp_path, name, monkeypatch, capsys):
    monkeypatch.setenv('COLUMNS', '80')   # argparse wraps to the terminal: an 80-column one
    module = load_script(name)
    result = run_in_process(module, ['--help'], tmp_path, monkeypatch, capsys)
    assert result.returncode == 0
    doc_lines = [line.strip() for line in module.__doc__.splitlines() if line.strip()]
    examples = [line for line in doc_lines if line.startswith(('python ', 'torchrun '))]
    assert examples, 'the docstring shows commands'
    help_lines = [line.strip() for line in result.stdout.splitlines()]
    assert all(line in help_lines for line in examples)   # each command on its own line, as written
    assert 'default: None' not in result.stdout
