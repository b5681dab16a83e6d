"""PMGAN: paralleled mix-generator GAN with balance control (Xiao & Rajasekaran, "PMGAN: Paralleled
Mix-Generator Generative Adversarial Networks with Balance Control").

K generators, a discriminator D (real vs fake) and a classifier C (K-way softmax: which generator
made this sample?). With --share_dc (default) C is a second head on D's body. Losses (eq. 2, with
the signs the OCR-damaged print loses read as below; t = --trunc, s_k = logit D(G_k(z))):
    L_D   = BCE(D(x), 1) + (1/K) sum_k BCE(D(G_k(z)), 0)
    L_C   = (1/K) sum_k CE(C(G_k(z)), k)
    L_G_k = -E clamp(s_k, max=logit(t)) + beta_k * CE(C(G_k(z)), k)
The first G term is the paper's reverse-KL loss log(1 - D) - log D = -logit D, truncated where
D > t. The balance term beta (eq. 3-4) is recomputed each step, without gradient, from the
current batch:  J^D_k = E log D(x) + E log(1 - D(G_k(z))),  J^C_k = E log C_k(G_k(z)),
    w = softmax(J^D),  d_k = sigmoid(J^D_k),  c_k = J^C_k,
    beta_k = w_k exp(-(c_k / d_k - lambda)),  beta = s * softmax(beta) * exp(-alpha * step)
(lambda = --diversity, s = --beta_scale, alpha = --beta_decay). The paper's renormalisation (the
softmax after eq. 4) makes the weights sum to 1, about 1/K each, while its experiments say "beta is
set to 1 at the beginning, with decay": --beta_scale s sets their sum. --beta_mode const uses
beta_k = --beta for every generator (MGAN-style).

Parallel (torchrun): rank r owns the generators k with k mod W == r and trains only those; D and
C are data-parallel (DDP); every rank shows D and C the fakes of all K generators (all-gathered,
the paper's "shared memory slots"), so D's batch norm sees the same fake batch as in one process
and every rank computes the same beta. The checkpoint holds one state per generator, so a run
resumes on any W.

    python pmgan.py                                       # ring8, K = 8, a few CPU minutes
    python pmgan.py --dataset grid25 --n_gen 25
    python pmgan.py --dataset stacked-digits --n_gen 8    # DCGAN nets, modes of 1000
    torchrun --nproc_per_node 2 pmgan.py --n_gen 3        # generators split 2 / 1
"""
import argparse
import contextlib
import math
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

parser = common.base_parser(__doc__, dataset='ring8')
parser.add_argument('--n_gen', type=common.positive_int, default=8, help='number of generators K')
parser.add_argument('--gen_batch', type=common.non_negative_int, default=0,
                    help='fake samples per generator per step (0 = batch_size // K, at least 1)')
parser.add_argument('--share_dc', action=argparse.BooleanOptionalAction, default=True,
                    help='C is a second head on D\'s body (--no-share_dc: a separate net)')
parser.add_argument('--trunc', type=common.number_type(float, 0, 1, low_open=True, high_open=True, name='float'),
                    default=0.99, help='t in (0, 1): truncate the G loss where D > t')
parser.add_argument('--beta_mode', choices=('balance', 'const'), default='balance',
                    help='balance: eq. 3-4; const: beta_k = --beta for every generator')
parser.add_argument('--beta', type=common.non_negative_float, default=1.0, help='beta_k for --beta_mode const')
parser.add_argument('--beta_scale', type=common.non_negative_float, default=1.0,
                    help='s: balance beta = s * softmax(eq. 4), so the K weights sum to s (before the decay)')
parser.add_argument('--beta_decay', type=common.non_negative_float, default=0.0,
                    help='alpha: beta times exp(-alpha * step)')
parser.add_argument('--diversity', type=common.number_type(float, name='float'), default=0.0,
                    help='lambda, the diversity factor of eq. 4')
parser.add_argument('--width', type=common.non_negative_int, default=0,
                    help='hidden width of the MLP nets (2-D; default 128) or ngf = ndf of the DCGAN nets '
                         '(images; default 64); 0 = those defaults')
parser.set_defaults(batch_size=256, img_size=16, n_epochs=None, sample_interval=1000, log_interval=200)
DEFAULT_EPOCHS = {'ring8': 15, 'grid25': 15, 'digits': 200}   # about 6k, 6k and 1.4k iterations
common.describe_default(parser, '--n_epochs', '15 on ring8 and grid25, 200 on digits, 20 otherwise')


# ---- losses and the balance term ----------------------------------------------------------

def generator_loss(d_logits, c_logits, beta, labels, trunc):
    """L_G_k for each generator (eq. 2, signs as the module docstring reads them), from logits.

    d_logits (K, m): D's logits on generator k's m samples; c_logits (K, m, n_classes): C's;
    beta (K,) and labels (K,) (generator k's class, its global index). Returns (K,) losses and
    the two terms: adversarial -E clamp(s_k, max=logit(t)) and classification CE(C(G_k(z)), k).
    """
    adversarial = -d_logits.clamp(max=math.log(trunc / (1 - trunc))).mean(1)
    m = d_logits.shape[1]
    ce = F.cross_entropy(c_logits.flatten(0, 1), labels.repeat_interleave(m), reduction='none')
    classification = ce.view(-1, m).mean(1)
    return adversarial + beta * classification, adversarial, classification


@torch.no_grad()
def balance_beta(JD, JC, diversity, scale=1.0):
    """beta of eq. 3-4 and its renormalisation, times `scale`, for all K generators, without gradient.

    The raw term b_k overflows early in training (J^C_k is very negative while C is untrained
    and d_k is small), so it is kept as its log L_k = log b_k, in float64. The renormalisation
    softmax(b) is shift-invariant: softmax(b) = softmax(b - max b), and b_k - max b =
    -exp(M + log(1 - exp(L_k - M))) with M = max L is at worst -inf, never inf or NaN. This is
    exact (no clamp, which would tie saturated generators). Where d_k underflows to 0 (J^D_k below
    about -745) with c_k < 0, L_k is +inf: it is set to the largest float64, so that generator's b_k
    is the largest (ties share beta); c_k = 0 contributes 0 whatever d_k. The softmax sums to 1;
    `scale` (--beta_scale s) makes the sum s.
    """
    JD, JC = JD.double(), JC.double()
    log_w = torch.log_softmax(JD, 0)                      # w_k = exp J^D_k / sum_i exp J^D_i  (3)
    d = torch.sigmoid(JD)                                 # d_k = sigma(J^D_k)                 (3)
    ratio = torch.where(JC == 0, torch.zeros_like(JC), JC / d)          # c_k / d_k
    L = log_w - (ratio - diversity)                       # log b_k, b_k = w_k exp(-(c_k/d_k - lambda)) (4)
    L = torch.where(L == math.inf, torch.finfo(L.dtype).max, L)   # d_k underflowed: b_k the largest
    M = L.max()
    shifted = -torch.exp(M + torch.log1p(-torch.exp(L - M)))   # b_k - max b, without overflow
    return (scale * torch.softmax(shifted, 0)).float()    # beta_k = s exp b_k / sum_i exp b_i


# ---- nets --------------------------------------------------------------------------------

class DiscriminatorClassifier(nn.Module):
    """D's real/fake logit and C's K logits from one call. Shared (--share_dc): one net whose head
    has 1 + K outputs, the first D's and the rest C's (a second head on the same body). Separate:
    two nets of the same shape run as a 2-member ensemble (net 0 is D, net 1 is C)."""

    def __init__(self, net, shared):
        super().__init__()
        self.net, self.shared = net, shared

    def forward(self, x):
        out = self.net(x).float()
        if self.shared:
            return out[:, 0], out[:, 1:]
        return out[0, :, 0], out[1, :, 1:]


def build_generators(args, data, n):
    if data.is_2d:   # a small MLP, no batch norm, no tanh: the points live on [-4, 4]^2
        return common.MLPGenerators(n, args.latent_dim, data.shape, hidden=(args.width,) * 2,
                                    batchnorm=False, tanh=False)
    return common.DCGANGenerators(n, args.latent_dim, args.img_size, data.shape[0], ngf=args.width)


def build_dc(args, data):
    n_out, n_nets = 1 + args.n_gen, 1 if args.share_dc else 2
    if data.is_2d:
        net = common.MLPDiscriminator(data.shape, hidden=(args.width,) * 2, n_out=n_out, n_nets=n_nets)
    else:
        net = common.DCGANDiscriminator(args.img_size, data.shape[0], ndf=args.width, n_out=n_out,
                                        n_nets=n_nets)
    return DiscriminatorClassifier(net, args.share_dc)


@contextlib.contextmanager
def frozen(net):
    """No parameter gradients for `net` inside (the generator step does not train D and C)."""
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        yield net
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


# ---- one state per generator: ensembles hold member k as slice k of every tensor's first axis ----

def split_members(tree, n):
    """A state dict (nets or optimizers) of an n-member ensemble -> n per-member state dicts."""
    if torch.is_tensor(tree) and tree.dim() > 0:
        return [t.clone() for t in tree.reshape(n, -1, *tree.shape[1:]).unbind(0)]
    if isinstance(tree, dict):
        parts = {key: split_members(value, n) for key, value in tree.items()}
        return [{key: parts[key][i] for key in tree} for i in range(n)]
    if isinstance(tree, (list, tuple)):
        parts = [split_members(value, n) for value in tree]
        return [type(tree)(p[i] for p in parts) for i in range(n)]
    return [tree] * n   # numbers, strings, 0-dim tensors (Adam's step): shared by all members


def join_members(trees):
    """The inverse of split_members: per-member state dicts -> one ensemble state dict."""
    first = trees[0]
    if torch.is_tensor(first) and first.dim() > 0:
        return torch.cat(trees)
    if isinstance(first, dict):
        return {key: join_members([t[key] for t in trees]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(join_members([t[i] for t in trees]) for i in range(len(first)))
    return first


class PerGenerator:
    """Checkpoint view of this rank's share of the generators (or of their optimizer): saved as
    a list of K per-generator states, gathered to rank 0 by collect(); other ranks know only their
    own (None elsewhere). Loading takes each rank's share back, whatever W wrote the checkpoint."""

    def __init__(self, obj, owned, n_gen, ddp):
        self.obj, self.owned, self.n_gen, self.ddp, self.states = obj, owned, n_gen, ddp, None

    def collect(self):   # every rank: run.save_checkpoint calls it
        cpu = lambda t: t.detach().cpu() if torch.is_tensor(t) else t
        mine = dict(zip(self.owned, split_members(self.obj.state_dict(), len(self.owned))))
        mine = {k: _tree_map(cpu, s) for k, s in mine.items()}
        shares = [mine]
        if self.ddp:
            shares = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(mine, shares, dst=0)
            shares = shares or [mine]
        everyone = {k: s for share in shares for k, s in share.items()}
        self.states = [everyone.get(k) for k in range(self.n_gen)]

    def state_dict(self):
        return self.states

    def load_state_dict(self, states):
        if len(states) != self.n_gen:
            raise common.UserError(f'the checkpoint holds {len(states)} generators but --n_gen is '
                                   f'{self.n_gen}: resume with --n_gen {len(states)}')
        self.obj.load_state_dict(join_members([states[k] for k in self.owned]))


def _tree_map(fn, tree):
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return fn(tree)


class Slots:
    """The paper's shared-memory 'progress' slots (section 3.3): beta, J^D, J^C of all K generators from the
    last step (identical on every rank); checkpointed for inspection, recomputed every step."""

    def __init__(self, **values):
        self.values = values

    def state_dict(self):
        return {k: v.detach().cpu() for k, v in self.values.items()}

    def load_state_dict(self, state):
        self.values = dict(state)


def gather_generators(local, run, n_gen):
    """(K_r, ...) values of this rank's generators -> (K, ...) for all K, in generator order.
    Ranks own generators r, r + W, r + 2W, ...; shares are padded to one size for all_gather."""
    if not run.ddp:
        return local
    W, slots = run.world_size, -(-n_gen // run.world_size)
    padded = local.new_zeros(slots, *local.shape[1:])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(W)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:n_gen]   # slot j of rank r is generator j * W + r


def gather_fakes(fakes, run, n_gen, owned):
    """This rank's fakes (K_r, m, ...) -> the fakes of all K generators (K, m, ...), the same on every
    rank, in generator order. The rank's own slots keep their autograd graph, so a loss on all K
    sends gradient to this rank's generators only; the other ranks' fakes are constants here."""
    if not run.ddp:
        return fakes
    everyone = gather_generators(fakes.detach().float(), run, n_gen)   # gloo has no bf16 all_gather
    return everyone.index_copy(0, torch.tensor(owned, device=fakes.device), fakes.float())


def dc_losses(dc, real, fakes, is_2d, autocast=contextlib.nullcontext):
    """L_D and L_C on a real batch (B, ...) and the fakes of all K generators (K, m, ...), and the
    terms beta needs: BCE(D(x), 1), BCE(D(G_k(z)), 0) (K,) and CE(C(G_k(z)), k) (K,)."""
    K, m, B = len(fakes), fakes.shape[1], len(real)
    with autocast():
        fake_in = fakes.flatten(0, 1).to(real.dtype)
        if is_2d:   # MLP nets, no batch norm: real and fake together, one call
            d_out, c_out = dc(torch.cat([real, fake_in]))
        else:       # batch norm in D: all-real and all-fake batches (Radford et al.), the fake one
            (d_r, c_r), (d_f, c_f) = dc(real), dc(fake_in)    # as the G step sees it
            d_out, c_out = torch.cat([d_r, d_f]), torch.cat([c_r, c_f])
    d_real, d_fake, c_fake = d_out[:B], d_out[B:].view(K, m), c_out[B:].view(K, m, K)
    labels = torch.arange(K, device=real.device).repeat_interleave(m)       # generator k's class is k
    bce_real = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
    bce_fake = F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake), reduction='none').mean(1)
    ce_fake = F.cross_entropy(c_fake.flatten(0, 1), labels, reduction='none').view(K, m).mean(1)
    return bce_real + bce_fake.mean(), ce_fake.mean(), bce_real, bce_fake, ce_fake


def train_step(it, real, z, nets, args, run, is_2d):
    """One iteration on this rank, in the paper's order: G_k(z) for this rank's generators (z (K_r, m,
    latent)); one D/C step on the fakes of all K generators; beta from that step's batch (eq. 3-4);
    one G step through the updated D/C. `nets`: generators, dc (DDP-wrapped), dc_raw, opt_G, opt_DC,
    owned. Returns the losses (all K generators, the same on every rank) and beta, J^D, J^C."""
    K = args.n_gen
    with run.autocast():
        fakes = nets.generators(z)                                         # (K_r, m, ...)
    everyone = gather_fakes(fakes, run, K, nets.owned)                      # (K, m, ...)

    # ---- D and C: all K generators' fakes, on every rank: DDP's mean of the gradients is the
    # mean over ranks of the real term and the (identical) (1/K) sum_k fake terms
    loss_D, loss_C, bce_real, bce_fake, ce_fake = dc_losses(nets.dc, real, everyone.detach(), is_2d, run.autocast)
    run.step(loss_D + loss_C, nets.opt_DC)

    # ---- balance term from this batch (eq. 3-4): the same beta on every rank ------------------
    with torch.no_grad():
        log_d_real = run.all_reduce_mean(-bce_real.detach())              # E log D(x), whole batch
        JD, JC = log_d_real - bce_fake.detach(), -ce_fake.detach()        # J^D_k, J^C_k  (K,)
        if args.beta_mode == 'balance':
            beta = balance_beta(JD, JC, args.diversity, args.beta_scale)
        else:
            beta = torch.full((K,), args.beta, device=real.device)
        beta = beta * math.exp(-args.beta_decay * it)

    # ---- generators: reverse-KL term (truncated) + beta_k * classifier term --------------------
    # D/C sees all K generators' fakes, as in the D step; the sum over all K reaches this rank's
    # generators only (and through D's batch statistics, exactly as in one process)
    m = everyone.shape[1]
    with frozen(nets.dc_raw), run.autocast():
        d_g, c_g = nets.dc_raw(everyone.flatten(0, 1))
    loss_G = generator_loss(d_g.view(K, m), c_g.view(K, m, K), beta, torch.arange(K, device=real.device),
                            args.trunc)[0]
    run.step(loss_G.sum(), nets.opt_G)   # the sum: each generator gets only its own gradient
    return dict(D=loss_D.detach(), C=loss_C.detach(), G=loss_G.detach()), dict(beta=beta, JD=JD, JC=JC)


# ---- training --------------------------------------------------------------------------------

def initial_generators(args, data, n_gen):
    """The state of all K generators as --seed initialises them, whatever the rank. Only CPU random
    numbers are drawn (the nets are built on the CPU), so only the CPU generator is forked and
    seeded: torch.manual_seed would also reseed every CUDA generator to --seed, and fork_rng
    restores only the devices it is given (all visible ones by default, with a warning on
    multi-GPU nodes)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(args.seed)
        return build_generators(args, data, n_gen).state_dict()


def check_args(args, world_size):
    if args.n_gen < world_size:
        raise common.UserError(f'--n_gen {args.n_gen} is fewer than the {world_size} processes: every '
                               f'process owns at least one generator; use --n_gen {world_size} or more')


def main():
    args = common.parse_args(parser)
    if args.n_epochs is None:
        args.n_epochs = DEFAULT_EPOCHS.get(args.dataset, 20)
    if not args.width:
        args.width = 128 if args.dataset in common.TOY_SETS else 64
    check_args(args, int(os.environ.get('WORLD_SIZE', 1)))
    run = common.Run(args, 'pmgan')
    data = run.load_data()
    batches = run.batches(data)
    K, W = args.n_gen, run.world_size
    owned = list(range(run.rank, K, W))                   # this rank's generators: k mod W == r
    m = args.gen_batch or max(1, args.batch_size // K)    # fake samples per generator per step

    # All K generators are initialised from --seed (as in a single process); this rank keeps its
    # share as one ensemble module: member i is generator owned[i].
    everyone = split_members(initial_generators(args, data, K), K)
    generators_raw = build_generators(args, data, len(owned))
    generators_raw.load_state_dict(join_members([everyone[k] for k in owned]))
    generators_raw = generators_raw.to(run.device)
    generators = torch.compile(generators_raw) if args.compile else generators_raw
    dc_raw = build_dc(args, data)
    dc = run.prepare(dc_raw)                               # D and C: data-parallel under torchrun
    evaluator = common.Evaluator(data, args, run.device, n_gen=K)
    opt_G = torch.optim.Adam(generators_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    opt_DC = torch.optim.Adam(dc_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    nets = SimpleNamespace(generators=generators, dc=dc, dc_raw=dc_raw, opt_G=opt_G, opt_DC=opt_DC, owned=owned)
    g_ckpt = PerGenerator(generators_raw, owned, K, run.ddp)
    opt_ckpt = PerGenerator(opt_G, owned, K, run.ddp)
    slots = Slots(beta=torch.zeros(K), JD=torch.zeros(K), JC=torch.zeros(K))
    fixed = torch.Generator().manual_seed(args.seed)
    n_fixed = max(50, 2500 // K) if data.is_2d else 10
    fixed_z = torch.randn(K, n_fixed, args.latent_dim, generator=fixed)[owned].to(run.device)
    start = run.resume(generators=g_ckpt, opt_G=opt_ckpt, dc=dc_raw, opt_DC=opt_DC, balance=slots)
    # n samples of this rank's generators in chunks of m (the training batch per generator), gathered:
    # (K, n, ...) of all K on every rank, for the metrics (the mixture's, each one's) and --generate
    own_each = common.ensemble_sampler(generators_raw, args.latent_dim, m, run.device)
    sample_each = lambda n, classes=None: gather_generators(own_each(n), run, K)
    if args.generate:   # --generate N: samples from the checkpoint, no training (one process)
        return common.write_generated(run, sample_each)
    if run.is_main:
        print(f'pmgan: K={K} generators, {m} fake samples each per step; '
              + '; '.join(f'rank {r}: generators {list(range(r, K, W))}' for r in range(W)), flush=True)

    def fid_sample_fn(n):  # every rank holds the same gathered mixture: FID keeps this rank's slice
        return common.mixture(sample_each(-(-n * W // K)), n * W)[run.rank::W]

    metrics = {}
    for it in run.iterations(start):
        real, _ = batches.get(it)
        z = torch.randn(len(owned), m, args.latent_dim, device=run.device)   # this rank's generators
        losses, slots.values = train_step(it, real, z, nets, args, run, data.is_2d)   # beta, J^D, J^C

        metrics = evaluator.due(it, run.n_iters, fid_sample_fn=fid_sample_fn, sample_each=sample_each)
        if metrics or run.due(it, args.log_interval):
            run.log(it, {'D': run.all_reduce_mean(losses['D']), 'C': run.all_reduce_mean(losses['C']),
                         'G': losses['G']},   # all ranks: the global losses
                    {**slots.values, **metrics})
        if run.due(it, args.sample_interval):
            with common.sampling(generators_raw):
                grid = gather_generators(generators_raw(fixed_z), run, K)   # one row / colour each
            run.save_samples(it, grid, data)
        if run.due(it, args.ckpt_interval):
            run.save_checkpoint(it, generators=g_ckpt, opt_G=opt_ckpt, dc=dc_raw, opt_DC=opt_DC, balance=slots)
    run.finish(run.n_iters - 1, {**slots.values, **metrics})   # final beta, J^D, J^C too


if __name__ == '__main__':
    common.run_main(main)
