"""racing_wgan.py: the racing term, --n_gen 1 == classic WGAN, variants, resume, DDP, errors."""
import csv
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

import common
from conftest import (assert_one_line_error, load_script, run_in_process, run_main, run_script,
                      run_torchrun_dumping_ranks)

racing_wgan = load_script('racing_wgan')
TINY = ['--img_size', '8', '--batch_size', '16', '--latent_dim', '8', '--log_interval', '1',
        '--sample_interval', '0', '--ckpt_interval', '0']


def test_racing_term_lag_and_paper_by_hand():
    # K = 3 generators, B = 2 paired samples: r[k, b] = D(G_k(z_b)).
    r = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])
    # lag: sum over rivals j of mean_b max(0, r_j - r_i)
    #  i=0: j=1 -> max(0,2), max(0,-4) = 2, 0 -> 1.0; j=2 -> 1, 0 -> 0.5;  total 1.5
    #  i=1: j=0 -> 0, 4 -> 2.0;  j=2 -> 0, 2 -> 1.0;                      total 3.0
    #  i=2: j=0 -> 0, 2 -> 1.0;  j=1 -> 1, 0 -> 0.5;                      total 1.5
    assert torch.allclose(racing_wgan.racing_term(r, 'lag'), torch.tensor([1.5, 3.0, 1.5]))
    # paper: mean_b max(0, r_i - r_j)
    #  i=0: j=1 -> 0, 4 -> 2.0; j=2 -> 0, 2 -> 1.0;   total 3.0
    #  i=1: j=0 -> 2, 0 -> 1.0; j=2 -> 1, 0 -> 0.5;   total 1.5
    #  i=2: j=0 -> 1, 0 -> 0.5; j=1 -> 0, 2 -> 1.0;   total 1.5
    assert torch.allclose(racing_wgan.racing_term(r, 'paper'), torch.tensor([3.0, 1.5, 1.5]))
    assert torch.equal(racing_wgan.racing_term(r, 'off'), torch.zeros(3))
    assert torch.equal(racing_wgan.racing_term(r[:1], 'lag'), torch.zeros(1))  # K = 1: plain WGAN


@pytest.mark.parametrize('mode', ['lag', 'paper'])
def test_racing_term_sends_no_gradient_into_rivals(mode):
    torch.manual_seed(0)
    gens = common.MLPGenerators(3, 8, (1, 4, 4), hidden=(16, 16))
    critic = common.MLPDiscriminator((1, 4, 4), hidden=(16,))
    r = critic(gens(torch.randn(32, 8)).flatten(0, 1)).view(3, 32)
    racing_wgan.racing_term(r, mode)[0].backward()          # generator 0's racing term alone
    stacked = [p for p in gens.parameters() if p.dim() == 3]
    assert all(p.grad[1:].abs().sum() == 0 for p in stacked)   # nothing reaches generators 1, 2
    assert sum(p.grad[0].abs().sum() for p in stacked) > 0     # generator 0 does get pushed


def classic_wgan_nets(gens, critic):
    """The classic PyTorch-GAN WGAN nets (nn.Linear), holding the ensemble's member-0 weights."""
    g_layers, d_layers = [], []
    for m in gens.net:
        if isinstance(m, common.EnsembleLinear):
            lin = nn.Linear(m.weight.shape[1], m.weight.shape[2])
            lin.weight.data.copy_(m.weight[0].t()); lin.bias.data.copy_(m.bias[0, 0])
            g_layers.append(lin)
        elif isinstance(m, common.EnsembleBatchNorm):   # K = 1: the same layout as BatchNorm1d
            bn = nn.BatchNorm1d(m.norm.num_features)
            bn.load_state_dict(m.norm.state_dict())
            g_layers.append(bn)
        else:
            g_layers.append(m)
    for m in list(critic.body) + [critic.head]:
        if isinstance(m, common.EnsembleLinear):
            lin = nn.Linear(m.weight.shape[1], m.weight.shape[2])
            lin.weight.data.copy_(m.weight[0].t()); lin.bias.data.copy_(m.bias[0, 0])
            d_layers.append(lin)
        else:
            d_layers.append(m)
    return nn.Sequential(*g_layers), nn.Sequential(nn.Flatten(), *d_layers)


def test_one_gen_is_exactly_a_classic_wgan_step(tmp_path, monkeypatch, data_root):
    """--n_gen 1: the script's first iteration (critic step + generator step) equals one step
    of the classic WGAN written out here with nn.Linear nets and the same weights and noise."""
    args = ['--n_gen', '1', '--n_iters', '1', '--seed', '5', '--out_dir', tmp_path / 'run',
            '--data_root', data_root] + TINY
    run_main(racing_wgan, args, monkeypatch)
    after = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)

    # Replay the script's random draws: seed, nets, fixed noise, then this iteration's z.
    ns = racing_wgan.parser.parse_args([str(a) for a in args])
    data = common.load_data('digits', img_size=8)
    torch.manual_seed(5)
    gens, critic = racing_wgan.build_nets(ns, data)
    torch.randn(10, 8)                                       # the fixed sample-grid noise
    z = torch.randn(16, 8)
    real, _ = common.Batches(data, 16, seed=5).get(0)
    G, D = classic_wgan_nets(gens, critic)
    opt_G, opt_D = torch.optim.RMSprop(G.parameters(), lr=5e-5), torch.optim.RMSprop(D.parameters(), lr=5e-5)

    loss_D = -D(real).mean() + D(G(z).detach().view(16, 1, 8, 8)).mean()   # classic wgan.py
    opt_D.zero_grad(); loss_D.backward(); opt_D.step()
    for p in D.parameters():
        p.data.clamp_(-0.01, 0.01)
    loss_G = -D(G(z).view(16, 1, 8, 8)).mean()
    opt_G.zero_grad(); loss_G.backward(); opt_G.step()

    want_G, want_D = classic_wgan_nets(gens, critic)  # shapes only; fill from the checkpoint
    gens.load_state_dict(after['generators']); critic.load_state_dict(after['critic'])
    got_G, got_D = classic_wgan_nets(gens, critic)
    for mine, theirs in [(got_G, G), (got_D, D)]:
        for (name, a), b in zip(mine.named_parameters(), theirs.parameters()):
            assert torch.allclose(a, b, atol=1e-6), name
    for a, b in zip(got_G.buffers(), G.buffers()):   # batch-norm statistics: two train-mode passes
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.parametrize('variant', [[], ['--gp', '10'], ['--amp'], ['--race_mode', 'paper', '--n_gen', '3']])
def test_variants_step_and_clip(tmp_path, monkeypatch, data_root, variant):
    args = ['--n_gen', '2', '--n_iters', '6', '--n_critic', '2', '--out_dir', tmp_path / 'run',
            '--data_root', data_root] + TINY + variant
    run_main(racing_wgan, args, monkeypatch)
    state = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)
    if '--gp' not in variant:
        assert all(v.abs().max() <= 0.01 + 1e-7 for v in state['critic'].values())
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['iterations'] == 6 and 'fd_digits' in summary
    assert len(summary['final_G']) == (3 if '3' in variant else 2)
    rows = (tmp_path / 'run' / 'metrics.csv').read_text().splitlines()
    assert rows[0].startswith('iteration,epoch,wall_seconds,cpu_seconds,D,G_0,G_1') and len(rows) == 7


def test_resume_continues_exactly(tmp_path, monkeypatch, data_root):
    common_args = ['--n_gen', '2', '--n_critic', '5', '--data_root', data_root] + TINY
    run_main(racing_wgan, ['--n_iters', '12', '--out_dir', tmp_path / 'straight'] + common_args, monkeypatch)
    run_main(racing_wgan, ['--n_iters', '6', '--out_dir', tmp_path / 'split'] + common_args, monkeypatch)
    run_main(racing_wgan, ['--n_iters', '12', '--resume', tmp_path / 'split'] + common_args, monkeypatch)
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=False)
    b = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=False)
    assert a['iteration'] == b['iteration'] == 12
    for net in ('generators', 'critic'):
        for key, value in a[net].items():
            assert torch.equal(value, b[net][key]), (net, key)
    for opt in ('opt_G', 'opt_D'):
        for x, y in zip(a[opt]['state'].values(), b[opt]['state'].values()):
            assert torch.equal(x['square_avg'], y['square_avg'])
    rows = (tmp_path / 'split' / 'metrics.csv').read_text().splitlines()[1:]
    assert [int(r.split(',')[0]) for r in rows] == list(range(1, 13))   # appended, no duplicates
    cpu = [float(r['cpu_seconds']) for r in read_rows(tmp_path / 'split')]   # the clock goes on from the checkpoint
    assert all(later > earlier for earlier, later in zip(cpu, cpu[1:])) and cpu[6] - cpu[5] < cpu[5]
    straight, split = read_rows(tmp_path / 'straight'), read_rows(tmp_path / 'split')
    for s, r in zip(straight, split):
        assert s['D'] == r['D']
        if 7 <= int(r['iteration']) <= 10:   # resumed at 6, between two generator steps (0, 5, 10):
            assert r['G_0'] == '' and r['race_0'] == ''   # no generator loss yet, not a made-up 0
        else:
            assert (s['G_0'], s['G_1'], s['race_1']) == (r['G_0'], r['G_1'], r['race_1'])
    summary = (tmp_path / 'split' / 'summary.json').read_text()
    result = run_script('racing_wgan', ['--n_iters', '12', '--resume', tmp_path / 'split'] + common_args,
                        cwd=tmp_path)   # already at 12: refused, nothing rewritten
    assert_one_line_error(result, 'already has 12 iterations', 'larger --n_iters')
    assert (tmp_path / 'split' / 'summary.json').read_text() == summary


def read_rows(folder):
    with open(folder / 'metrics.csv') as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('flags, optimizer, lr, betas', [
    ([], 'RMSprop', 5e-5, None),                      # the classic WGAN
    (['--gp', '10'], 'Adam', 1e-4, (0.0, 0.9)),       # WGAN-GP, Algorithm 1
    (['--gp', '10', '--lr', '3e-4', '--b2', '0.99'], 'Adam', 3e-4, (0.0, 0.99)),
])
def test_optimizer_defaults_follow_the_lipschitz_method(tmp_path, monkeypatch, data_root, flags, optimizer, lr,
                                                        betas):
    run_main(racing_wgan, ['--n_iters', '1', '--data_root', data_root, '--out_dir', tmp_path / 'r'] + TINY + flags,
             monkeypatch)
    group = torch.load(tmp_path / 'r' / 'ckpt.pt', weights_only=False)['opt_D']['param_groups'][0]
    assert group['lr'] == lr and ('betas' in group) == (optimizer == 'Adam')
    if betas:
        assert group['betas'] == betas


def test_two_dimensional_run_reports_mode_coverage(tmp_path, monkeypatch):
    run_main(racing_wgan, ['--dataset', 'ring8', '--n_gen', '2', '--n_iters', '4', '--gp', '1',
                           '--out_dir', tmp_path / 'run'] + TINY, monkeypatch)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert set(summary) >= {'modes_covered', 'hq_fraction', 'kl_uniform'}
    assert os.path.exists(tmp_path / 'run' / 'samples' / 'iter_000004.png')
    assert os.path.exists(tmp_path / 'run' / 'metrics.png')


def test_torchrun_two_processes_keep_identical_critics(tmp_path):
    fresh_root = tmp_path / 'fresh_root'   # no cached digit classifier: rank 0 trains it, rank 1 loads it
    result, ranks = run_torchrun_dumping_ranks(
        'racing_wgan', ['--n_gen', '2', '--n_iters', '6', '--n_critic', '2', '--gp', '10',
                        '--out_dir', tmp_path / 'run', '--data_root', fresh_root] + TINY, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ranks) == 2
    for net in ('critic', 'generators'):  # parameters; batch-norm running stats are per rank
        for key, value in ranks[0][net].items():
            if 'running_' not in key and 'num_batches' not in key:
                assert torch.equal(value, ranks[1][net][key]), (net, key)
    assert result.stdout.count('[Epoch') == 6   # rank 0 alone prints
    assert result.stdout.count('trained the digits digit classifier') == 1


@pytest.mark.parametrize('flag, value', [('--lr', '-1'), ('--race_weight', '-1'), ('--clip_value', '0'), ('--gp', '-1'), ('--n_critic', '0')])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        racing_wgan.parser.parse_args([flag, value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]


def test_bad_input_gives_one_line(tmp_path, monkeypatch, capsys):
    assert_one_line_error(run_script('racing_wgan', ['--n_gen', '0'], tmp_path), '--n_gen')
    in_process = lambda args: run_in_process(racing_wgan, args, tmp_path, monkeypatch, capsys)
    assert_one_line_error(in_process(['--dataset', 'folder', '--data_root', tmp_path / 'nope']), 'nope')
    (tmp_path / 'empty_run').mkdir()
    assert_one_line_error(in_process(['--resume', tmp_path / 'empty_run']), 'no checkpoint')
    assert_one_line_error(in_process(['--dataset', 'mnist', '--data_root', tmp_path]), 'train-images-idx3-ubyte')


@pytest.mark.skipif(shutil.which('cc') is None and shutil.which('gcc') is None,
                    reason='torch.compile on the CPU needs a C compiler')
def test_compile_with_gradient_penalty(tmp_path):
    """The penalty's double backward goes through the plain critic: torch.compile has none."""
    result = run_script('racing_wgan', ['--dataset', 'ring8', '--n_gen', '2', '--gp', '10', '--compile',
                                        '--n_iters', '3', '--eval_samples', '100', '--out_dir', tmp_path / 'r']
                        + TINY, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['iterations'] == 3
