"""g_advantage_dcgan.py: R generator updates per discriminator update, Figure 1's loss statistic, --same_z."""
import csv
import json
import math
import os
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
from conftest import (assert_one_line_error, load_script, run_main, run_script,
                      run_torchrun_dumping_ranks)

gad = load_script('g_advantage_dcgan')
LN2 = math.log(2)


def tiny(data_root, out_dir, *extra):
    """Digits, 64 images at 16x16, nets 4 channels wide: a run of a few iterations takes ~1 s."""
    return ['--dataset', 'digits', '--subset', 64, '--img_size', 16, '--batch_size', 16, '--latent_dim', 8,
            '--ngf', 4, '--ndf', 4, '--eval_samples', 100, '--log_interval', 2, '--sample_interval', 0,
            '--data_root', data_root, '--out_dir', out_dir, *extra]


def load_ckpt(folder):
    return torch.load(os.path.join(folder, 'ckpt.pt'), weights_only=False)


def adam_steps(opt_state):
    """Optimizer steps taken, from an Adam state dict (every parameter has the same count)."""
    steps = {int(s['step']) for s in opt_state['state'].values()}
    assert len(steps) == 1
    return steps.pop()


def read_csv(folder):
    with open(os.path.join(folder, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def assert_same_state(a, b, atol=0.0, buffers=True):
    """State dicts equal (within atol); buffers=False skips batch-norm statistics, which differ
    across DDP ranks (DDP copies rank 0's at each forward; updates in between are local)."""
    assert a.keys() == b.keys()
    keys = [k for k in a if buffers or not ('running_' in k or 'num_batches' in k)]
    assert len(keys) > 4
    for k in keys:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol), k


# ---- losses and schedule, by hand ------------------------------------------------------------

def test_losses_match_hand_computed_values():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    # BCE(l, 1) = log(1 + e^-l), BCE(l, 0) = log(1 + e^l); L_D is the mean of the real and fake terms
    expected_d = 0.5 * ((LN2 + math.log1p(math.exp(-2))) / 2 + (LN2 + math.log1p(math.exp(-1))) / 2)
    assert gad.d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert gad.g_loss(torch.tensor([0.0, 3.0])).item() == pytest.approx((LN2 + math.log1p(math.exp(-3))) / 2,
                                                                        rel=1e-6)
    # at the equilibrium D = 1/2 (logits 0) both losses are ln 2: the paper's ideal log ratio 0
    zeros = torch.zeros(8)
    assert gad.d_loss(zeros, zeros).item() == pytest.approx(LN2) == gad.g_loss(zeros).item()
    # logits far outside float range of sigmoid stay finite (losses from logits)
    assert torch.isfinite(gad.d_loss(torch.tensor([200.0]), torch.tensor([-200.0])))
    assert gad.g_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)


@pytest.mark.parametrize('R,first', [(Fraction(1), [1] * 6), (Fraction(2), [2] * 6), (Fraction(50), [50] * 6),
                                     (Fraction(1, 5), [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]),
                                     (Fraction(3, 2), [2, 1, 2, 1, 2, 1]), (Fraction(1, 3), [1, 0, 0, 1, 0, 0])])
def test_generator_update_schedule_is_exact(R, first):
    counts = [gad.generator_updates(i, R) for i in range(1000)]
    assert counts[:len(first)] == first
    assert all(sum(counts[:n]) == math.ceil(n * R) for n in range(1001))


def test_advantage_flag_parses_numbers_and_fractions():
    assert gad.advantage('4') == 4.0 and gad.advantage('0.2') == 0.2
    assert Fraction(gad.advantage('1/3')).limit_denominator(1000) == Fraction(1, 3)
    assert Fraction(gad.advantage('0.3333')).limit_denominator(1000) == Fraction(1, 3)
    for bad in ('0', '-1', 'x', '1/0', '0.0001', '1001', '1e400'):
        with pytest.raises(Exception):
            gad.advantage(bad)


def test_generator_step_sends_no_gradient_into_the_discriminator():
    torch.manual_seed(0)
    G, D = common.DCGANGenerators(1, 8, 16, 1, ngf=4), common.DCGANDiscriminator(16, 1, ndf=4)
    with gad.frozen(D):
        gad.g_loss(D(G(torch.randn(4, 8))[0])).backward()
    assert all(p.grad is None for p in D.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    assert all(p.requires_grad for p in D.parameters())       # unfrozen afterwards
    gad.d_loss(D(torch.randn(4, 1, 16, 16)), D(G(torch.randn(4, 8))[0].detach())).backward()
    assert all(p.grad is not None for p in D.parameters())


# ---- training runs ---------------------------------------------------------------------------

@pytest.mark.parametrize('R', ['1', '2', '4', '0.2'])
def test_exactly_R_generator_steps_per_discriminator_step(R, data_root, tmp_path, monkeypatch):
    n = 7
    run_main(gad, tiny(data_root, tmp_path / 'run', '--n_iters', n, '--g_advantage', R), monkeypatch)
    ckpt = load_ckpt(tmp_path / 'run')
    assert adam_steps(ckpt['opt_D']) == n
    assert adam_steps(ckpt['opt_G']) == math.ceil(n * Fraction(R))   # 7, 14, 28, 2
    rows = read_csv(tmp_path / 'run')
    assert [int(r['iteration']) for r in rows] == [2, 4, 6, 7]
    for r in rows:  # ratio and log ratio are those of the logged losses, before and after the updates
        d, g = float(r['D']), float(r['G'])
        assert float(r['ratio']) == pytest.approx(g / d, rel=1e-5)
        assert float(r['log_ratio']) == pytest.approx(math.log(g) - math.log(d), abs=1e-5)
        d, g = float(r['D_after']), float(r['G_after'])
        assert float(r['log_ratio_after']) == pytest.approx(math.log(g) - math.log(d), abs=1e-5)
    assert 'fd_digits' in rows[-1] and float(rows[-1]['fd_digits']) > 0
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['log_ratio'] == pytest.approx(float(rows[-1]['log_ratio']))
    assert os.path.exists(tmp_path / 'run' / 'metrics.png')


def replay_one_iteration(state, R, same_z):
    """Iteration 3 of a tiny run written out by hand from the checkpoint after iteration 2: the D
    step, then R G steps (fresh N(0, 1) z each, or the D step's U(-1, 1) z with same_z), then
    Figure 1's statistic (errD, errG after all updates, on the iteration's real batch and z)."""
    G, D = common.DCGANGenerators(1, 8, 16, 1, ngf=4), common.DCGANDiscriminator(16, 1, ndf=4)
    G.load_state_dict(state['generator'])
    D.load_state_dict(state['discriminator'])
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_G.load_state_dict(state['opt_G'])
    opt_D.load_state_dict(state['opt_D'])
    common.set_rng_state(state['rng'][0])
    real, _ = common.Batches(common.load_data('digits', img_size=16, subset=64), 16, seed=0).get(2)

    bce = torch.nn.BCEWithLogitsLoss()
    z = torch.rand(16, 8) * 2 - 1 if same_z else torch.randn(16, 8)
    fake = G(z)[0]
    loss_D = (bce(D(real), torch.ones(16)) + bce(D(fake.detach()), torch.zeros(16))) / 2
    opt_D.zero_grad()
    loss_D.backward()
    opt_D.step()
    for _ in range(R):
        loss_G = bce(D(G(z if same_z else torch.randn(16, 8))[0]), torch.ones(16))
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
    with common.sampling(G), common.sampling(D):
        fake_logits = D(G(z)[0])
        after = ((bce(D(real), torch.ones(16)) + bce(fake_logits, torch.zeros(16))) / 2, bce(fake_logits, torch.ones(16)))
    return G, D, [float(a) for a in after]


@pytest.mark.parametrize('R, same_z', [(1, False), (2, True)])
def test_one_iteration_by_hand_and_figure_1_statistic(R, same_z, data_root, tmp_path, monkeypatch):
    """Two iterations, then one DCGAN iteration by hand, equals three iterations of the script:
    --g_advantage 1 is a plain DCGAN step (fresh z for G); --same_z is DCGAN-tensorflow's schedule
    (one U(-1, 1) z for the D step and both G steps). The logged D_after, G_after, log_ratio_after
    are the losses after all updates on that iteration's real batch and z."""
    flags = ['--g_advantage', R] + (['--same_z'] if same_z else [])
    run_main(gad, tiny(data_root, tmp_path / 'two', '--n_iters', 2, *flags), monkeypatch)
    run_main(gad, tiny(data_root, tmp_path / 'three', '--n_iters', 3, *flags), monkeypatch)
    state, want = load_ckpt(tmp_path / 'two'), load_ckpt(tmp_path / 'three')
    G, D, (d_after, g_after) = replay_one_iteration(state, R, same_z)
    assert_same_state(G.state_dict(), want['generator'], atol=1e-6)
    assert_same_state(D.state_dict(), want['discriminator'], atol=1e-6)
    assert not torch.allclose(G.state_dict()['net.0.weight'], state['generator']['net.0.weight'])
    row = read_csv(tmp_path / 'three')[-1]
    assert row['iteration'] == '3'
    assert float(row['D_after']) == pytest.approx(d_after, rel=1e-5)
    assert float(row['G_after']) == pytest.approx(g_after, rel=1e-5)
    assert float(row['log_ratio_after']) == pytest.approx(math.log(g_after / d_after), abs=1e-5)
    assert float(row['ratio_after']) == pytest.approx(g_after / d_after, rel=1e-5)
    assert float(row['D']) != pytest.approx(d_after, rel=1e-4)     # the before-update statistic differs


def test_same_z_draws_uniform_noise_once_per_iteration(data_root, tmp_path, monkeypatch):
    draws = []
    real_rand, real_randn = torch.rand, torch.randn
    monkeypatch.setattr(torch, 'rand', lambda *a, **k: draws.append('rand') or real_rand(*a, **k))
    monkeypatch.setattr(torch, 'randn', lambda *a, **k: draws.append('randn') or real_randn(*a, **k))
    run_main(gad, tiny(data_root, tmp_path / 'run', '--n_iters', 3, '--g_advantage', 4, '--same_z',
                       '--eval_samples', 10), monkeypatch)
    # fixed_z, then one z per iteration (4 G steps reuse it); 10 metric samples: one batch
    assert draws.count('randn') == 0 and draws.count('rand') == 1 + 3 + 1
    assert adam_steps(load_ckpt(tmp_path / 'run')['opt_G']) == 12


def test_resume_equals_a_straight_run(data_root, tmp_path, monkeypatch):
    extra = ['--g_advantage', '1/3', '--flip', '--ckpt_interval', 0]
    run_main(gad, tiny(data_root, tmp_path / 'straight', '--n_iters', 5, *extra), monkeypatch)
    run_main(gad, tiny(data_root, tmp_path / 'split', '--n_iters', 2, *extra), monkeypatch)
    run_main(gad, tiny(data_root, tmp_path / 'unused', '--n_iters', 5, '--resume', tmp_path / 'split', *extra),
             monkeypatch)
    a, b = load_ckpt(tmp_path / 'straight'), load_ckpt(tmp_path / 'split')
    assert b['iteration'] == 5 and adam_steps(b['opt_G']) == 2 == adam_steps(a['opt_G'])
    for name in ('generator', 'discriminator'):
        assert_same_state(a[name], b[name])                                  # exactly equal
    rows_a, rows_b = read_csv(tmp_path / 'straight'), read_csv(tmp_path / 'split')
    assert [r['iteration'] for r in rows_b] == ['2', '4', '5']             # appended, no duplicates
    for ra, rb in zip(rows_a, rows_b):
        for key in ('D', 'G', 'log_ratio', 'D_after', 'G_after', 'log_ratio_after'):
            assert ra[key] == rb[key], key


def test_amp_bf16_on_cpu_trains_and_differs_from_fp32(data_root, tmp_path, monkeypatch):
    run_main(gad, tiny(data_root, tmp_path / 'amp', '--n_iters', 3, '--amp'), monkeypatch)
    run_main(gad, tiny(data_root, tmp_path / 'fp32', '--n_iters', 3), monkeypatch)
    amp, fp32 = load_ckpt(tmp_path / 'amp'), load_ckpt(tmp_path / 'fp32')
    assert all(v.dtype == torch.float32 for v in amp['generator'].values() if v.is_floating_point())
    assert adam_steps(amp['opt_G']) == 6
    summary = json.loads((tmp_path / 'amp' / 'summary.json').read_text())
    assert all(np.isfinite(summary[k]) for k in ('final_D', 'final_G', 'log_ratio', 'fd_digits'))
    w_amp, w_fp32 = amp['generator']['net.0.weight'], fp32['generator']['net.0.weight']
    assert not torch.equal(w_amp, w_fp32) and torch.allclose(w_amp, w_fp32, atol=1e-2)  # bf16 rounding only


def write_png(path, size, channels):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    shape = (size[1], size[0]) + ((channels,) if channels > 1 else ())   # grey, RGB or RGBA
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def test_folder_of_odd_sized_pngs_trains_with_flips(tmp_path, monkeypatch):
    images = tmp_path / 'mice'
    (images / 'more').mkdir(parents=True)
    for i, (size, channels) in enumerate([((150, 150), 3), ((37, 91), 3), ((64, 20), 1), ((33, 33), 4),
                                          ((200, 120), 3)]):
        write_png(images / ('more' if i % 2 else '') / f'm{i}.png', size, channels)
    seen = []
    get = common.Batches.get
    monkeypatch.setattr(common.Batches, 'get', lambda self, it: seen.append(self.data.flip) or get(self, it))
    run_main(gad, ['--dataset', 'folder', '--data_root', images, '--img_size', 64, '--batch_size', 2, '--flip',
                   '--latent_dim', 8, '--ngf', 4, '--ndf', 4, '--n_iters', 4, '--log_interval', 2,
                   '--out_dir', tmp_path / 'run'], monkeypatch)
    ckpt = load_ckpt(tmp_path / 'run')
    last_conv = [v for k, v in ckpt['generator'].items() if v.dim() == 4][-1]
    assert last_conv.shape[1] == 3                                            # RGB out of 64x64 nets
    assert ckpt['discriminator']['body.0.weight'].shape[1] == 3
    assert adam_steps(ckpt['opt_G']) == 8 and seen == [True] * 4
    with Image.open(tmp_path / 'run' / 'samples' / 'iter_000004.png') as grid:
        assert grid.size == (8 * 66 + 2, 8 * 66 + 2)                          # 8 x 8 grid of 64 px
    assert [r['iteration'] for r in read_csv(tmp_path / 'run')] == ['2', '4']


def test_torchrun_two_ranks_end_identical(data_root, tmp_path):
    args = tiny(data_root, tmp_path / 'ddp', '--n_iters', 4, '--g_advantage', 1.5, '--batch_size', 8)
    result, ranks = run_torchrun_dumping_ranks('g_advantage_dcgan', args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(ranks) == 2
    for name in ('generator', 'discriminator'):
        assert_same_state(ranks[0][name], ranks[1][name], buffers=False)
    ckpt = load_ckpt(tmp_path / 'ddp')
    assert adam_steps(ckpt['opt_G']) == 6 and adam_steps(ckpt['opt_D']) == 4   # pattern 2, 1, 2, 1
    assert len(ckpt['rng']) == 2 and not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])


@pytest.mark.parametrize('flag, value', [('--lr', '-1'), ('--b1', '1'), ('--ngf', '0'), ('--g_advantage', 'nan')])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        gad.parser.parse_args([flag, value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]


def test_bad_flag_in_a_real_process_gives_one_line(tmp_path):
    result = run_script('g_advantage_dcgan', ['--n_iters', 1, '--g_advantage', '0'], cwd=tmp_path)
    assert_one_line_error(result, '--g_advantage', 'from 1/1000')


@pytest.mark.parametrize('flags,words', [
    (['--g_advantage', '1/0'], ['--g_advantage', 'not a number']),
    (['--img_size', '24'], ['--img_size 24', 'power of two']),
    (['--img_size', '0'], ['--img_size', 'at least 1']),
    (['--g_advantage', '1e400'], ['--g_advantage', 'to 1000']),
    (['--dataset', 'stacked-digits', '--channels', '1'], ['stacked-digits', '3 channels']),
    (['--dataset', 'folder', '--data_root', 'empty'], ['no images']),
    (['--dataset', 'ring8'], ['2-D', '--dataset digits']),
    (['--resume', 'nowhere'], ['no checkpoint']),
])
def test_bad_input_gives_one_line(flags, words, tmp_path, monkeypatch, capsys):
    """In-process through common.run_main, the path a real run takes (one subprocess above)."""
    (tmp_path / 'empty').mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr('sys.argv', ['g_advantage_dcgan.py', '--n_iters', '1', *flags])
    with pytest.raises(SystemExit) as exit_:
        common.run_main(gad.main)
    result = SimpleNamespace(returncode=exit_.value.code, stderr=capsys.readouterr().err)
    assert_one_line_error(result, *words)
