"""BigGAN techniques with spectral norm (Iyengar, Pandey & Mehta, "Exploring Generative Adversarial
Networks: Improving training techniques"), and SN-DCGAN.

--arch biggan (default), after BigGAN (Brock, Donahue & Simonyan 2019, "Large Scale GAN Training for
High Fidelity Natural Image Synthesis") at 32, 64 or 128 px: residual up-blocks in G with
class-conditional BatchNorm (gains and biases linear in [shared class embedding, z chunk]), a
hierarchical latent (z split into one chunk for the first layer and one per block), a self-attention
block at --attn_res, residual down-blocks in D with global sum pooling and a projection term, spectral
norm on every conv and linear layer (torch.nn.utils.parametrizations), orthogonal initialisation,
hinge loss, TTUR (G 1e-4, D 4e-4, betas (0, 0.999)), --d_steps D steps per G step, orthogonal
regularisation of G (--ortho_reg), the truncation trick (--truncation) and an EMA of G (--ema).
Class-conditional when the data set has labels, unconditional otherwise.

  L_D = E relu(1 - D(x, y)) + E relu(1 + D(G(z, y'), y'))       (eq. 1, hinge)
  L_G = -E D(G(z, y'), y') + beta/2 * sum_W ||W W^T * (1 - I)||_F^2
        (eq. 2, plus the orthogonal regularisation R_beta of section 1.1.10 in BigGAN's code
        convention: its gradient is 2 beta (W W^T * (1 - I)) W, as BigGAN-PyTorch's utils.ortho
        applies it; the formula beta ||.||_F^2 as printed has twice that gradient)

Samples (grids, the truncation sheet, metrics) are G's (the EMA's with --ema) in eval mode with
BigGAN's standing statistics: every batch-norm layer's mean and variance averaged over
--standing_stats batches of z ~ N(0, I) and random classes (the z G is trained on), so batch norm
does not re-standardise a truncated z (in train mode, batch statistics of the truncated batch undo
much of the truncation). G's own batch-norm buffers are left as training left them.

--arch sndcgan: the Radford DCGAN with spectral norm on every conv, 32 to 128 px, as the paper's
authors built it: D's blocks after the first are SN conv -> BatchNorm -> Dropout2d -> LeakyReLU
(--no-d_bn drops the batch norm), --dropout the channel dropout rate (default 0.5 at 128 px, the
paper's fix there, else 0), real and fake in separate D calls (batch norm), trained as the paper did:
BCE from logits, Adam 2e-4 for both, betas (0.5, 0.999), one D step.

    python biggan_sn.py                                  # conditional BigGAN on digits, 32 px, CPU
    python biggan_sn.py --arch sndcgan                   # SN-DCGAN on digits
    python biggan_sn.py --dataset cifar10 --img_size 32 --ch 64 --ema --fid_every 5000
    torchrun --nproc_per_node 4 biggan_sn.py --sync_bn   # DDP with cross-replica BN (GPUs)
"""
import argparse
import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import common

parser = common.base_parser(__doc__)
a = parser.add_argument
a('--arch', choices=('biggan', 'sndcgan'), default='biggan', help='network family')
a('--ch', type=common.positive_int, default=None, help='width: BigGAN ch (default 8), SN-DCGAN ngf = ndf (16)')
a('--attn_res', type=common.non_negative_int, default=16,
  help='biggan: resolution of the self-attention block (0 = none)')
a('--shared_dim', type=common.positive_int, default=128, help='biggan: size of the shared class embedding')
a('--loss', choices=('hinge', 'bce'), default=None, help='GAN loss (default: hinge for biggan, bce for sndcgan)')
a('--lr_D', type=common.positive_float, default=None, help="D's learning rate; --lr is G's (default: TTUR 4e-4 "
  'and 1e-4 for biggan, 2e-4 and 2e-4 for sndcgan)')
a('--d_steps', type=common.positive_int, default=None, help='D steps per G step (default: 2 biggan, 1 sndcgan)')
a('--ortho_reg', type=common.non_negative_float, default=None,
  help='beta of the orthogonal regularisation of G, BigGAN-PyTorch\'s convention: the gradient '
       '2 beta (W W^T * (1 - I)) W, i.e. the penalty beta/2 ||W W^T * (1 - I)||_F^2 (default: 1e-4 biggan, '
       '0 sndcgan)')
a('--truncation', type=common.non_negative_float, default=0.0,
  help='psi: sample z from N(0, I) truncated to [-psi, psi] (0 = off)')
a('--standing_stats', type=common.non_negative_int, default=16,
  help="batches of z ~ N(0, I) over which G's batch-norm statistics are accumulated before sampling in "
       "eval mode (BigGAN's standing statistics; 0 = sample in train mode, batch statistics)")
a('--ema', action='store_true', help="keep an EMA of G's weights for samples and metrics")
a('--ema_decay', type=common.number_type(float, 0, 1, high_open=True, name='float'), default=0.999,
  help='EMA decay per G step, in [0, 1)')
a('--ema_start', type=common.non_negative_int, default=1000, help='G steps during which the EMA copies G '
  'before it starts averaging (BigGAN\'s --ema_start; no random-init weights left in it)')
a('--d_bn', action=argparse.BooleanOptionalAction, default=True,
  help='sndcgan: batch norm in D after every conv but the first and last, as the paper\'s code '
       '(--no-d_bn: none)')
a('--dropout', type=common.number_type(float, 0, 1, high_open=True, name='float'), default=None,
  help='sndcgan: channel dropout (Dropout2d) in D, in [0, 1) (default 0.5 at 128 px, else 0)')
a('--sync_bn', action='store_true', help='cross-replica (synchronised) BN in G under DDP; CUDA only')
parser.set_defaults(lr=None, b1=None, latent_dim=120, n_epochs=143,  # digits: 2,002 iterations
                    sample_interval=500, log_interval=100)
common.describe_default(parser, '--lr', "G's: 1e-4 for biggan (TTUR), 2e-4 for sndcgan")
common.describe_default(parser, '--b1', '0 for biggan, 0.5 for sndcgan')
ARCH_DEFAULTS = {'biggan': dict(ch=8, lr=1e-4, lr_D=4e-4, b1=0.0, d_steps=2, loss='hinge', ortho_reg=1e-4),
                 'sndcgan': dict(ch=16, lr=2e-4, lr_D=2e-4, b1=0.5, d_steps=1, loss='bce', ortho_reg=0.0)}
TRUNCATION_SHEET = (0.25, 0.5, 0.75, 1.0)

# BigGAN-PyTorch's layouts, in multiples of --ch. G: width of the 4x4 input, then each up-block's
# output width (each doubles the resolution). D: (width, downsample) of each block.
G_ARCH = {32: (4, [4, 4, 4]), 64: (16, [16, 8, 4, 2]), 128: (16, [16, 8, 4, 2, 1])}
D_ARCH = {32: [(4, True), (4, True), (4, False), (4, False)],
          64: [(1, True), (2, True), (4, True), (8, True), (16, False)],
          128: [(1, True), (2, True), (4, True), (8, True), (16, True), (16, False)]}


def sn_ortho_(net, skip=()):
    """Orthogonal init (BigGAN), then spectral norm W / sigma(W) (Miyato et al.), on every conv,
    linear and embedding layer of `net` but those in `skip`."""
    for m in list(net.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)) and not any(m is s for s in skip):
            nn.init.orthogonal_(m.weight)
            spectral_norm(m)
    return net


def conv(cin, cout, k=3, bias=True):
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; gain and bias are linear in the condition c (BigGAN's ccbn):
    BN(x) * (1 + W_g c) + W_b c, with c = [shared(y), z chunk]. The projections have no bias, as
    BigGAN-PyTorch's (which_linear with bias=False when the embedding is shared): the constant gain
    1 and bias 0 are the identity BN starts from."""

    def __init__(self, features, cond_dim):
        super().__init__()
        self.bn = nn.BatchNorm2d(features, affine=False)
        self.gain = nn.Linear(cond_dim, features, bias=False)
        self.bias = nn.Linear(cond_dim, features, bias=False)

    def forward(self, x, c):
        return self.bn(x) * (1 + self.gain(c)[:, :, None, None]) + self.bias(c)[:, :, None, None]


class GBlock(nn.Module):
    """BigGAN up-block: cBN, ReLU, 2x nearest upsampling, 3x3 conv, cBN, ReLU, 3x3 conv; 1x1-conv shortcut."""

    def __init__(self, cin, cout, cond_dim):
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm(cin, cond_dim), ConditionalBatchNorm(cout, cond_dim)
        self.conv1, self.conv2, self.shortcut = conv(cin, cout), conv(cout, cout), conv(cin, cout, 1)

    def forward(self, x, c):
        h = F.interpolate(F.relu(self.bn1(x, c)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), c)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """BigGAN down-block: (ReLU), 3x3 conv, ReLU, 3x3 conv, 2x2 average pool; 1x1-conv shortcut.
    The first block has no pre-activation and pools before its shortcut conv."""

    def __init__(self, cin, cout, downsample, preactivation):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1, self.conv2 = conv(cin, cout), conv(cout, cout)
        self.shortcut = conv(cin, cout, 1) if cin != cout or downsample else None

    def forward(self, x):
        pool = (lambda t: F.avg_pool2d(t, 2)) if self.downsample else (lambda t: t)
        h = pool(self.conv2(F.relu(self.conv1(F.relu(x) if self.preactivation else x))))
        if self.shortcut is not None:
            x = pool(self.shortcut(x)) if self.preactivation else self.shortcut(pool(x))
        return h + x


class SelfAttention(nn.Module):
    """SAGAN's non-local block: o = softmax(theta(x)^T phi(x)) g(x), out = x + gamma * W_o o, with
    phi and g max-pooled 2x and gamma initialised to 0 (the block starts as the identity)."""

    def __init__(self, ch):
        super().__init__()
        key, value = max(ch // 8, 1), max(ch // 2, 1)  # at least one channel in narrow nets
        self.theta, self.phi = conv(ch, key, 1, bias=False), conv(ch, key, 1, bias=False)
        self.g, self.o = conv(ch, value, 1, bias=False), conv(value, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        B, _, H, W = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)[:, None]                 # (B, 1, HW, C/8)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2).transpose(1, 2)[:, None]    # (B, 1, HW/4, C/8)
        g = F.max_pool2d(self.g(x), 2).flatten(2).transpose(1, 2)[:, None]        # (B, 1, HW/4, C/2)
        o = F.scaled_dot_product_attention(theta, phi, g, scale=1.0)              # unscaled, as SAGAN
        return x + self.gamma * self.o(o[:, 0].transpose(1, 2).reshape(B, -1, H, W))


class BigGANGenerator(nn.Module):
    """z (B, latent_dim), y (B,) or None -> images (B, C, S, S). z is split into chunks: the first
    feeds the linear layer, chunk i + 1 joins the shared class embedding as block i's condition."""

    def __init__(self, img_size, channels, latent_dim, ch, n_classes, shared_dim, attn_res):
        super().__init__()
        first, widths = G_ARCH[img_size]
        self.first = first * ch
        self.chunks = [len(c) for c in torch.arange(latent_dim).tensor_split(len(widths) + 1)]
        self.shared = nn.Embedding(n_classes, shared_dim) if n_classes else None
        embed_dim = shared_dim if n_classes else 0
        self.linear = nn.Linear(self.chunks[0], self.first * 16)
        cins = [first] + widths[:-1]
        self.blocks = nn.ModuleList(GBlock(cin * ch, cout * ch, embed_dim + chunk)
                                    for cin, cout, chunk in zip(cins, widths, self.chunks[1:]))
        resolutions = [8 * 2 ** i for i in range(len(widths))]
        self.attn_after = resolutions.index(attn_res) if attn_res in resolutions else None
        self.attention = SelfAttention(widths[self.attn_after] * ch) if self.attn_after is not None else None
        self.out = nn.Sequential(nn.BatchNorm2d(widths[-1] * ch), nn.ReLU(), conv(widths[-1] * ch, channels))
        sn_ortho_(self, skip=[self.shared])   # BigGAN's shared embedding has no spectral norm
        if self.shared is not None:
            nn.init.orthogonal_(self.shared.weight)

    def forward(self, z, y=None):
        chunks = z.split(self.chunks, 1)
        h = self.linear(chunks[0]).view(len(z), self.first, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, chunks[i + 1] if y is None else torch.cat([self.shared(y), chunks[i + 1]], 1))
            if i == self.attn_after:
                h = self.attention(h)
        return torch.tanh(self.out(h))


class BigGANDiscriminator(nn.Module):
    """Images (B, C, S, S), y (B,) or None -> logits (B,): residual down-blocks, ReLU, global sum
    pooling h, then linear(h) + embed(y) . h (the projection discriminator of Miyato & Koyama)."""

    def __init__(self, img_size, channels, ch, n_classes, attn_res):
        super().__init__()
        blocks, cin, res = [], channels, img_size
        for i, (width, downsample) in enumerate(D_ARCH[img_size]):
            blocks.append(DBlock(cin, width * ch, downsample, preactivation=i > 0))
            cin, res = width * ch, res // 2 if downsample else res
            if res == attn_res and not any(isinstance(b, SelfAttention) for b in blocks):
                blocks.append(SelfAttention(cin))
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, 1)
        self.embed = nn.Embedding(n_classes, cin) if n_classes else None
        sn_ortho_(self)

    def features(self, x):
        return F.relu(self.blocks(x)).sum([2, 3])

    def forward(self, x, y=None):
        h = self.features(x)
        out = self.linear(h).squeeze(1)
        return out if self.embed is None else out + (self.embed(y) * h).sum(1)


class SNDCGANGenerator(nn.Module):
    """Radford's DCGAN generator (transposed convs, BN, ReLU, Tanh) with spectral norm on every conv."""

    def __init__(self, img_size, channels, latent_dim, ngf):
        super().__init__()
        width, size = ngf * img_size // 8, 4
        layers = [nn.ConvTranspose2d(latent_dim, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        while size * 2 < img_size:
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU()]
            width, size = width // 2, size * 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = common.dcgan_init_(nn.Sequential(*layers))
        for m in self.net:
            if isinstance(m, nn.ConvTranspose2d):
                spectral_norm(m)

    def forward(self, z, y=None):
        return self.net(z[:, :, None, None])


class SNDCGANDiscriminator(nn.Module):
    """Radford's DCGAN discriminator with spectral norm added on every conv. Every block but the
    first and the last is the paper's code's: SN conv -> BatchNorm -> Dropout2d -> LeakyReLU 0.2
    (batchnorm=False: no BatchNorm; dropout 0: no Dropout2d)."""

    def __init__(self, img_size, channels, ndf, dropout, batchnorm=True):
        super().__init__()
        width, size = ndf, img_size // 2
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        while size > 4:
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(width * 2)] if batchnorm else []
            layers += [nn.Dropout2d(dropout)] if dropout else []
            layers += [nn.LeakyReLU(0.2)]
            width, size = width * 2, size // 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.net = common.dcgan_init_(nn.Sequential(*layers))
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                spectral_norm(m)

    def forward(self, x, y=None):
        return self.net(x).view(-1)


def d_loss(real_logits, fake_logits, kind):
    """hinge: E relu(1 - D(x)) + E relu(1 + D(G(z))) (eq. 1); bce: BCE(D(x), 1) + BCE(D(G(z)), 0)."""
    if kind == 'hinge':
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits, kind):
    """hinge: -E D(G(z)) (eq. 2); bce: the non-saturating BCE(D(G(z)), 1)."""
    if kind == 'hinge':
        return -fake_logits.mean()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def orthogonal_penalty(net, beta):
    """beta/2 * sum_W ||W W^T * (1 - I)||_F^2 over G's weights: the orthogonal regularisation R_beta
    (section 1.1.10) with the gradient 2 beta (W W^T * (1 - I)) W that BigGAN-PyTorch's utils.ortho
    adds to each weight's gradient (the printed beta ||.||_F^2 has 4 beta (W W^T * (1 - I)) W, so
    its beta = 1e-4 would be the code's 2e-4). Each W is a matrix with one row per output unit (the
    filters' Gram matrix, diagonal masked). Under spectral norm W is the raw weight; the shared
    embedding is left out, as in BigGAN."""
    total = 0.0
    for name, p in net.named_parameters():
        if p.dim() >= 2 and not name.startswith('shared'):
            w = p.float().flatten(1)
            gram = w @ w.t()
            total = total + (gram - torch.diag_embed(gram.diagonal())).pow(2).sum()
    return beta / 2 * total


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for the parameters; buffers (BN statistics, the
    spectral-norm power-iteration vectors) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def sample_z(n, latent_dim, psi, device, u=None):
    """z ~ N(0, I); with truncation psi > 0, N(0, I) truncated to [-psi, psi] (the truncation trick,
    resampling every |z_i| > psi): drawn by inverse CDF, z = Phi^-1(Phi(-psi) + u (1 - 2 Phi(-psi))),
    u ~ U(0, 1), so no resampling loop, and one u gives the same sample's z at every psi."""
    if not psi:
        return torch.randn(n, latent_dim, device=device)
    u = torch.rand(n, latent_dim, device=device) if u is None else u
    low = torch.special.ndtr(torch.tensor(-psi, dtype=torch.float64)).item()
    return torch.special.ndtri(low + u.double() * (1 - 2 * low)).float().clamp_(-psi, psi)


def batch_norms(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def standing_stats(G, batches):
    """G in eval mode with BigGAN's standing statistics (Brock et al. 2019; BigGAN-PyTorch's
    utils.accumulate_standing_stats): every batch-norm layer's running statistics are reset and
    averaged over the forward passes of `batches` ((z, y) pairs; momentum None is a cumulative
    average), in train mode for batch norm only and without gradient; then everything runs in eval
    mode, so each sample is normalised by those statistics, not by its batch's. The rest of G stays
    in eval mode throughout (no spectral-norm power iteration). On exit G's buffers (the training's
    running statistics, spectral-norm vectors), momenta and modes are as they were."""
    norms = batch_norms(G)
    saved, modes, momenta = [b.clone() for b in G.buffers()], [m.training for m in G.modules()], \
        [m.momentum for m in norms]
    try:
        with torch.no_grad():
            G.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for z, y in batches:
                G(z, y)
            for m in norms:
                m.eval()
        yield G
    finally:
        with torch.no_grad():
            for b, s in zip(G.buffers(), saved):
                b.copy_(s)
        for m, mode in zip(G.modules(), modes):
            m.training = mode
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def final_samples(G, z, y, batch_size, n_classes, standing_batches, seed=0):
    """Samples of G for latents z (n, latent_dim), truncated or not, and classes y (n,) (None when
    unconditional), in chunks of batch_size, without side effects on G or the random streams.

    standing_batches > 0: BigGAN's standing statistics over that many batches of z ~ N(0, I) (the z
    G is trained on, whatever the truncation of z: statistics of truncated z would re-standardise
    the truncated activations, as train mode does) and uniform random classes, drawn from a
    generator of their own seeded with `seed` (the same statistics at every call on the same G);
    then G in eval mode. 0: G in train mode, each chunk normalised by its own batch statistics.
    """
    device = z.device

    def accumulation_batches():
        g = torch.Generator(device).manual_seed(seed)
        for _ in range(standing_batches):
            yield (torch.randn(batch_size, z.shape[1], device=device, generator=g),
                   torch.randint(n_classes, (batch_size,), device=device, generator=g) if n_classes else None)

    context = standing_stats(G, accumulation_batches()) if standing_batches else common.sampling(G)
    with context, torch.no_grad():
        ys = y.split(batch_size) if y is not None else [None] * len(z.split(batch_size))
        return torch.cat([G(zc, yc) for zc, yc in zip(z.split(batch_size), ys)])


def complete_args(args):
    """Fill the per-arch defaults (ARCH_DEFAULTS) left as None, then reject impossible flag values,
    before a run folder is made."""
    for name, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dropout is None:
        args.dropout = 0.5 if args.arch == 'sndcgan' and args.img_size >= 128 else 0.0
    if args.arch == 'biggan':
        if args.img_size not in G_ARCH:
            raise common.UserError(f'--img_size {args.img_size}: --arch biggan has architectures for 32, 64 and '
                                   f'128 px; pick one of those (or --arch sndcgan)')
        sizes = [8 * 2 ** i for i in range(len(G_ARCH[args.img_size][1]))]
        if args.attn_res and args.attn_res not in sizes:
            raise common.UserError(f'--attn_res {args.attn_res}: at {args.img_size} px G has blocks at '
                                   f'{", ".join(map(str, sizes))}; pick one of those, or 0 for none')
        if args.latent_dim < len(sizes) + 1:
            raise common.UserError(f'--latent_dim {args.latent_dim} cannot be split into the {len(sizes) + 1} chunks '
                                   f'of the hierarchical latent: use at least {len(sizes) + 1}')
    else:
        common.check_image_size(args.img_size, smallest=32, largest=128)
    if args.sync_bn and common.resolve_device(args.device).type != 'cuda':
        raise common.UserError('--sync_bn needs CUDA: torch\'s SyncBatchNorm rejects CPU modules; '
                               'drop --sync_bn on CPU')
    return args


def build_nets(args, channels, n_classes):
    if args.arch == 'biggan':
        return (BigGANGenerator(args.img_size, channels, args.latent_dim, args.ch, n_classes, args.shared_dim,
                                args.attn_res),
                BigGANDiscriminator(args.img_size, channels, args.ch, n_classes, args.attn_res))
    return (SNDCGANGenerator(args.img_size, channels, args.latent_dim, args.ch),
            SNDCGANDiscriminator(args.img_size, channels, args.ch, args.dropout, args.d_bn))


def main():
    args = complete_args(common.parse_args(parser))
    run = common.Run(args, 'biggan_sn')
    data = run.load_data()
    if data.is_2d:
        raise common.UserError(f'biggan_sn.py trains conv nets on images; {data.name} is 2-D: pick an image data set')
    batches = run.batches(data)
    run.per_epoch = max(1, batches.per_epoch // args.d_steps)  # one iteration = d_steps batches + a G step
    run.n_iters = args.n_iters or args.n_epochs * run.per_epoch
    evaluator = common.Evaluator(data, args, run.device)
    fid_tracker, evaluator.fid_tracker = evaluator.fid_tracker, None  # FID and IS in one pass, below
    n_classes = data.n_classes if args.arch == 'biggan' and data.y is not None else 0

    G_raw, D_raw = build_nets(args, data.shape[0], n_classes)
    if args.sync_bn:
        G_raw = nn.SyncBatchNorm.convert_sync_batchnorm(G_raw)
    G, D = run.prepare(G_raw), run.prepare(D_raw)
    G_ema = copy.deepcopy(G_raw).requires_grad_(False) if args.ema else None
    opt_G = torch.optim.Adam(G_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))     # TTUR: two
    opt_D = torch.optim.Adam(D_raw.parameters(), lr=args.lr_D, betas=(args.b1, args.b2))  # learning rates
    nets = dict(G=G_raw, D=D_raw, opt_G=opt_G, opt_D=opt_D, **({'G_ema': G_ema} if args.ema else {}))
    dev, G_sample = run.device, (G_ema if args.ema else G_raw)
    rows = min(n_classes, 10) if n_classes else 8  # sample grid: one row per class (up to 10)
    fixed_y = torch.arange(rows, device=dev).repeat_interleave(10) * (n_classes // rows) if n_classes else None
    fixed_z = sample_z(rows * (10 if n_classes else 8), args.latent_dim, args.truncation, dev)
    start = run.resume(**nets)  # after every random draw of the set-up, so resumed RNG streams match

    def labels(n):
        return torch.randint(n_classes, (n,), device=dev) if n_classes else None

    def generate(z, y):
        """The final samples for latents z (truncated by sample_z or not) and classes y (None when
        unconditional): G's EMA with --ema, else G; eval mode with --standing_stats batches of
        standing statistics (else train mode); no side effects on G or the random streams."""
        return final_samples(G_sample, z, y, args.batch_size, n_classes, args.standing_stats, args.seed)

    def sample_images(n, y=None):
        """n final samples with z at --truncation (drawn from the global RNG), and their classes:
        y as given, else balanced classes when conditional (None when unconditional)."""
        if n_classes and y is None:
            y = torch.arange(n, device=dev) % n_classes
        return generate(sample_z(n, args.latent_dim, args.truncation, dev), y), y

    def sample_fn(n):  # for the metrics: (samples, classes asked for) when conditional
        x, y = sample_images(n)
        return (x, y) if n_classes else x

    def images_fn(n):  # fid.py wants images only
        return sample_fn(n)[0] if n_classes else sample_fn(n)

    if args.generate:   # --generate N: final samples (EMA, truncation, standing statistics), no training
        return common.write_generated(run, lambda n, y: sample_images(n, y)[0][None], n_classes, chunk=1000)

    zero = torch.zeros((), device=dev)
    loss_D = loss_G = ortho = zero
    metrics = {}
    for it in run.iterations(start):
        # ---- D: --d_steps steps, each on a fresh real batch and fresh fakes ------------------
        for s in range(args.d_steps):
            real, y_real = batches.get(it * args.d_steps + s)
            B = len(real)
            y_fake = labels(B)
            with torch.no_grad(), run.autocast():
                fake = G_raw(torch.randn(B, args.latent_dim, device=dev), y_fake)
            with run.autocast():  # real and fake in separate D calls: SN-DCGAN's D has batch norm
                loss_D = d_loss(D(real, y_real).float(), D(fake.to(real.dtype), y_fake).float(), args.loss)
            run.step(loss_D, opt_D)

        # ---- G: adversarial loss (eq. 2) + orthogonal regularisation ---------------------------
        y_fake = labels(B)
        D_raw.requires_grad_(False)  # D's weights get no gradient in G's step (plain D: no DDP sync)
        with run.autocast():
            loss_G = g_loss(D_raw(G(torch.randn(B, args.latent_dim, device=dev), y_fake), y_fake).float(), args.loss)
        ortho = orthogonal_penalty(G_raw, args.ortho_reg) if args.ortho_reg else zero   # beta/2 ||.||^2
        run.step(loss_G + ortho, opt_G)
        D_raw.requires_grad_(True)
        if G_ema is not None:  # a copy of G for the first --ema_start G steps, then the average
            ema_update(G_ema, G_raw, args.ema_decay if it >= args.ema_start else 0.0)

        if run.due(it, args.ckpt_interval):
            run.save_checkpoint(it, **nets)
        metrics = evaluator.due(it, run.n_iters, sample_fn)
        if fid_tracker is not None and run.due(it, args.fid_every):  # FID and Inception Score via fid.py
            with evaluator.fixed_rng():
                metrics.update(fid_tracker.scores(images_fn, isc=True))
        if metrics or run.due(it, args.log_interval):
            run.log(it, {'D': loss_D, 'G': loss_G.detach(), 'ortho': ortho.detach()}, metrics)
        if run.due(it, args.sample_interval):
            run.save_samples(it, generate(fixed_z, fixed_y).view(rows, -1, *data.shape))

    # truncation sheet: one row per psi, the same u (so the same samples) in every row
    cols = min(n_classes, 10) if n_classes else 10
    u = torch.rand(cols, args.latent_dim, device=dev)
    y = torch.arange(cols, device=dev) * (n_classes // cols) if n_classes else None
    sheet = torch.stack([generate(sample_z(cols, args.latent_dim, psi, dev, u), y) for psi in TRUNCATION_SHEET])
    if run.is_main:
        common.save_sample_grid(f'{run.out_dir}/samples/truncation.png', sheet)
    run.finish(run.n_iters - 1, metrics)


if __name__ == '__main__':
    common.run_main(main)
