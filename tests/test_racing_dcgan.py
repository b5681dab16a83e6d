"""racing_dcgan.py: racing on probabilities, per-generator batch norm, --n_gen 1 == plain DCGAN,
every image size, --amp, DDP, resume, errors."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
from conftest import (assert_one_line_error, load_script, run_in_process, run_main, run_script,
                      run_torchrun_dumping_ranks)

racing_dcgan = load_script('racing_dcgan')
LN3 = math.log(3.0)


def tiny(data_root, out_dir, *extra, size=16):
    """Digits at 16x16, nets 4 channels wide, batch 8: a few iterations take about a second."""
    return ['--img_size', size, '--batch_size', 8, '--latent_dim', 8, '--ngf', 4, '--ndf', 4,
            '--eval_samples', 200, '--log_interval', 1, '--sample_interval', 0, '--ckpt_interval', 0,
            '--data_root', data_root, '--out_dir', out_dir, *extra]


def load_ckpt(folder):
    return torch.load(os.path.join(folder, 'ckpt.pt'), weights_only=False)


# ---- the racing term and the losses, by hand -------------------------------------------------

def test_racing_term_on_probabilities_by_hand():
    # K = 3 generators, B = 2 paired samples. Logits 0, ln 3, -ln 3 are probabilities 1/2, 3/4, 1/4.
    logits = torch.tensor([[0.0, LN3], [LN3, -LN3], [-LN3, 0.0]])
    r = logits.sigmoid()                      # [[.5, .75], [.75, .25], [.25, .5]]
    # lag: sum over rivals j of mean_b max(0, r_j - r_i)
    #  i=0: j=1 -> .25, 0 -> .125;  j=2 -> 0, 0 -> 0;       total .125
    #  i=1: j=0 -> 0, .5 -> .25;    j=2 -> 0, .25 -> .125;  total .375
    #  i=2: j=0 -> .25, .25 -> .25; j=1 -> .5, 0 -> .25;    total .5
    assert torch.allclose(racing_dcgan.racing_term(r, 'lag'), torch.tensor([0.125, 0.375, 0.5]))
    # paper: sum over rivals j of mean_b max(0, r_i - r_j)
    #  i=0: j=1 -> 0, .5 -> .25;    j=2 -> .25, .25 -> .25; total .5
    #  i=1: j=0 -> .25, 0 -> .125;  j=2 -> .5, 0 -> .25;    total .375
    #  i=2: j=0 -> 0, 0 -> 0;       j=1 -> 0, .25 -> .125;  total .125
    assert torch.allclose(racing_dcgan.racing_term(r, 'paper'), torch.tensor([0.5, 0.375, 0.125]))
    assert torch.equal(racing_dcgan.racing_term(r, 'off'), torch.zeros(3))
    assert torch.equal(racing_dcgan.racing_term(r[:1], 'lag'), torch.zeros(1))   # K = 1: plain DCGAN
    # The term is on probabilities, not logits: the logits' lag for i=0 would be (ln 3)/2.
    assert not torch.allclose(racing_dcgan.racing_term(logits, 'lag')[0], torch.tensor(0.125))


def test_bce_on_logits_by_hand():
    logits = torch.tensor([[0.0, LN3], [-LN3, LN3]])
    # BCE(l, 1) = -log sigmoid(l): ln 2 at 0, ln(4/3) at ln 3, ln 4 at -ln 3; BCE(l, 0) = BCE(-l, 1)
    want_1 = torch.tensor([(math.log(2) + math.log(4 / 3)) / 2, (math.log(4) + math.log(4 / 3)) / 2])
    want_0 = torch.tensor([(math.log(2) + math.log(4)) / 2, (math.log(4 / 3) + math.log(4)) / 2])
    assert torch.allclose(racing_dcgan.bce(logits, 1.0), want_1)
    assert torch.allclose(racing_dcgan.bce(logits, 0.0), want_0)
    big = torch.tensor([[200.0, -200.0]])        # from logits: finite where sigmoid + BCELoss is not
    assert torch.allclose(racing_dcgan.bce(big, 1.0), torch.tensor([100.0]))


@pytest.mark.parametrize('mode', ['lag', 'paper'])
def test_no_gradient_reaches_the_rival_generator(mode):
    torch.manual_seed(0)
    K = 3
    gens = common.DCGANGenerators(K, 8, 16, 1, ngf=4)
    disc = racing_dcgan.Discriminator(16, 1, ndf=4)
    logits = disc(gens(torch.randn(16, 8)))                         # (K, B), one D call per generator
    loss = racing_dcgan.bce(logits, 1.0) + racing_dcgan.racing_term(logits.sigmoid(), mode)
    loss[0].backward()                                              # generator 0's loss alone
    # Every parameter of the K-member module stacks the members along dim 0.
    per_member = [p.grad.view(K, -1).abs().sum(1) for p in gens.parameters()]
    assert all(g[1:].sum() == 0 for g in per_member)                # nothing reaches generators 1, 2
    assert all(g[0] > 0 for g in per_member)                        # generator 0 gets all of it

    # The batch-norm trap this guards against: one D call on all fakes mixes BN statistics,
    # and then generator 1's samples move D(G_0(z)) and receive gradient from generator 0's loss.
    # That is what --joint_fake_bn does, knowingly.
    gens.zero_grad()
    disc.joint_fakes = True
    racing_dcgan.bce(disc(gens(torch.randn(16, 8))), 1.0)[0].backward()
    assert sum(p.grad.view(K, -1)[1].abs().sum() for p in gens.parameters()) > 0


# ---- the training loop against a DCGAN step written out by hand ------------------------------

def by_hand_steps(gens, disc, data, n_iters, batch_size, latent_dim, race_weight=1.0):
    """The pytorch/examples DCGAN step (D on real, then on fakes, then G through the updated D),
    on logits, with the racing term added for K > 1; plain NCHW nets, separate D calls."""
    K = gens.n_gen
    D = torch.nn.Sequential(*disc.body, disc.head, torch.nn.Flatten(0))
    opt_G = torch.optim.Adam(gens.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batches = common.Batches(data, batch_size, seed=3)
    torch.randn(10, latent_dim)                                     # the script's fixed sample noise
    losses = []
    for it in range(n_iters):
        real, _ = batches.get(it)
        z = torch.randn(batch_size, latent_dim)
        fakes = gens(z)
        loss_D = F.binary_cross_entropy_with_logits(D(real), torch.ones(batch_size))
        for k in range(K):
            fake_logits = D(fakes[k].detach())
            loss_D = loss_D + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros(batch_size)) / K
        opt_D.zero_grad(); loss_D.backward(); opt_D.step()
        logits = [D(fakes[k]) for k in range(K)]
        probs = [l.sigmoid() for l in logits]
        loss_G = []
        for i in range(K):
            race = sum(torch.relu(probs[j].detach() - probs[i]).mean() for j in range(K) if j != i)
            loss_G.append(F.binary_cross_entropy_with_logits(logits[i], torch.ones(batch_size)) + race_weight * race)
        opt_G.zero_grad(); sum(loss_G).backward(); opt_G.step()
        losses.append((loss_D.item(), [l.item() for l in loss_G]))
    return D, losses


@pytest.mark.parametrize('n_gen', [1, 2])
def test_training_steps_equal_a_dcgan_written_out(tmp_path, monkeypatch, data_root, n_gen):
    """--n_gen 1: three iterations equal three plain DCGAN steps; --n_gen 2 (lag): equal the same
    steps with the racing term by hand. Same seed, same weights, same noise, same batches."""
    args = tiny(data_root, tmp_path / 'run', '--n_gen', n_gen, '--n_iters', 3, '--seed', 3,
                '--race_weight', 0.7)
    run_main(racing_dcgan, args, monkeypatch)
    after = load_ckpt(tmp_path / 'run')

    ns = racing_dcgan.parser.parse_args([str(a) for a in args])
    data = common.load_data('digits', img_size=16)
    torch.manual_seed(3)                                            # replay the script's draws
    gens, disc = racing_dcgan.build_nets(ns, 1)
    D, losses = by_hand_steps(gens, disc, data, 3, 8, 8, race_weight=0.7)

    rows = (tmp_path / 'run' / 'metrics.csv').read_text().splitlines()
    header = rows[0].split(',')
    assert len(rows) == 4                                           # one row per iteration
    for row, (loss_D, loss_G) in zip(rows[1:], losses):
        values = dict(zip(header, row.split(',')))
        assert math.isclose(float(values['D']), loss_D, rel_tol=1e-5)
        got_G = [float(values[f'G_{k}']) for k in range(n_gen)]
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got_G, loss_G))
    want = {**{f'g.{k}': v for k, v in gens.state_dict().items()},
            **{f'd.{k}': v for k, v in disc.state_dict().items()}}
    got = {**{f'g.{k}': v for k, v in after['generators'].items()},
           **{f'd.{k}': v for k, v in after['discriminator'].items()}}
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key].float(), want[key].float(), rtol=1e-4, atol=1e-6), key
    assert after['generators']['net.1.running_mean'].abs().sum() > 0   # BN ran in train mode


# ---- sizes, AMP, resume, DDP, errors ---------------------------------------------------------

@pytest.mark.parametrize('size, extra', [(16, []), (32, ['--joint_fake_bn']), (64, []), (128, [])])
def test_every_power_of_two_size_builds_and_steps(tmp_path, monkeypatch, data_root, size, extra):
    run_main(racing_dcgan, tiny(data_root, tmp_path / 'run', '--n_gen', 2, '--n_iters', 1, '--batch_size', 4,
                                *extra, size=size), monkeypatch)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['iterations'] == 1 and math.isfinite(summary['fd_digits'])
    shown = max(size, 32)                                            # small images are enlarged
    with Image.open(tmp_path / 'run' / 'samples' / 'iter_000001.png') as grid:   # 2 rows of 10
        assert grid.size == (10 * (shown + 2) + 2, 2 * (shown + 2) + 2)


def test_amp_bf16_on_cpu(tmp_path, monkeypatch, data_root):
    run_main(racing_dcgan, tiny(data_root, tmp_path / 'fp32', '--n_gen', 2, '--n_iters', 3), monkeypatch)
    run_main(racing_dcgan, tiny(data_root, tmp_path / 'amp', '--n_gen', 2, '--n_iters', 3, '--amp'), monkeypatch)
    fp32, amp = [json.loads((tmp_path / r / 'summary.json').read_text()) for r in ('fp32', 'amp')]
    assert all(math.isfinite(v) for v in [amp['final_D'], *amp['final_G'], amp['fd_digits']])
    assert amp['final_D'] != fp32['final_D']                          # bf16 arithmetic did run ...
    assert math.isclose(amp['final_D'], fp32['final_D'], rel_tol=0.05)  # ... and is close to fp32
    assert all(v.dtype == torch.float32 for v in load_ckpt(tmp_path / 'amp')['generators'].values()
               if v.is_floating_point())                             # weights stay fp32


def test_resume_continues_exactly(tmp_path, monkeypatch, data_root):
    run_main(racing_dcgan, tiny(data_root, tmp_path / 'straight', '--n_iters', 6), monkeypatch)
    run_main(racing_dcgan, tiny(data_root, tmp_path / 'split', '--n_iters', 3), monkeypatch)
    run_main(racing_dcgan, tiny(data_root, tmp_path / 'split', '--n_iters', 6, '--resume', tmp_path / 'split'),
             monkeypatch)
    a, b = load_ckpt(tmp_path / 'straight'), load_ckpt(tmp_path / 'split')
    assert a['iteration'] == b['iteration'] == 6
    for net in ('generators', 'discriminator'):
        for key, value in a[net].items():
            assert torch.equal(value, b[net][key]), (net, key)
    for opt in ('opt_G', 'opt_D'):
        for x, y in zip(a[opt]['state'].values(), b[opt]['state'].values()):
            assert torch.equal(x['exp_avg'], y['exp_avg']) and torch.equal(x['exp_avg_sq'], y['exp_avg_sq'])
    rows = (tmp_path / 'split' / 'metrics.csv').read_text().splitlines()[1:]
    assert [int(r.split(',')[0]) for r in rows] == list(range(1, 7))   # appended, no duplicates


def test_torchrun_two_processes_end_with_identical_parameters(tmp_path, data_root):
    result, ranks = run_torchrun_dumping_ranks('racing_dcgan', tiny(data_root, tmp_path / 'run', '--n_iters', 4),
                                               tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ranks) == 2
    gens, disc = racing_dcgan.build_nets(racing_dcgan.parser.parse_args(['--ngf', '4', '--ndf', '4',
                                                                          '--latent_dim', '8', '--img_size', '16']), 1)
    for net, module in (('generators', gens), ('discriminator', disc)):
        names = [n for n, _ in module.named_parameters()]   # BN running statistics stay rank-local
        assert len(names) > 4
        for name in names:
            assert torch.equal(ranks[0][net][name], ranks[1][net][name]), (net, name)
    assert not torch.equal(ranks[0]['generators']['net.1.running_mean'],          # each rank saw
                           ranks[1]['generators']['net.1.running_mean'])          # its own noise
    assert result.stdout.count('[Epoch') == 4   # rank 0 alone prints


@pytest.mark.parametrize('flag, value', [('--lr', '-1'), ('--race_weight', '-1'), ('--ngf', '0'), ('--b2', '1')])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        racing_dcgan.parser.parse_args([flag, value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]


def test_bad_input_gives_one_line(tmp_path, monkeypatch, capsys):
    assert_one_line_error(run_script('racing_dcgan', ['--img_size', '48'], tmp_path), '--img_size 48', 'power of two')
    in_process = lambda args: run_in_process(racing_dcgan, args, tmp_path, monkeypatch, capsys)
    assert_one_line_error(in_process(['--n_gen', '0']), '--n_gen')
    assert_one_line_error(in_process(['--dataset', 'ring8']), 'racing_wgan.py')
    assert not os.path.exists(tmp_path / 'runs')                    # no run folder left behind


# ---- tools/compare_runs.py -------------------------------------------------------------------

def test_compare_runs_overlays_run_folders_in_one_png(tmp_path, monkeypatch, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('compare_runs', os.path.join(os.path.dirname(__file__), '..',
                                                                               'tools', 'compare_runs.py'))
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    for name in ('a/digits-001', 'b/digits-001'):       # same folder name: labels need the parent
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / 'metrics.csv').write_text('iteration,epoch,wall_seconds,D,G_0,G_1,fd_digits\n'
                                                     '1,1,0.5,1.3,0.7,0.6,\n2,1,1.0,1.2,0.8,0.7,900.5\n')
    out = tmp_path / 'plots' / 'cmp.png'
    monkeypatch.setattr('sys.argv', ['compare_runs.py', str(tmp_path / 'a/digits-001'),
                                     str(tmp_path / 'b/digits-001' / 'metrics.csv'), '-o', str(out)])
    compare.main()
    assert 'a/digits-001, b/digits-001' in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.size[0] > 300 and png.size[1] > 200

    monkeypatch.setattr('sys.argv', ['compare_runs.py', str(tmp_path / 'a/digits-001'), str(tmp_path / 'nope')])
    with pytest.raises(SystemExit) as exit_:
        common.run_main(compare.main)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1 and 'nope' in err[0] and 'metrics.csv' in err[0]
    monkeypatch.setattr('sys.argv', ['compare_runs.py', str(tmp_path / 'a/digits-001'), '--labels', 'x', 'y'])
    with pytest.raises(SystemExit):
        common.run_main(compare.main)
    assert '2 --labels for 1 runs' in capsys.readouterr().err
