"""auction_gan.py: losses, bids, scores, the auxiliary step, runs, resume, DDP, AMP, errors."""
import contextlib
import csv
import json
import math
import os

import pytest
import torch

import common
from conftest import (assert_one_line_error, load_script, run_in_process, run_main, run_script,
                      run_torchrun_dumping_ranks)

auction_gan = load_script('auction_gan')
TINY = ['--n_gans', '3', '--width', '16', '--batch_size', '16', '--lot_size', '8', '--latent_dim', '4',
        '--log_interval', '1', '--sample_interval', '0', '--ckpt_interval', '0', '--eval_samples', '200']


class StepOnly:
    """What auxiliary_step needs of common.Run: autocast and the plain backward + step."""

    @staticmethod
    def autocast():
        return contextlib.nullcontext()

    @staticmethod
    def step(loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def read_rows(folder):
    with open(os.path.join(folder, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def test_losses_by_hand():
    real, fake = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, -1.0]])
    sp = lambda x: math.log1p(math.exp(x))  # softplus: BCE(l, 1) = sp(-l), BCE(l, 0) = sp(l)
    want_d = (sp(0) + sp(-2)) / 2 + (sp(0) + sp(-1)) / 2
    assert auction_gan.d_loss(real, fake, 'gan').item() == pytest.approx(want_d, abs=1e-6)
    assert auction_gan.g_loss(fake, 'gan').item() == pytest.approx((sp(0) + sp(1)) / 2, abs=1e-6)
    assert auction_gan.d_loss(real, fake, 'wgan').item() == pytest.approx(-0.5 - 1.0)
    assert auction_gan.g_loss(fake, 'wgan').item() == pytest.approx(0.5)


def test_scores_by_hand_and_the_winner():
    X = torch.tensor([[0.5, 0.8, 0.6],      # X[i, j]: D_j's bid on G_i's lot
                      [0.2, 0.4, 0.3],
                      [0.9, 0.7, 0.1]])
    # S(0) = (0.8 + 0.6)/2 - (0.2 + 0.9)/2 = 0.15;  S(1) = (0.2 + 0.3)/2 - (0.8 + 0.7)/2 = -0.5
    # S(2) = (0.9 + 0.7)/2 - (0.6 + 0.3)/2 = 0.35
    S = auction_gan.auction_scores(X)
    assert torch.allclose(S, torch.tensor([0.15, -0.5, 0.35]))
    assert int(S.argmax()) == 2
    X2 = X.clone()
    X2.diagonal().copy_(torch.tensor([9.0, -3.0, 5.0]))   # self-bids do not count
    assert torch.allclose(auction_gan.auction_scores(X2), S)


def single_nets(stacked, template):
    """N separate n_nets=1 discriminators with the stacked members' weights (row i of view(N, -1))."""
    n, nets = stacked.n_nets, []
    for i in range(n):
        net = template()
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        net.load_state_dict({k: v.view(n, -1)[i].view(shapes[k]) for k, v in stacked.state_dict().items()})
        nets.append(net)
    return nets


@pytest.mark.parametrize('loss', ['gan', 'wgan'])
@pytest.mark.parametrize('arch', ['mlp', 'dcgan'])
def test_batched_bids_equal_a_double_loop(arch, loss):
    torch.manual_seed(0)
    n, L = 4, 5
    if arch == 'mlp':
        stacked = common.MLPDiscriminator((2,), hidden=(16, 16), n_nets=n)
        template, lots = (lambda: common.MLPDiscriminator((2,), hidden=(16, 16))), torch.randn(n, L, 2)
    else:
        stacked = common.DCGANDiscriminator(16, 1, ndf=4, n_nets=n, batchnorm=False)
        template = lambda: common.DCGANDiscriminator(16, 1, ndf=4, batchnorm=False)
        lots = torch.randn(n, L, 1, 16, 16)
    with torch.no_grad():
        X, items, scale = auction_gan.bid_matrix(stacked, lots, loss)
        nets = single_nets(stacked, template)
        want = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                out = nets[j](lots[i])                              # D_j's values on lot I^i
                want[i, j] = (torch.sigmoid(out) if loss == 'gan' else out).mean()
    assert items.shape == (n, n, L) and scale is None
    assert torch.allclose(X, want, atol=1e-6)
    if loss == 'wgan':   # critic values, not probabilities: no squashing into (0, 1)
        raw = torch.stack([torch.stack([nets[j](lots[i]).mean() for j in range(n)]) for i in range(n)])
        assert torch.allclose(X, raw, atol=1e-6)


def aux_setup(n=4, lr=1e-3):
    torch.manual_seed(1)
    G = common.MLPGenerators(n, 4, (2,), hidden=(16, 16), batchnorm=False, tanh=False)
    D = common.MLPDiscriminator((2,), hidden=(16, 16), n_nets=n)
    opt = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    real = torch.randn(8, 2)
    with torch.no_grad():
        lots = G(torch.randn(n, 8, 4))
        _, items, _ = auction_gan.bid_matrix(D, lots, 'gan')
    return G, D, opt, real, lots, items


def aux_losses(D, real, lots, items, b):
    """L_aux for every pair written out by hand: MSE to D_b's probabilities on X and on each lot."""
    with torch.no_grad():
        p_real, p_fake = torch.sigmoid(D(real)), torch.sigmoid(D(lots))     # (N, m), D_i(G_i(Z))
        return ((p_real - p_real[b]) ** 2).mean(1) + ((p_fake - items[b]) ** 2).mean(1)


def test_auxiliary_step_leaves_winner_and_generators_untouched(monkeypatch):
    G, D, opt, real, lots, items = aux_setup()
    auction_gan.auxiliary_step(D, D, opt, real, lots, items, torch.tensor([0]), 'gan', StepOnly())
    assert all(s['exp_avg'].view(4, -1)[2].abs().sum() > 0 for s in opt.state.values())   # D_2 has momentum
    b = torch.tensor([2])
    with torch.no_grad():
        _, items, _ = auction_gan.bid_matrix(D, lots, 'gan')
    D_before = {k: v.clone() for k, v in D.state_dict().items()}
    opt_before = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    G_before = {k: v.clone() for k, v in G.state_dict().items()}

    want = aux_losses(D, real, lots, items, 2)
    want[2] = 0
    got = auction_gan.auxiliary_step(D, D, opt, real, lots, items, b, 'gan', StepOnly())
    assert torch.allclose(got, want, atol=1e-6) and got[2] == 0

    for k, v in D.state_dict().items():
        before = D_before[k].view(4, -1)
        assert torch.equal(v.view(4, -1)[2], before[2]), k                  # D_b: exactly the same
        assert not torch.equal(v.view(4, -1)[[0, 1, 3]], before[[0, 1, 3]]), k
    for state, before in zip(opt.state.values(), opt_before):
        for name in ('exp_avg', 'exp_avg_sq'):                              # not even Adam's moments
            assert torch.equal(state[name].view(4, -1)[2], before[name].view(4, -1)[2])
    for k, v in G.state_dict().items():
        assert torch.equal(v, G_before[k]), k                               # no generator moves

    # The test can fail: a masked loss alone still moves D_b through Adam's first moment.
    monkeypatch.setattr(auction_gan, 'untouched', lambda tensors, b: contextlib.nullcontext())
    auction_gan.auxiliary_step(D, D, opt, real, lots, items, b, 'gan', StepOnly())
    assert not torch.equal(D.state_dict()['head.weight'][2], D_before['head.weight'][2])


def test_auxiliary_step_moves_the_others_towards_the_winner():
    G, D, opt, real, lots, items = aux_setup(lr=1e-3)
    b = torch.tensor([1])
    before = aux_losses(D, real, lots, items, 1)
    grads = {}
    for _ in range(5):
        auction_gan.auxiliary_step(D, D, opt, real, lots, items, b, 'gan', StepOnly())
        grads = {n: p.grad.view(4, -1)[1].abs().sum() for n, p in D.named_parameters()}
    after = aux_losses(D, real, lots, items, 1)   # targets fixed: D_b did not change
    assert all(g == 0 for g in grads.values())                  # no gradient reaches D_b
    assert (after[[0, 2, 3]] < 0.9 * before[[0, 2, 3]]).all(), (before, after)
    assert after[1] == 0


@pytest.mark.parametrize('auction_every, n_iters, want', [(1, 10, [1, 6]), (2, 20, [6, 16])])
def test_one_auction_per_iteration_of_algorithm_1_with_n_critic(tmp_path, monkeypatch, auction_every, n_iters,
                                                                 want):
    """With --n_critic 5 an iteration of Algorithm 1 is 5 critic steps and one generator step: the
    auction and the auxiliary step run once per such iteration, after its generator step, not after
    every critic step (10 critic steps: 2 auctions, not 10)."""
    aux_calls = []
    real_aux = auction_gan.auxiliary_step
    monkeypatch.setattr(auction_gan, 'auxiliary_step', lambda *a, **k: aux_calls.append(1) or real_aux(*a, **k))
    g_steps = []
    real_g_loss = auction_gan.g_loss
    monkeypatch.setattr(auction_gan, 'g_loss', lambda *a: g_steps.append(len(aux_calls)) or real_g_loss(*a))
    out = tmp_path / 'run'
    run_main(auction_gan, ['--loss', 'wgan', '--n_critic', '5', '--auction_every', auction_every,
                           '--n_iters', n_iters, '--out_dir', out] + TINY, monkeypatch)
    rows = list(csv.DictReader((out / 'auctions.csv').read_text().splitlines()))
    assert [int(r['iteration']) for r in rows] == want           # the generator-step iterations
    assert len(aux_calls) == len(want)
    assert g_steps == [i // auction_every for i in range(n_iters // 5)]   # each auction after its G step
    assert sum(float(v) for k, v in read_rows(out)[-1].items() if k.startswith('wins_')) == len(want)


def offset_critic(critics, j, c):
    """Add the constant c to critic j's outputs (the bias of its last layer)."""
    with torch.no_grad():
        critics.head.bias.view(critics.n_nets, -1)[j] += c


def test_standard_bid_norm_ignores_a_critic_offset():
    """X^{ij} = q_i + c_j gives S(i) = q_i - mean q_{-i} + mean c_{-i} - c_i: with raw WGAN values a
    critic's offset c_j alone moves the scores (a low offset wins). Standardised by each critic's
    mean and std on a shared real batch, the offset changes neither S nor the winner, nor the
    auxiliary losses; the bids are still one batched call over lots and real batch."""
    torch.manual_seed(0)
    n, L = 4, 16
    D = common.MLPDiscriminator((2,), hidden=(16, 16), n_nets=n)
    lots, real = torch.randn(n, L, 2), torch.randn(L, 2) + 1.0
    calls = []
    D.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape))

    def scores(real_batch):
        with torch.no_grad():
            X, items, scale = auction_gan.bid_matrix(D, lots, 'wgan', real_batch)
        return auction_gan.auction_scores(X), items, scale

    S_raw, _, _ = scores(None)
    S_std, items, scale = scores(real)
    assert calls == [(n * L, 2), (n * L + L, 2)]                     # one call each, the real batch in it
    assert torch.allclose(scale[0], D(real).mean(1).detach(), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(items, (D(lots.flatten(0, 1)).view(n, n, L) - scale[0].view(n, 1, 1))
                              / scale[1].view(n, 1, 1), atol=1e-5)
    loser = int(S_raw.argmin())
    opt = torch.optim.SGD(D.parameters(), lr=0.0)
    aux_before = auction_gan.auxiliary_step(D, D, opt, real, lots, items, S_std.argmax().view(1), 'wgan',
                                            StepOnly(), scale)

    offset_critic(D, loser, -100.0)                                 # the worst pair's critic: far lower
    S_raw2, _, _ = scores(None)
    S_std2, items2, scale2 = scores(real)
    assert int(S_raw2.argmax()) == loser and not torch.allclose(S_raw2, S_raw, atol=1)    # raw: it wins
    assert torch.allclose(S_std2, S_std, atol=1e-4) and int(S_std2.argmax()) == int(S_std.argmax())
    assert torch.allclose(scale2[0][loser], scale[0][loser] - 100.0, atol=1e-4)
    aux_after = auction_gan.auxiliary_step(D, D, opt, real, lots, items2, S_std2.argmax().view(1), 'wgan',
                                           StepOnly(), scale2)
    assert torch.allclose(aux_after, aux_before, atol=1e-4)


def test_standard_bid_norm_run(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    run_main(auction_gan, ['--loss', 'wgan', '--gp', '1', '--n_critic', '1', '--bid_norm', 'standard',
                           '--n_iters', '3', '--out_dir', out] + TINY, monkeypatch)
    rows = read_rows(out)
    assert all(math.isfinite(float(r['aux_0'])) for r in rows)
    assert sum(float(rows[-1][f'wins_{i}']) for i in range(3)) == 3


def test_ring8_run_logs_auction_and_coverage(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    run_main(auction_gan, ['--n_iters', '6', '--auction_every', '2', '--out_dir', out] + TINY, monkeypatch)
    rows = read_rows(out)
    assert [int(r['iteration']) for r in rows] == list(range(1, 7))
    for r in rows:   # the logged winner is the argmax of the logged scores
        S = [float(r[f'S_{i}']) for i in range(3)]
        if int(r['iteration']) >= 2:
            assert int(float(r['winner'])) == S.index(max(S))
    assert sum(float(rows[-1][f'wins_{i}']) for i in range(3)) == 3    # auctions after iterations 2, 4, 6
    assert {'bid_self', 'bid_other', 'aux_0'} <= set(rows[0])
    summary = json.loads((out / 'summary.json').read_text())
    assert {'modes_covered', 'hq_fraction', 'kl_uniform'} <= set(summary)       # the union
    pairs = [summary[f'modes_covered_{i}'] for i in range(3)]                   # each pair's generator
    assert all(f'hq_fraction_{i}' in summary for i in range(3)) and 'modes_covered_3' not in summary
    assert summary['modes_covered'] >= max(pairs) and 0 <= summary['overlap_mean'] <= summary['overlap_max'] <= 1
    assert (out / 'samples' / 'iter_000006.png').exists() and (out / 'ckpt.pt').exists()


def test_no_auction_is_the_same_run_without_the_auction(tmp_path, monkeypatch):
    args = ['--n_iters', '3'] + TINY
    run_main(auction_gan, args + ['--no_auction', '--out_dir', tmp_path / 'none'], monkeypatch)
    run_main(auction_gan, args + ['--auction_every', '100', '--out_dir', tmp_path / 'never'], monkeypatch)
    run_main(auction_gan, args + ['--out_dir', tmp_path / 'auction'], monkeypatch)
    none, never, auction = (torch.load(tmp_path / f / 'ckpt.pt', weights_only=False)
                            for f in ('none', 'never', 'auction'))
    for k, v in none['discriminators'].items():
        assert torch.equal(v, never['discriminators'][k])
    assert any(not torch.equal(v, auction['discriminators'][k]) for k, v in none['discriminators'].items())
    assert 'S_0' in read_rows(tmp_path / 'none')[0]     # the baseline still logs what the auction would say
    assert float(read_rows(tmp_path / 'none')[-1]['wins_0']) == 0


def test_resume_continues_exactly(tmp_path, monkeypatch):
    args = ['--loss', 'wgan', '--n_critic', '2', '--auction_every', '2'] + TINY
    run_main(auction_gan, ['--n_iters', '8', '--out_dir', tmp_path / 'straight'] + args, monkeypatch)
    run_main(auction_gan, ['--n_iters', '4', '--out_dir', tmp_path / 'split'] + args, monkeypatch)
    with open(tmp_path / 'split' / 'auctions.csv', 'a') as f:   # as if killed after logging past the checkpoint
        f.write('6,0,9.9,9.9,9.9\n')
    run_main(auction_gan, ['--n_iters', '8', '--resume', tmp_path / 'split'] + args, monkeypatch)
    a, b = (torch.load(tmp_path / f / 'ckpt.pt', weights_only=False) for f in ('straight', 'split'))
    assert a['iteration'] == b['iteration'] == 8
    for part in ('generators', 'discriminators', 'wins'):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    for opt in ('opt_G', 'opt_D'):
        for x, y in zip(a[opt]['state'].values(), b[opt]['state'].values()):
            assert torch.equal(x['square_avg'], y['square_avg'])
    assert a['wins']['count'].sum() == 2        # 4 generator steps (n_critic 2), an auction every 2nd
    assert [int(r['iteration']) for r in read_rows(tmp_path / 'split')] == list(range(1, 9))
    # every auction's S(i) and winner, one row per auction, the same after the resume
    straight, split = ((tmp_path / f / 'auctions.csv').read_text() for f in ('straight', 'split'))
    assert straight == split
    rows = list(csv.DictReader(straight.splitlines()))
    assert [int(r['iteration']) for r in rows] == [3, 7]   # after the generator steps of iterations 2, 4
    assert set(rows[0]) == {'iteration', 'winner', 'S_0', 'S_1', 'S_2'}   # N = 3 pairs
    assert [int(r['winner']) for r in rows] == [max(range(3), key=lambda i: float(r[f'S_{i}'])) for r in rows]


def test_amp_runs_in_bf16_on_cpu(tmp_path, monkeypatch):
    args = ['--n_iters', '4', '--lr', '1e-2'] + TINY
    run_main(auction_gan, args + ['--amp', '--out_dir', tmp_path / 'amp'], monkeypatch)
    run_main(auction_gan, args + ['--out_dir', tmp_path / 'fp32'], monkeypatch)
    amp, fp32 = (torch.load(tmp_path / f / 'ckpt.pt', weights_only=False) for f in ('amp', 'fp32'))
    assert all(v.dtype == torch.float32 for v in amp['discriminators'].values())
    assert all(torch.isfinite(v).all() for v in amp['generators'].values())
    diff = max(float((v - fp32['generators'][k]).abs().max()) for k, v in amp['generators'].items())
    assert 0 < diff < 0.1      # autocast was on (bf16 rounding), and it still trained the same nets
    summary = json.loads((tmp_path / 'amp' / 'summary.json').read_text())
    assert all(math.isfinite(x) for x in summary['final_D'] + summary['final_aux'])


def test_digits_pairs_are_dcgans(tmp_path, monkeypatch, data_root):
    out = tmp_path / 'run'
    run_main(auction_gan, ['--dataset', 'digits', '--img_size', '16', '--n_iters', '2', '--width', '4',
                           '--data_root', data_root, '--out_dir', out] + TINY, monkeypatch)
    state = torch.load(out / 'ckpt.pt', weights_only=False)
    assert any(v.dim() == 4 for v in state['discriminators'].values())           # grouped convs
    assert not any('running_mean' in k for k in state['discriminators'])         # no BN in D
    summary = json.loads((out / 'summary.json').read_text())
    assert 'fd_digits' in summary and all(f'fd_digits_{i}' in summary for i in range(3))
    from PIL import Image
    with Image.open(out / 'samples' / 'iter_000002.png') as im:   # one row of 10 per pair
        assert im.size[1] < im.size[0] and im.size[1] > 2 * 16


def test_torchrun_two_processes_agree(tmp_path):
    result, ranks = run_torchrun_dumping_ranks(
        'auction_gan', ['--n_iters', '4', '--loss', 'wgan', '--gp', '1', '--n_critic', '1',
                        '--out_dir', tmp_path / 'run'] + TINY, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ranks) == 2
    for part in ('generators', 'discriminators', 'wins'):
        for k, v in ranks[0][part].items():
            assert torch.equal(v, ranks[1][part][k]), (part, k)
    assert ranks[0]['wins']['count'].sum() == 4
    assert result.stdout.count('[Epoch') == 4


def test_bad_input_gives_one_line(tmp_path, monkeypatch, capsys):
    assert_one_line_error(run_script('auction_gan', ['--n_gans', '1', '--no_auction'], tmp_path), '--n_gans 1')
    in_process = lambda args: run_in_process(auction_gan, args, tmp_path, monkeypatch, capsys)
    assert_one_line_error(in_process(['--gp', '10']), '--gp', '--loss wgan')
    assert_one_line_error(in_process(['--dataset', 'digits', '--img_size', '12']), '--img_size 12')
    assert_one_line_error(in_process(['--bid_norm', 'standard', '--lot_size', '1']), '--lot_size')


@pytest.mark.parametrize('flag, value', [('--lr', '-1'), ('--clip_value', '0'), ('--gp', '-0.1'),
                                         ('--n_critic', '0'), ('--lot_size', 'x'), ('--gp', 'nan')])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        auction_gan.parser.parse_args([flag, value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]


def test_auctions_csv_survives_a_crash_after_a_checkpoint(tmp_path, monkeypatch):
    """Rows are flushed at every checkpoint too: a run killed after checkpoint 8 (no log line
    there) and resumed has every auction, as the straight run."""
    args = TINY + ['--log_interval', '5', '--ckpt_interval', '4']
    run_main(auction_gan, ['--n_iters', '12', '--out_dir', tmp_path / 'straight'] + args, monkeypatch)
    real_save = common.Run.save_checkpoint

    def save_then_die(self, iteration, **objects):
        real_save(self, iteration, **objects)
        if iteration + 1 == 8:
            raise KeyboardInterrupt
    monkeypatch.setattr(common.Run, 'save_checkpoint', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_main(auction_gan, ['--n_iters', '12', '--out_dir', tmp_path / 'split'] + args, monkeypatch)
    monkeypatch.setattr(common.Run, 'save_checkpoint', real_save)
    run_main(auction_gan, ['--n_iters', '12', '--resume', tmp_path / 'split'] + args, monkeypatch)
    straight = (tmp_path / 'straight' / 'auctions.csv').read_text()
    assert straight == (tmp_path / 'split' / 'auctions.csv').read_text() and len(straight.splitlines()) == 13
