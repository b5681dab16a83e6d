"""--fid_every in the training scripts (common.Evaluator + fid.py): metrics.csv and summary.json,
refusal at start-up, flag checks, per-rank noise, unflipped reference images, and a
generator-parallel torchrun run (pmgan) whose sampler is a collective."""
import csv
import json
import os

import pytest
import torch

import common
from conftest import assert_one_line_error, load_script, run_main, run_script, run_torchrun

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')  # fid.py: N below 2048 dims
racing_wgan = load_script('racing_wgan')
TINY = ['--img_size', '8', '--batch_size', '16', '--latent_dim', '8', '--log_interval', '1',
        '--sample_interval', '0', '--ckpt_interval', '0', '--subset', '16', '--fid_samples', '12']


def test_fid_every_logs_fid_to_metrics_and_summary(tmp_path, data_root, fid_torch_home, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', fid_torch_home)
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    out = tmp_path / 'run'
    run_main(racing_wgan, TINY + ['--n_iters', 4, '--fid_every', 2, '--data_root', data_root, '--out_dir', out],
             monkeypatch)
    with open(out / 'metrics.csv') as f:
        fids = {int(r['iteration']): r['fid'] for r in csv.DictReader(f) if r.get('fid')}
    assert sorted(fids) == [2, 4] and all(float(v) > 0 for v in fids.values())
    with open(out / 'summary.json') as f:
        assert json.load(f)['fid'] == pytest.approx(float(fids[4]))
    assert any(name.startswith('fid_stats_digits-first16') for name in os.listdir(data_root))  # cached


def test_missing_or_corrupt_weights_refused_before_a_run_folder(tmp_path, data_root, fid_torch_home):
    args = TINY + ['--n_iters', 2, '--fid_every', 1, '--data_root', data_root]
    empty_home = {'TORCH_HOME': str(tmp_path / 'empty'), 'FID_WEIGHTS': ''}
    result = run_script('racing_wgan', args + ['--fid_weights', tmp_path / 'nope.pth',
                                               '--out_dir', tmp_path / 'a'], cwd=tmp_path, env=empty_home)
    assert_one_line_error(result, 'weights file not found', 'nope.pth')
    assert not (tmp_path / 'a').exists()
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    result = run_script('racing_wgan', args + ['--fid_weights', corrupt, '--out_dir', tmp_path / 'b'],
                        cwd=tmp_path, env=empty_home)
    assert_one_line_error(result, 'corrupt', 'delete it')
    assert not (tmp_path / 'b').exists()


@pytest.mark.parametrize('flags, words', [
    (['--fid_samples', '5'], ['--fid_samples', 'at least 10']),
    (['--fid_every', '-1'], ['--fid_every', '0 or more']),
    (['--eval_interval', '-5'], ['--eval_interval', '0 or more']),
])
def test_bad_fid_flags_one_line_error(tmp_path, flags, words):
    result = run_script('racing_wgan', ['--n_iters', 1, '--out_dir', tmp_path / 'r'] + flags, cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert not (tmp_path / 'r').exists()


def test_evaluation_noise_is_fixed_and_differs_by_rank(monkeypatch):
    """Every evaluation draws the same noise; under DDP rank 0 draws what one process draws and
    rank 1 something else, so FID's per-rank shards are different samples, not copies."""
    args = common.base_parser('t').parse_args([])
    ev = common.Evaluator(common.load_data('ring8', './data'), args, torch.device('cpu'))
    before = torch.get_rng_state()
    with ev.fixed_rng():
        one = torch.randn(4)
    with ev.fixed_rng():
        assert torch.equal(torch.randn(4), one)
    assert torch.equal(torch.get_rng_state(), before)          # training RNG untouched
    monkeypatch.setattr(common.dist, 'is_initialized', lambda: True)
    ranks = {}
    for r in (0, 1):
        monkeypatch.setattr(common.dist, 'get_rank', lambda r=r: r)
        with ev.fixed_rng():
            ranks[r] = torch.randn(4)
    assert torch.equal(ranks[0], one) and not torch.equal(ranks[1], one)


def test_reference_images_are_not_flipped():
    data = common.load_data('digits', './data', img_size=8)
    data.flip = True
    plain, _ = data.batch(slice(None), augment=False)
    data.flip = False
    assert torch.equal(plain, data.batch(slice(None))[0])


def test_pmgan_torchrun_fid_with_a_collective_sampler(tmp_path, data_root, fid_torch_home, monkeypatch):
    """pmgan's sampler all-gathers generators across ranks: every rank must call it the same way,
    also when the sample count does not divide by the ranks (13 on 2: 7 and 6)."""
    monkeypatch.setenv('TORCH_HOME', fid_torch_home)
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    out = tmp_path / 'run'
    args = ['--dataset', 'digits', '--n_gen', 3, '--img_size', 16, '--width', 4, '--batch_size', 8,
            '--latent_dim', 8, '--n_iters', 2, '--subset', 16, '--fid_every', 2, '--fid_samples', 13,
            '--sample_interval', 0, '--eval_samples', 100, '--data_root', data_root, '--out_dir', out]
    result = run_torchrun('pmgan', args, tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / 'summary.json') as f:
        assert json.load(f)['fid'] > 0


def test_prdc_adds_the_four_figures_on_inception_features(tmp_path, data_root, fid_torch_home, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', fid_torch_home)
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    out = tmp_path / 'run'
    run_main(racing_wgan, TINY + ['--n_iters', 2, '--fid_every', 2, '--prdc', '--data_root', data_root,
                                  '--out_dir', out], monkeypatch)
    summary = json.loads((out / 'summary.json').read_text())
    assert 'fid' in summary and all(0 <= summary[k] for k in ('precision', 'recall', 'density', 'coverage'))
    assert 'coverage_digits' in summary   # the offline ones on the classifier's features, beside them
    with pytest.raises(common.UserError, match='--prdc .* --fid_every'):
        run_main(racing_wgan, TINY + ['--n_iters', 2, '--prdc', '--out_dir', tmp_path / 'b'], monkeypatch)
