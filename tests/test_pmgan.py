"""pmgan.py: losses, truncation and beta by hand, per-generator state, resume, AMP, images,
generator-parallel torchrun (K = 3 over 2 ranks), bad input."""
import csv
import json
import math
import os

import pytest
import torch

import common
from conftest import (assert_one_line_error, load_script, run_in_process, run_main, run_script,
                      run_torchrun_dumping_ranks)

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


def test_beta_scale_multiplies_the_renormalised_beta_by_hand():
    JD, JC = torch.tensor([-0.3, -0.5]), torch.tensor([-0.05, -0.2])
    # eq. 3-4 with lambda 0: w = softmax(J^D), d = sigmoid(J^D), b_k = w_k exp(-c_k / d_k)
    w0 = 1 / (1 + math.exp(-0.5 + 0.3))                       # e^-0.3 / (e^-0.3 + e^-0.5)
    d0, d1 = 1 / (1 + math.exp(0.3)), 1 / (1 + math.exp(0.5))
    b0, b1 = w0 * math.exp(0.05 / d0), (1 - w0) * math.exp(0.2 / d1)
    soft0 = math.exp(b0) / (math.exp(b0) + math.exp(b1))     # b = (0.61839, 0.76457): 0.46351
    for s in (1.0, 2.0, 0.0):
        beta = pmgan.balance_beta(JD, JC, 0.0, scale=s)
        assert torch.allclose(beta, torch.tensor([s * soft0, s * (1 - soft0)]), atol=1e-6)
        assert float(beta.sum()) == pytest.approx(s, abs=1e-6)
    assert soft0 == pytest.approx(0.46351, abs=1e-4)


def test_logged_beta_sums_to_scale_times_decay(tmp_path, monkeypatch):
    run_main(pmgan, ['--n_gen', '3', '--n_iters', '3', '--beta_scale', '3', '--beta_decay', '0.5',
                     '--out_dir', tmp_path / 'run'] + TINY, monkeypatch)
    for row in read_rows(tmp_path / 'run'):   # beta = s * softmax(...) * exp(-alpha * step), step 0, 1, 2
        step = int(row['iteration']) - 1
        assert sum(float(row[f'beta_{k}']) for k in range(3)) == pytest.approx(3 * math.exp(-0.5 * step), rel=1e-5)


def test_initial_generators_fork_and_seed_the_cpu_generator_only(monkeypatch):
    """The generators' start draws CPU numbers only: fork_rng(devices=[]) (no multi-GPU warning), and
    no CUDA generator reseeded (torch.manual_seed would set them all to --seed on every rank)."""
    args = pmgan.parser.parse_args(['--n_gen', '2', '--latent_dim', '4'])
    args.width = 16
    data = common.load_data('ring8')
    torch.manual_seed(0)
    want = pmgan.build_generators(args, data, 2).state_dict()
    torch.manual_seed(123)
    forks = []
    real_fork = torch.random.fork_rng
    monkeypatch.setattr(torch.random, 'fork_rng', lambda *a, **k: forks.append(k) or real_fork(*a, **k))
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: pytest.fail('CUDA generators reseeded'))
    before = torch.random.get_rng_state()
    got = pmgan.initial_generators(args, data, 2)
    assert forks == [{'devices': []}]
    assert torch.equal(torch.random.get_rng_state(), before)            # the CPU stream is untouched
    assert all(torch.equal(v, want[k]) for k, v in got.items())         # --seed's initialisation


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


STEP_DRIVER = '''
import sys, torch
from types import SimpleNamespace
sys.path.insert(0, {repo!r})
import common, pmgan
out = sys.argv[1]
args = pmgan.parser.parse_args(['--dataset', 'digits', '--img_size', '16', '--width', '4', '--batch_size', '12',
                                '--latent_dim', '8', '--n_gen', '3', '--out_dir', out + '/run',
                                '--data_root', {data_root!r}, '--ckpt_interval', '0'])
run = common.Run(args, 'pmgan')
data = run.load_data()
K, B = args.n_gen, args.batch_size
owned, m = list(range(run.rank, K, run.world_size)), B // K
everyone = pmgan.split_members(pmgan.initial_generators(args, data, K), K)
G = pmgan.build_generators(args, data, len(owned))
G.load_state_dict(pmgan.join_members([everyone[k] for k in owned]))
torch.manual_seed(1)
dc_raw = pmgan.build_dc(args, data)
nets = SimpleNamespace(generators=G, dc=run.prepare(dc_raw), dc_raw=dc_raw, owned=owned,
                       opt_G=torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                       opt_DC=torch.optim.Adam(dc_raw.parameters(), lr=1e-3, betas=(0.5, 0.999)))
for it in range(3):
    g = torch.Generator().manual_seed(100 + it)          # the same real batch and z on every rank
    real = data.batch(torch.randint(len(data), (B,), generator=g))[0]
    z = torch.randn(K, m, args.latent_dim, generator=g)[owned]
    losses, balance = pmgan.train_step(it, real, z, nets, args, run, False)
mine = dict(zip(owned, pmgan.split_members(G.state_dict(), len(owned))))
torch.save(dict(dc=dc_raw.state_dict(), generators=mine, beta=balance['beta'], G=losses['G']),
           f'{{out}}/rank{{run.rank}}_of_{{run.world_size}}.pt')
run.finish(2)
'''


def test_torchrun_steps_equal_one_process_on_the_same_data(tmp_path, data_root):
    """Images, K = 3 over 2 ranks (2 + 1): D and C see all K generators' fakes on every rank, so
    D's batch norm normalises the same fake batch as in one process. Given the same real batch on
    each rank and the same z per generator, three D/C + G steps under torchrun leave D/C, every
    generator, beta and the G losses as one process leaves them."""
    import subprocess
    import sys
    from conftest import REPO, run_torchrun
    driver = tmp_path / 'steps.py'
    driver.write_text(STEP_DRIVER.format(repo=REPO, data_root=data_root))
    one = subprocess.run([sys.executable, str(driver), str(tmp_path / 'one')], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_torchrun(str(driver), [tmp_path / 'two'], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    ref = torch.load(tmp_path / 'one' / 'rank0_of_1.pt', weights_only=False)
    ranks = [torch.load(tmp_path / 'two' / f'rank{r}_of_2.pt', weights_only=False) for r in range(2)]
    assert sorted(ranks[0]['generators']) == [0, 2] and sorted(ranks[1]['generators']) == [1]
    for rank in ranks:
        for key, value in ref['dc'].items():
            if 'running_' in key or 'num_batches' in key:
                continue            # each rank's BN running statistics are its own (DDP keeps rank 0's)
            assert torch.allclose(value, rank['dc'][key], atol=1e-6), key
        assert torch.allclose(rank['beta'], ref['beta'], atol=1e-6)
        assert torch.allclose(rank['G'], ref['G'], atol=1e-6)
        for k, state in rank['generators'].items():
            for key, value in state.items():
                assert torch.allclose(value, ref['generators'][k][key], atol=1e-6), (k, key)


@pytest.mark.parametrize('flag, value', [('--lr', '-1'), ('--trunc', '1'), ('--trunc', '0'), ('--beta', '-1'),
                                         ('--beta_scale', '-2'), ('--beta_decay', '-0.1'), ('--gen_batch', '-1'),
                                         ('--width', '-4'), ('--diversity', 'inf'), ('--n_gen', '0')])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        pmgan.parser.parse_args([flag, value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]


def test_bad_input_gives_one_line(tmp_path, monkeypatch, capsys):
    assert_one_line_error(run_script('pmgan', ['--n_gen', '0'], tmp_path), '--n_gen')
    in_process = lambda args: run_in_process(pmgan, args, tmp_path, monkeypatch, capsys)
    assert_one_line_error(in_process(['--trunc', '1.5']), '--trunc')
    assert_one_line_error(in_process(['--dataset', 'digits', '--img_size', '12']), '--img_size')
    (tmp_path / 'run').mkdir()
    assert_one_line_error(in_process(['--resume', tmp_path / 'run']), 'no checkpoint')
