"""pmgan.py: losses, truncation and beta by hand, per-generator state, resume, AMP, images,
generator-parallel torchrun (K = 3 over 2 ranks), bad input."""
import csv
import json
import math
import os

import pytest
import torch

import common
from conftest import assert_one_line_error, load_script, run_main, run_script, run_torchrun_dumping_ranks

pmgan = load_script('pmgan')
TINY = ['--dataset', 'ring8', '--batch_size', '32', '--latent_dim', '4', '--width', '16', '--log_interval', '1',
        '--sample_interval', '0', '--ckpt_interval', '0', '--eval_samples', '200']
TINY_IMAGES = ['--img_size', '16', '--width', '4', '--batch_size', '16', '--latent_dim', '8', '--log_interval', '1',
               '--sample_interval', '0', '--ckpt_interval', '0', '--eval_samples', '100']


def read_rows(folder):
    with open(os.path.join(folder, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def test_generator_loss_and_truncation_by_hand():
    # K = 2 generators, m = 2 samples each, 2 classes. t = 0.99: logit(t) = ln 99 = 4.59512.
    d = torch.tensor([[0.0, 10.0], [-1.0, 2.0]], requires_grad=True)
    c = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [2.0, 0.0]]])
    beta = torch.tensor([0.5, 2.0])
    loss, adv, cls = pmgan.generator_loss(d, c, beta, torch.tensor([0, 1]), 0.99)
    # adversarial: -mean(clamp(s, max=4.59512)): G0 -(0 + 4.59512)/2, G1 -(-1 + 2)/2
    assert torch.allclose(adv, torch.tensor([-4.59512 / 2, -0.5]), atol=1e-5)
    # CE against own label: G0 label 0: -log softmax([1,0])_0 = ln(1 + e^-1), -log softmax([0,0])_0 = ln 2
    #                       G1 label 1: ln(1 + e^-3), ln(1 + e^2)
    want_cls = torch.tensor([(math.log(1 + math.exp(-1)) + math.log(2)) / 2,
                             (math.log(1 + math.exp(-3)) + math.log(1 + math.exp(2))) / 2])
    assert torch.allclose(cls, want_cls, atol=1e-6)
    assert torch.allclose(loss, adv + beta * want_cls, atol=1e-6)
    loss.sum().backward()
    # truncation: no gradient where D > t (logit 10 > 4.595); elsewhere -1/m
    assert torch.allclose(d.grad, torch.tensor([[-0.5, 0.0], [-0.5, -0.5]]))


def test_balance_beta_by_hand_and_without_gradient():
    JD = torch.tensor([-0.3, -0.5, -0.4], requires_grad=True)
    JC = torch.tensor([-0.05, -0.2, -0.1], requires_grad=True)
    lam = 0.5
    # eq. 3-4 written out with the math module
    w = [math.exp(j) / sum(math.exp(i) for i in JD.tolist()) for j in JD.tolist()]
    d = [1 / (1 + math.exp(-j)) for j in JD.tolist()]
    raw = [w[k] * math.exp(-(JC.tolist()[k] / d[k] - lam)) for k in range(3)]
    want = [math.exp(r) / sum(math.exp(s) for s in raw) for r in raw]
    beta = pmgan.balance_beta(JD, JC, lam)
    assert torch.allclose(beta, torch.tensor(want), atol=1e-6)
    assert not beta.requires_grad and beta.grad_fn is None       # beta gets no gradient
    assert abs(float(beta.sum()) - 1) < 1e-6                     # renormalised
    # early training: J^C very negative, the raw term overflows float64 (e^900); beta is exact
    big = pmgan.balance_beta(torch.tensor([-1.4, -1.3, -1.5]), torch.tensor([-900.0, -2.0, -800.0]), 0.0)
    assert torch.isfinite(big).all() and abs(float(big.sum()) - 1) < 1e-6
    assert big.argmax() == 0 and big[0] > 0.99                  # saturates on the worst-separated one
    # an extreme D: d_k = sigmoid(-800) underflows to 0, so c_k / d_k is -inf: still no NaN
    assert torch.equal(pmgan.balance_beta(torch.tensor([-800.0, -2.0]), torch.tensor([-1.0, -1.0]), 0.0),
                       torch.tensor([1.0, 0.0]))
    assert torch.equal(pmgan.balance_beta(torch.tensor([-800.0, -800.0, -2.0]), torch.tensor([-1.0, -1.0, -1.0]),
                                          0.0), torch.tensor([0.5, 0.5, 0.0]))       # ties share beta
    assert torch.isfinite(pmgan.balance_beta(torch.tensor([-800.0, -2.0]), torch.tensor([0.0, -1.0]), 0.0)).all()


def test_classifier_term_pushes_generator_k_towards_label_k():
    torch.manual_seed(0)
    K = 3
    gens = common.MLPGenerators(K, 4, (2,), hidden=(16, 16), batchnorm=False, tanh=False)
    angles = torch.arange(K) * (2 * math.pi / K)   # a fixed linear C: class k's logit grows along angle k
    directions = torch.stack([angles.cos(), angles.sin()], 0)
    classifier = lambda x: x @ directions
    opt = torch.optim.Adam(gens.parameters(), lr=1e-2)
    z = torch.randn(K, 64, 4)
    labels = torch.arange(K)

    def own_log_prob():   # E log C_k(G_k(z)) for each k
        logits = classifier(gens(z).flatten(0, 1)).view(K, 64, K)
        return logits.log_softmax(-1).gather(2, labels.view(K, 1, 1).expand(K, 64, 1)).mean((1, 2))

    before = own_log_prob().detach()
    for _ in range(30):
        logits = classifier(gens(z).flatten(0, 1))
        _, _, cls = pmgan.generator_loss(torch.zeros(K, 64), logits.view(K, 64, K), torch.ones(K), labels, 0.99)
        opt.zero_grad()
        cls.sum().backward()
        opt.step()
    after = own_log_prob().detach()
    assert (after > before + 0.5).all(), (before, after)


def test_per_generator_states_split_and_join():
    gens = common.DCGANGenerators(3, 8, 16, 1, ngf=4)
    opt = torch.optim.Adam(gens.parameters())
    gens(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    state = {key: value.clone() for key, value in gens.state_dict().items()}
    parts = pmgan.split_members(state, 3)
    one = common.DCGANGenerators(1, 8, 16, 1, ngf=4)
    one.load_state_dict(parts[1])                        # member 1 is a generator of its own
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.allclose(one(z)[0], gens(z)[1], atol=1e-6)
    for key, value in pmgan.join_members(parts).items():
        assert torch.equal(value, state[key])
    opt_parts = pmgan.split_members(opt.state_dict(), 3)
    joined = pmgan.join_members([opt_parts[0], opt_parts[2]])   # a rank owning generators 0 and 2
    two = common.DCGANGenerators(2, 8, 16, 1, ngf=4)
    torch.optim.Adam(two.parameters()).load_state_dict(joined)
    first = opt.state_dict()['state'][0]['exp_avg']   # (3 * 8, 4, 4, 4): member-major
    assert torch.equal(joined['state'][0]['exp_avg'], torch.cat([first[:8], first[16:]]))


def test_logged_statistics_match_the_losses_and_k1_is_a_plain_gan(tmp_path, monkeypatch):
    run_main(pmgan, ['--n_gen', '4', '--n_iters', '3', '--out_dir', tmp_path / 'k4'] + TINY, monkeypatch)
    run_main(pmgan, ['--n_gen', '1', '--n_iters', '3', '--out_dir', tmp_path / 'k1'] + TINY, monkeypatch)
    for row in read_rows(tmp_path / 'k4'):   # mean_k J^D_k = -L_D and mean_k J^C_k = -L_C (one process)
        JD = [float(row[f'JD_{k}']) for k in range(4)]
        JC = [float(row[f'JC_{k}']) for k in range(4)]
        assert abs(sum(JD) / 4 + float(row['D'])) < 1e-5 and abs(sum(JC) / 4 + float(row['C'])) < 1e-5
        assert abs(sum(float(row[f'beta_{k}']) for k in range(4)) - 1) < 1e-5
    for row in read_rows(tmp_path / 'k1'):   # one class: C's term is 0, beta 1, a plain GAN
        assert float(row['C']) == 0 and float(row['JC_0']) == 0 and float(row['beta_0']) == 1
        assert abs(float(row['JD_0']) + float(row['D'])) < 1e-5
    summary = json.loads((tmp_path / 'k4' / 'summary.json').read_text())
    assert set(summary) >= {'modes_covered', 'hq_fraction', 'kl_uniform'} and len(summary['final_G']) == 4
    assert len(summary['beta']) == 4 and abs(sum(summary['beta']) - 1) < 1e-5 and len(summary['JD']) == 4
    assert os.path.exists(tmp_path / 'k4' / 'samples' / 'iter_000003.png')


def test_resume_continues_exactly(tmp_path, monkeypatch):
    args = ['--n_gen', '3', '--beta_decay', '0.01'] + TINY
    run_main(pmgan, ['--n_iters', '8', '--out_dir', tmp_path / 'straight'] + args, monkeypatch)
    run_main(pmgan, ['--n_iters', '4', '--out_dir', tmp_path / 'split'] + args, monkeypatch)
    run_main(pmgan, ['--n_iters', '8', '--resume', tmp_path / 'split'] + args, monkeypatch)
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=False)
    b = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=False)
    assert a['iteration'] == b['iteration'] == 8 and len(a['generators']) == 3
    for k in range(3):
        for key, value in a['generators'][k].items():
            assert torch.equal(value, b['generators'][k][key]), (k, key)
        assert torch.equal(a['opt_G'][k]['state'][0]['exp_avg'], b['opt_G'][k]['state'][0]['exp_avg'])
    for key, value in a['dc'].items():
        assert torch.equal(value, b['dc'][key]), key
    assert torch.equal(a['balance']['beta'], b['balance']['beta'])
    assert [int(r['iteration']) for r in read_rows(tmp_path / 'split')] == list(range(1, 9))


@pytest.mark.parametrize('dataset, extra', [('digits', ['--amp']),
                                            ('stacked-digits', ['--no-share_dc', '--beta_mode', 'const'])])
def test_image_runs(tmp_path, monkeypatch, data_root, dataset, extra):
    run_main(pmgan, ['--dataset', dataset, '--n_gen', '2', '--n_iters', '3', '--out_dir', tmp_path / 'run',
                     '--data_root', data_root] + TINY_IMAGES + extra, monkeypatch)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert ('fd_digits' if dataset == 'digits' else 'modes_covered') in summary
    assert all(math.isfinite(v) for v in summary['final_G'] + [summary['final_D'], summary['final_C']])
    from PIL import Image
    grid = Image.open(tmp_path / 'run' / 'samples' / 'iter_000003.png')
    assert grid.size[1] < grid.size[0]                     # 2 rows (one per generator) of 10
    rows = read_rows(tmp_path / 'run')
    if '--beta_mode' in extra:
        assert all(float(r['beta_0']) == float(r['beta_1']) == 1.0 for r in rows)


def test_torchrun_splits_generators_and_keeps_replicas_identical(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    args = ['--n_gen', '3', '--n_iters', '4', '--out_dir', out] + TINY
    result, ranks = run_torchrun_dumping_ranks('pmgan', args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'rank 0: generators [0, 2]; rank 1: generators [1]' in result.stdout
    assert len(ranks) == 2
    for key, value in ranks[0]['dc'].items():                   # D and C: data-parallel replicas
        assert torch.equal(value, ranks[1]['dc'][key]), key
    assert torch.equal(ranks[0]['balance']['beta'], ranks[1]['balance']['beta'])   # same beta
    assert torch.equal(ranks[0]['balance']['JD'], ranks[1]['balance']['JD'])
    for row in read_rows(out):   # gathered J^D, J^C and all-reduced losses agree across the 2 ranks
        assert abs(sum(float(row[f'JD_{k}']) for k in range(3)) / 3 + float(row['D'])) < 1e-5
        assert abs(sum(float(row[f'JC_{k}']) for k in range(3)) / 3 + float(row['C'])) < 1e-5
    # rank 1 holds generator 1 alone; rank 0's checkpoint holds all three, generator 1 from rank 1
    assert [s is None for s in ranks[1]['generators']] == [True, False, True]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['iteration'] == 4 and all(s is not None for s in ckpt['generators'])
    for key, value in ranks[1]['generators'][1].items():
        assert torch.equal(value, ckpt['generators'][1][key]), key
    # every generator was trained: none still equals its initialisation
    ns = pmgan.parser.parse_args([str(a) for a in args])
    ns.width = 16
    torch.manual_seed(0)
    init = pmgan.split_members(pmgan.build_generators(ns, common.load_data('ring8'), 3).state_dict(), 3)
    for k in range(3):
        assert not torch.equal(init[k]['net.0.weight'], ckpt['generators'][k]['net.0.weight']), k
    # the 2-process checkpoint resumes in one process (each generator loaded from its own slot)
    run_main(pmgan, ['--n_gen', '3', '--n_iters', '6', '--resume', out] + TINY, monkeypatch)
    after = torch.load(out / 'ckpt.pt', weights_only=False)
    assert after['iteration'] == 6 and len(after['generators']) == 3
    assert [int(r['iteration']) for r in read_rows(out)] == list(range(1, 7))


def test_bad_input_gives_one_line(tmp_path):
    assert_one_line_error(run_script('pmgan', ['--n_gen', '0'], tmp_path), '--n_gen')
    assert_one_line_error(run_script('pmgan', ['--trunc', '1.5'], tmp_path), '--trunc')
    assert_one_line_error(run_script('pmgan', ['--dataset', 'digits', '--img_size', '12'], tmp_path), '--img_size')
    (tmp_path / 'run').mkdir()
    assert_one_line_error(run_script('pmgan', ['--resume', tmp_path / 'run'], tmp_path), 'no checkpoint')
