"""biggan_sn.py: BigGAN (SN, cBN, hierarchical z, attention, projection D, hinge, TTUR, ortho reg,
truncation, EMA) and SN-DCGAN. Tiny nets (--ch 2) and few iterations keep this file fast."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.nn.utils import parametrize

from conftest import (assert_one_line_error, load_script, run_main, run_script,
                      run_torchrun_dumping_ranks)

bg = load_script('biggan_sn')
import common  # noqa: E402  (conftest put the repo on sys.path)
import fid  # noqa: E402

TINY = ['--img_size', 32, '--ch', 2, '--batch_size', 8, '--latent_dim', 16, '--shared_dim', 8,
        '--log_interval', 1, '--sample_interval', 0, '--eval_samples', 64, '--ckpt_interval', 0]


def train(monkeypatch, out_dir, data_root, *extra):
    run_main(bg, TINY + ['--data_root', data_root, '--out_dir', out_dir] + list(extra), monkeypatch)
    with open(os.path.join(out_dir, 'summary.json')) as f:
        return json.load(f)


def nets_from_checkpoint(out_dir, arch='biggan', img_size=32, n_classes=10):
    args = bg.complete_args(bg.parser.parse_args([str(a) for a in ['--arch', arch, '--img_size', img_size, '--ch', 2,
                                                                   '--latent_dim', 16, '--shared_dim', 8]]))
    G, D = bg.build_nets(args, 1, n_classes)
    state = torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=False)
    G.load_state_dict(state['G'])
    D.load_state_dict(state['D'])
    return G, D, state


def spectral_normed(net):
    return [m for m in net.modules() if parametrize.is_parametrized(m, 'weight')]


def largest_singular_value(module):
    """sigma_max of the weight as spectral norm sees it: `dim` first, the rest flattened."""
    with torch.no_grad():
        w = module.weight.movedim(module.parametrizations.weight[0].dim, 0).flatten(1)
        return torch.linalg.matrix_norm(w.double(), 2).item()


@pytest.fixture(scope='module')
def biggan_run(tmp_path_factory, data_root):
    """A conditional biggan run on digits, 3 iterations (with --ema): shared by several tests."""
    out = str(tmp_path_factory.mktemp('biggan') / 'run')
    mp = pytest.MonkeyPatch()
    try:
        summary = train(mp, out, data_root, '--n_iters', 3, '--ema', '--ema_start', 1, '--sample_interval', 3)
    finally:
        mp.undo()
    return out, summary


# ---- losses and regularisers against hand-computed values ---------------------------------------

def test_hinge_and_bce_losses_by_hand():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.3])
    # L_D = mean(relu(1 - [0.5, 2])) + mean(relu(1 + [-2, 0.3])) = 0.25 + 0.65
    assert bg.d_loss(real, fake, 'hinge').item() == pytest.approx(0.9)
    assert bg.g_loss(fake, 'hinge').item() == pytest.approx(0.85)  # -mean(-2, 0.3)
    softplus = lambda v: math.log1p(math.exp(v))
    bce_d = (softplus(-0.5) + softplus(-2.0)) / 2 + (softplus(-2.0) + softplus(0.3)) / 2
    assert bg.d_loss(real, fake, 'bce').item() == pytest.approx(bce_d, rel=1e-6)
    assert bg.g_loss(fake, 'bce').item() == pytest.approx((softplus(2.0) + softplus(-0.3)) / 2, rel=1e-6)


def test_orthogonal_penalty_by_hand():
    net = nn.Module()
    net.w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))      # W W^T = [[5, 11], [11, 25]]
    net.conv = nn.Parameter(torch.tensor([[[[1.0]], [[0.0]]], [[[1.0]], [[1.0]]]]))  # rows (1,0),(1,1)
    net.bias = nn.Parameter(torch.ones(3))                               # 1-d: left out
    net.shared = nn.Embedding(3, 2)                                      # shared embedding: left out
    beta = 1e-4
    # off-diagonal: 11^2 + 11^2 = 242 for w, 1^2 + 1^2 = 2 for conv; beta/2 of their sum
    penalty = bg.orthogonal_penalty(net, beta)
    assert penalty.item() == pytest.approx(beta / 2 * 244.0)
    penalty.backward()
    assert net.bias.grad is None and net.shared.weight.grad is None
    # BigGAN-PyTorch's utils.ortho: grad = 2 beta (W W^T * (1 - I)) W (autograd of the printed
    # beta ||W W^T * (1 - I)||^2 would give 4 beta (...) W)
    w = net.w.detach()
    ww = w @ w.t()
    assert torch.allclose(net.w.grad, 2 * beta * (ww * (1 - torch.eye(2))) @ w)
    assert torch.allclose(net.w.grad, 2 * beta * torch.tensor([[33.0, 44.0], [11.0, 22.0]]))   # by hand


def test_orthogonal_penalty_gradient_is_biggans_on_a_generator():
    """On a BigGAN G, the penalty's gradient on every regularised weight is BigGAN-PyTorch's
    2 beta (W W^T * (1 - I)) W with W the weight viewed (out, -1); biases and the embedding get none."""
    torch.manual_seed(0)
    G = bg.BigGANGenerator(32, 1, 16, 2, 10, 8, attn_res=16)
    beta = 1e-4
    bg.orthogonal_penalty(G, beta).backward()
    checked = 0
    for name, p in G.named_parameters():
        if p.dim() < 2 or name.startswith('shared'):
            assert p.grad is None, name
            continue
        w = p.detach().flatten(1)
        want = 2 * beta * ((w @ w.t()) * (1 - torch.eye(len(w)))) @ w
        assert torch.allclose(p.grad.flatten(1), want, rtol=1e-4, atol=1e-10), name
        checked += 1
    assert checked > 20


def test_ema_update_math():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = copy.deepcopy(model)
    before = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(7.0)
    bg.ema_update(ema, model, decay=0.9)
    for e, b in zip(ema.parameters(), before):  # 0.9 * e + 0.1 * (e + 1) = e + 0.1
        assert torch.allclose(e, b + 0.1, atol=1e-6)
    assert torch.equal(ema[1].running_mean, torch.full((2,), 7.0))
    bg.ema_update(ema, model, decay=0.0)  # before --ema_start: a copy
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_truncated_z_stays_within_psi_and_has_truncated_normal_spread():
    torch.manual_seed(0)
    for psi in (0.25, 0.5, 1.0, 2.0):
        z = bg.sample_z(20000, 16, psi, 'cpu')
        assert z.abs().max().item() <= psi
        phi, Phi = math.exp(-psi ** 2 / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(psi / math.sqrt(2)))
        var = 1 - 2 * psi * phi / (2 * Phi - 1)   # variance of N(0, 1) truncated to [-psi, psi]
        assert z.var().item() == pytest.approx(var, rel=0.02)
        assert abs(z.mean().item()) < 0.01
    u = torch.rand(5, 16)  # the same u: the same sample, more truncated
    small, large = bg.sample_z(5, 16, 0.25, 'cpu', u), bg.sample_z(5, 16, 1.0, 'cpu', u)
    assert torch.equal(small.sign(), large.sign()) and (small.abs() <= large.abs()).all()
    assert bg.sample_z(4, 16, 0.0, 'cpu').shape == (4, 16)  # psi 0: untruncated


# ---- the nets ------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [32, 64, 128])
def test_hierarchical_z_chunks_reach_every_block(size):
    latent = 121  # not divisible: chunks differ by at most one
    G = bg.BigGANGenerator(size, 3, latent, 2, 10, 8, attn_res=0)
    n_chunks = len(G.blocks) + 1
    assert n_chunks == {32: 4, 64: 5, 128: 6}[size]
    assert sum(G.chunks) == latent and max(G.chunks) - min(G.chunks) <= 1
    seen = {}
    G.linear.register_forward_pre_hook(lambda m, a: seen.__setitem__('linear', a[0]))
    for i, block in enumerate(G.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[1]))
    z, y = torch.randn(3, latent), torch.tensor([0, 4, 9])
    x = G(z, y)
    assert x.shape == (3, 3, size, size)
    ends = [0] + torch.tensor(G.chunks).cumsum(0).tolist()
    assert torch.equal(seen['linear'], z[:, :ends[1]])
    shared = G.shared(y)
    for i in range(len(G.blocks)):
        assert torch.equal(seen[i], torch.cat([shared, z[:, ends[i + 1]:ends[i + 2]]], 1))
    z.requires_grad_(True)
    G(z, y).square().sum().backward()  # every chunk, and the class embedding, gets a gradient
    for a, b in zip(ends[:-1], ends[1:]):
        assert z.grad[:, a:b].abs().sum() > 0
    assert G.shared.weight.grad[y].abs().sum(1).min() > 0
    # unconditional: the chunk alone is the condition
    G = bg.BigGANGenerator(size, 3, latent, 2, 0, 8, attn_res=0)
    assert G.shared is None and G.blocks[0].bn1.gain.in_features == G.chunks[1]
    assert G(z).shape == (3, 3, size, size)


def test_conditional_batchnorm_depends_on_the_class():
    torch.manual_seed(0)
    G = bg.BigGANGenerator(32, 1, 16, 2, 10, 8, attn_res=0)
    z = torch.randn(8, 16)
    with torch.no_grad():
        a, b = G(z, torch.zeros(8, dtype=torch.long)), G(z, torch.ones(8, dtype=torch.long))
    assert (a - b).abs().max() > 1e-3
    cbn = G.blocks[0].bn1  # the formula: BN(x) * (1 + W_g c) + W_b c, no biases (BigGAN's ccbn)
    assert cbn.gain.bias is None and cbn.bias.bias is None
    x, c = torch.randn(8, cbn.gain.out_features, 4, 4), torch.randn(8, cbn.gain.in_features)
    bn = nn.functional.batch_norm(x, None, None, training=True)
    want = bn * (1 + cbn.gain(c))[:, :, None, None] + cbn.bias(c)[:, :, None, None]
    assert torch.allclose(cbn(x, c), want, atol=1e-5)


def test_projection_term_equals_the_hand_formula():
    torch.manual_seed(0)
    D = bg.BigGANDiscriminator(32, 1, 2, 10, attn_res=16).eval()
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([1, 2, 3, 1])
    with torch.no_grad():
        h = D.features(x)
        want = D.linear(h).squeeze(1) + (D.embed.weight[y] * h).sum(1)   # linear(h) + embed(y) . h
        assert torch.allclose(D(x, y), want, atol=1e-5)
        assert not torch.allclose(D(x, y), D(x, torch.tensor([0, 0, 0, 0])))
        assert h.shape == (4, 8)


def test_attention_block_shape_and_zero_init_gamma():
    attn = bg.SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    assert attn.gamma.item() == 0.0
    assert torch.equal(attn(x), x)  # gamma = 0: the identity at initialisation
    with torch.no_grad():
        attn.gamma.fill_(1.0)
    out = attn(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    G = bg.BigGANGenerator(64, 3, 20, 4, 10, 8, attn_res=32)
    D = bg.BigGANDiscriminator(64, 3, 4, 10, attn_res=32)
    assert G.attn_after == 2 and G.attention.theta.in_channels == 16   # after the 32x32 block
    assert isinstance(D.blocks[1], bg.SelfAttention)                 # after the first (32x32) D block
    assert bg.BigGANGenerator(32, 3, 20, 4, 10, 8, attn_res=0).attention is None


@pytest.mark.parametrize('size', [32, 64, 128])
def test_both_archs_build_and_step_at_each_size(size):
    torch.manual_seed(0)
    for G, D, y in [(bg.BigGANGenerator(size, 3, 24, 2, 10, 8, attn_res=16),
                     bg.BigGANDiscriminator(size, 3, 2, 10, attn_res=16), torch.tensor([0, 5])),
                    (bg.SNDCGANGenerator(size, 3, 24, 2), bg.SNDCGANDiscriminator(size, 3, 2, 0.5), None)]:
        opt = torch.optim.Adam(list(G.parameters()) + list(D.parameters()), 1e-3)
        x = G(torch.randn(2, 24), y)
        assert x.shape == (2, 3, size, size)
        loss = bg.d_loss(D(torch.randn(2, 3, size, size), y), D(x, y), 'hinge')
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters()
                   if p.requires_grad and p.numel() > 1)
        before = [p.detach().clone() for p in D.parameters()]
        opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, D.parameters()))
        # every conv / linear is spectrally normalised (BigGAN's shared embedding excepted)
        layers = [m for net in (G, D) for m in net.modules()
                  if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding))]
        plain = [m for m in layers if not parametrize.is_parametrized(m, 'weight')]
        assert plain == ([G.shared] if isinstance(G, bg.BigGANGenerator) else [])


def test_sndcgan_discriminator_blocks_are_the_papers_code():
    """SN conv -> BatchNorm -> Dropout2d -> LeakyReLU for every conv but the first (SN conv,
    LeakyReLU) and the last (SN conv); --no-d_bn drops the batch norm, --dropout 0 the dropout."""
    D = bg.SNDCGANDiscriminator(128, 3, 2, 0.5)
    kinds = [type(m).__name__.replace('Parametrized', '') for m in D.net]
    convs = [i for i, k in enumerate(kinds) if k == 'Conv2d']
    assert kinds[:2] == ['Conv2d', 'LeakyReLU'] and convs[-1] == len(kinds) - 1
    for i in convs[1:-1]:
        assert kinds[i:i + 4] == ['Conv2d', 'BatchNorm2d', 'Dropout2d', 'LeakyReLU']
    assert kinds.count('BatchNorm2d') == kinds.count('Dropout2d') == len(convs) - 2 == 4
    assert all(parametrize.is_parametrized(D.net[i], 'weight') for i in convs)
    plain = [type(m).__name__ for m in bg.SNDCGANDiscriminator(32, 3, 2, 0.0, batchnorm=False).net]
    assert 'BatchNorm2d' not in plain and 'Dropout2d' not in plain
    assert [type(m).__name__ for m in bg.SNDCGANDiscriminator(32, 3, 2, 0.0).net].count('BatchNorm2d') == 2
    # channel dropout: whole feature maps are zeroed
    drop = nn.Dropout2d(0.5).train()
    out = drop(torch.ones(4, 16, 3, 3))
    assert ((out == 0).all(dim=(2, 3)) | (out == 2).all(dim=(2, 3))).all()


def test_standing_stats_keep_the_truncation_and_leave_g_alone():
    """An untrained 32 px G: at psi = 0.25 the per-pixel spread over samples, relative to psi = 0,
    is much smaller with standing statistics (batch norm normalises with N(0, I) statistics) than in
    train mode (batch statistics re-standardise the truncated batch). Sampling leaves G's
    training buffers (BN running statistics, spectral-norm vectors) and modes as they were."""
    torch.manual_seed(0)
    G = bg.BigGANGenerator(32, 3, 120, 8, 10, 128, attn_res=16)
    with torch.no_grad():                      # give G's training buffers values of their own
        G(torch.randn(64, 120), torch.randint(10, (64,)))
    before = {k: v.clone() for k, v in G.state_dict().items()}
    u, y = torch.rand(512, 120), torch.randint(10, (512,))

    def spread_ratio(standing):
        x = [bg.final_samples(G, bg.sample_z(512, 120, psi, 'cpu', u), y, 64, 10, standing)
             for psi in (0.25, 12.0)]          # psi 12: no truncation in practice
        return float(x[0].std(0).mean() / x[1].std(0).mean())

    train_mode, standing = spread_ratio(0), spread_ratio(16)
    assert standing < 0.6 * train_mode, (standing, train_mode)
    assert standing < 0.4 and train_mode > 0.5
    assert G.training and all(m.training for m in G.modules())
    assert all(m.momentum == 0.1 for m in bg.batch_norms(G))
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), k
    # deterministic: the same statistics (its own random stream) and the global stream untouched
    state = torch.random.get_rng_state()
    z = bg.sample_z(8, 120, 0.5, 'cpu', u[:8])
    assert torch.equal(bg.final_samples(G, z, y[:8], 64, 10, 4), bg.final_samples(G, z, y[:8], 64, 10, 4))
    assert torch.equal(torch.random.get_rng_state(), state)


# ---- training runs -------------------------------------------------------------------------------

def test_spectral_norm_keeps_sigma_one_after_training(biggan_run):
    """W_SN = W / sigma(W) has sigma 1 whatever the scale of W. One power iteration per forward (as in
    the SN paper and BigGAN) lags the weights a little: after these few Adam steps the stored estimate
    is within 10%, and within 2% once the power iteration has caught up with the (fixed) weights."""
    out, summary = biggan_run
    G, D, state = nets_from_checkpoint(out)
    layers = spectral_normed(G) + spectral_normed(D)
    assert len(layers) == 27 + 16  # G: 27, D: 16 (see the architecture tables)
    with torch.no_grad():
        for m in layers:
            m.eval()  # eval: the weight as the last step normalised it, vectors not updated
            assert largest_singular_value(m) == pytest.approx(1.0, rel=0.1)
            m.parametrizations.weight.original.mul_(3.0)  # raw sigma about 3; W_SN must not change
            m.train()
            for _ in range(100):
                m.weight  # noqa: B018  (each access runs one power iteration in train mode)
            m.eval()
            raw = m.parametrizations.weight.original.movedim(m.parametrizations.weight[0].dim, 0).flatten(1)
            assert torch.linalg.matrix_norm(raw.double(), 2).item() == pytest.approx(3.0, rel=0.1)
            assert largest_singular_value(m) == pytest.approx(1.0, rel=0.02)


def test_conditional_run_outputs(biggan_run):
    out, summary = biggan_run
    assert summary['iterations'] == 3
    assert 0.0 <= summary['class_accuracy'] <= 1.0 and summary['fd_digits'] > 0
    assert math.isfinite(summary['final_D']) and summary['final_ortho'] > 0
    state = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert set(state) >= {'G', 'D', 'G_ema', 'opt_G', 'opt_D'}
    assert state['opt_G']['param_groups'][0]['lr'] == 1e-4 and state['opt_D']['param_groups'][0]['lr'] == 4e-4
    assert state['opt_D']['param_groups'][0]['betas'] == (0.0, 0.999)
    # the EMA moved towards G but is not G
    key = 'linear.parametrizations.weight.original'
    assert not torch.equal(state['G_ema'][key], state['G'][key])
    with Image.open(os.path.join(out, 'samples', 'iter_000003.png')) as im:  # 10 classes x 10 columns
        assert im.size == (10 * 34 + 2, 10 * 34 + 2)
    with Image.open(os.path.join(out, 'samples', 'truncation.png')) as im:  # 4 psi x 10 classes
        assert im.size == (10 * 34 + 2, 4 * 34 + 2)


def test_sndcgan_sees_real_and_fake_in_separate_d_calls(tmp_path, data_root, monkeypatch):
    """With batch norm in D, a call on real and fake together would mix their statistics: every D
    call is one batch (real or fake), the BN default of the paper's code."""
    seen = []
    forward = bg.SNDCGANDiscriminator.forward
    monkeypatch.setattr(bg.SNDCGANDiscriminator, 'forward', lambda self, x, y=None: seen.append(len(x)) or
                        forward(self, x, y))
    train(monkeypatch, str(tmp_path / 'r'), data_root, '--arch', 'sndcgan', '--n_iters', 2)
    assert seen == [8] * 6                                    # per iteration: D(real), D(fake), D(G(z))
    state = torch.load(tmp_path / 'r' / 'ckpt.pt', weights_only=False)
    assert any('running_mean' in k for k in state['D'])       # D has batch norm by default
    train(monkeypatch, str(tmp_path / 'r2'), data_root, '--arch', 'sndcgan', '--n_iters', 1, '--no-d_bn')
    state = torch.load(tmp_path / 'r2' / 'ckpt.pt', weights_only=False)
    assert not any('running_mean' in k for k in state['D'])


def test_d_steps_take_that_many_batches_per_iteration(tmp_path, data_root, monkeypatch):
    calls = []
    real_get = common.Batches.get
    monkeypatch.setattr(common.Batches, 'get', lambda self, i: calls.append(i) or real_get(self, i))
    train(monkeypatch, str(tmp_path / 'r'), data_root, '--n_iters', 2, '--d_steps', 3, '--attn_res', 0)
    assert calls == [0, 1, 2, 3, 4, 5]


def test_sndcgan_run_with_amp(tmp_path, data_root, monkeypatch):
    summary = train(monkeypatch, str(tmp_path / 'r'), data_root, '--arch', 'sndcgan', '--n_iters', 2, '--amp',
                    '--truncation', 0.5)
    assert summary['iterations'] == 2 and math.isfinite(summary['final_D']) and math.isfinite(summary['final_G'])
    assert 'class_accuracy' not in summary and summary['fd_digits'] > 0  # sndcgan is unconditional
    state = torch.load(tmp_path / 'r' / 'ckpt.pt', weights_only=False)
    assert state['opt_G']['param_groups'][0]['lr'] == 2e-4
    assert state['opt_D']['param_groups'][0]['betas'] == (0.5, 0.999)


def test_ema_copies_g_until_ema_start(tmp_path, data_root, monkeypatch):
    train(monkeypatch, str(tmp_path / 'r'), data_root, '--arch', 'sndcgan', '--n_iters', 2, '--ema',
          '--ema_start', 3)
    state = torch.load(tmp_path / 'r' / 'ckpt.pt', weights_only=False)
    for key, value in state['G'].items():
        assert torch.equal(state['G_ema'][key], value), key


def test_biggan_amp_run(tmp_path, data_root, monkeypatch):
    summary = train(monkeypatch, str(tmp_path / 'r'), data_root, '--n_iters', 2, '--amp', '--d_steps', 1)
    assert math.isfinite(summary['final_D']) and math.isfinite(summary['final_G'])


def test_resume_equals_straight_run(tmp_path, data_root, monkeypatch):
    flags = ['--ema', '--ema_start', 2, '--attn_res', 16, '--truncation', 0.5]  # EMA averages from the split
    train(monkeypatch, str(tmp_path / 'straight'), data_root, '--n_iters', 4, *flags)
    train(monkeypatch, str(tmp_path / 'split'), data_root, '--n_iters', 2, *flags)
    train(monkeypatch, str(tmp_path / 'split'), data_root, '--n_iters', 4, '--resume', str(tmp_path / 'split'), *flags)
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=False)
    b = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=False)
    assert a['iteration'] == b['iteration'] == 4
    for net in ('G', 'D', 'G_ema'):
        for key in a[net]:
            assert torch.allclose(a[net][key].float(), b[net][key].float(), atol=1e-6), (net, key)
    with open(tmp_path / 'split' / 'metrics.csv') as f:
        assert [line.split(',')[0] for line in f.read().split()[1:]] == ['1', '2', '3', '4']


def test_torchrun_two_ranks_end_identical(tmp_path, data_root):
    result, ranks = run_torchrun_dumping_ranks('biggan_sn', TINY + ['--n_iters', 2, '--ema', '--ema_start', 1,
                                                                    '--data_root', data_root,
                                                                    '--out_dir', tmp_path / 'run'], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ranks) == 2
    for net in ('G', 'D', 'G_ema'):
        for key, value in ranks[0][net].items():
            if 'running_' in key or 'num_batches' in key:
                continue  # each rank's BN statistics come from its own batches
            assert torch.equal(value, ranks[1][net][key]), (net, key)
    assert os.path.exists(tmp_path / 'run' / 'summary.json')


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize('flags, words', [
    (['--img_size', 48], ['--img_size 48', '32, 64 and 128']),
    (['--attn_res', 12], ['--attn_res 12', '8, 16, 32']),
    (['--arch', 'sndcgan', '--img_size', 256], ['--img_size 256', 'at most 128']),
    (['--latent_dim', 3], ['--latent_dim 3', 'at least 4']),
])
def test_impossible_flags(flags, words):
    with pytest.raises(common.UserError) as e:
        bg.complete_args(bg.parser.parse_args([str(f) for f in flags]))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize('flag, value', [('--truncation', '-1'), ('--lr', '-1'), ('--lr_D', '0'),
                                         ('--ortho_reg', '-1e-4'), ('--ema_decay', '1'), ('--dropout', '1'),
                                         ('--attn_res', '-16'), ('--standing_stats', '-1'), ('--b1', '1')])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        bg.parser.parse_args([flag, value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]


def test_sync_bn_on_cpu_is_one_line_error(tmp_path, data_root):
    result = run_script('biggan_sn', ['--sync_bn', '--device', 'cpu', '--data_root', data_root,
                                      '--out_dir', tmp_path / 'r'], cwd=tmp_path)
    assert_one_line_error(result, '--sync_bn', 'CPU')
    assert not (tmp_path / 'r').exists()  # refused before a run folder is made
    result = run_script('biggan_sn', ['--dataset', 'ring8', '--out_dir', tmp_path / 'r2'], cwd=tmp_path)
    assert_one_line_error(result, 'ring8', 'image data set')


def test_fid_and_inception_score_through_fid_py(tmp_path, data_root, monkeypatch):
    """IS and FID plumbing with random Inception weights in the file pytorch-fid's name (offline):
    the conditional sampler's (images, classes) reach fid.py as images only."""
    weights = tmp_path / 'home' / 'hub' / 'checkpoints' / fid.WEIGHTS_FILE
    weights.parent.mkdir(parents=True)
    torch.save(fid.random_weights(0), weights)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'home'))
    summary = train(monkeypatch, str(tmp_path / 'r'), data_root, '--n_iters', 1, '--subset', 16, '--fid_every', 1,
                    '--fid_samples', 10, '--attn_res', 0)
    assert summary['fid'] > 0 and math.isfinite(summary['fid'])
    assert 1.0 <= summary['is_mean'] <= 1008 and summary['is_std'] >= 0
    assert 'class_accuracy' in summary

