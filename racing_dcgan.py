"""Racing-GAN inside DCGAN (Paul & Saha, "Racing-GAN Multi-Generator Framework within Wasserstein And
Deep Convolution Generative Adversarial Networks"): K Radford DCGAN generators race against one
shared discriminator.

Every step all K generators get the same z. With logits l_k = D(G_k(z)) and r_k = sigmoid(l_k):
  D:    BCE(D(x), 1) + (1/K) sum_k BCE(D(G_k(z)), 0)                            (on logits)
  G_i:  BCE(D(G_i(z)), 1) + lambda * sum_{j != i} E_z max(0, sg(r_j) - r_i)     (--race_mode lag)
--race_mode paper uses the formula as printed (section 2.4), max(0, r_i - sg(r_j)); --race_mode off
trains K independent generators. --n_gen 1 is a plain DCGAN's step (pytorch/examples dcgan/main.py:
D on the real and the fake batch, then G through the updated D on the same fakes); each epoch drops
its last partial batch, which that script's DataLoader keeps.
D sees the real batch and each generator's fakes as separate batches (batch norm never mixes
generators); --joint_fake_bn shows it the K fake batches as one.

    python racing_dcgan.py --n_gen 2                            # digits 32x32, offline, CPU minutes
    python racing_dcgan.py --dataset folder --data_root faces/ --img_size 64 --n_gen 1
    torchrun --nproc_per_node 2 racing_dcgan.py --n_gen 2       # DDP
"""
import torch
import torch.nn.functional as F

import common

parser = common.base_parser(__doc__)
parser.add_argument('--n_gen', type=common.positive_int, default=2, help='number of generators K')
parser.add_argument('--race_mode', choices=('lag', 'paper', 'off'), default='lag', help='racing term')
parser.add_argument('--race_weight', type=common.non_negative_float, default=1.0,
                    help='lambda, the racing term weight')
parser.add_argument('--ngf', type=common.positive_int, default=64, help='generator width (channels of its last hidden layer)')
parser.add_argument('--ndf', type=common.positive_int, default=64, help='discriminator width (channels of its first conv)')
parser.add_argument('--joint_fake_bn', action='store_true',
                    help='show D the K fake batches as one batch: shared batch-norm statistics (see docs/racing_dcgan.md)')
parser.set_defaults(img_size=32, n_epochs=20, sample_interval=200, log_interval=50)


def racing_term(probs, mode):
    """Racing term per generator: the paper's generator loss (section 2.4; two generators, section 4)
    with the sign of --race_mode.

    probs: (K, B) probabilities r_k = sigmoid(D(G_k(z))) on the same z. Returns (K,):
    lag:   sum_{j != i} mean_b max(0, sg(r_j) - r_i)
    paper: sum_{j != i} mean_b max(0, r_i - sg(r_j))
    The rival's probability is detached, so generator i's term sends no gradient into generator j.
    """
    k = probs.shape[0]
    if mode == 'off' or k == 1:
        return probs.new_zeros(k)
    rival, own = probs.detach()[None, :, :], probs[:, None, :]        # (1, K_j, B), (K_i, 1, B)
    gap = torch.relu(rival - own) if mode == 'lag' else torch.relu(own - rival)  # (K_i, K_j, B)
    not_self = 1.0 - torch.eye(k, device=probs.device, dtype=probs.dtype)[:, :, None]
    return (gap * not_self).mean(2).sum(1)


class Discriminator(common.DCGANDiscriminator):
    """The Radford D on the real batch and on each generator's fakes: (K, B, C, S, S) -> (K, B).

    D has batch norm. One call on real and all K generators' fakes together would mix their
    batch statistics, so G_j's samples would change D(G_i(z)) and leak gradient between
    generators. By default each batch is its own call, exactly as a plain DCGAN's separate
    D(real) and D(fake) calls; joint_fakes=True (--joint_fake_bn) shows the K fake batches
    to D as one batch (real still apart): statistics shared, and gradient leaking through them.
    """

    def __init__(self, img_size, channels, ndf=64, joint_fakes=False):
        super().__init__(img_size, channels, ndf=ndf)
        self.joint_fakes = joint_fakes

    def forward(self, fakes, real=None):
        """Logits (K, B) for fakes (K, B, C, S, S); with real (B, C, S, S), (1 + K, B), real first."""
        score = super().forward
        first = [score(real)] if real is not None else []
        parts = [fakes.flatten(0, 1)] if self.joint_fakes else list(fakes)
        return torch.cat(first + [score(p) for p in parts]).view(len(first) + len(fakes), -1)


def build_nets(args, channels):
    """K Radford generators as one module of grouped convs, and one discriminator."""
    generators = common.DCGANGenerators(args.n_gen, args.latent_dim, args.img_size, channels, ngf=args.ngf)
    return generators, Discriminator(args.img_size, channels, ndf=args.ndf, joint_fakes=args.joint_fake_bn)


def bce(logits, target):
    """BCE on logits against a constant label, averaged over the batch (last) axis."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction='none').mean(-1)


def main():
    args = common.parse_args(parser)
    common.check_image_size(args.img_size)  # before any run folder is made
    if args.dataset in common.TOY_SETS:
        raise common.UserError(f'racing_dcgan.py needs an image data set, not the 2-D {args.dataset}: '
                               f'use racing_wgan.py --dataset {args.dataset}')
    run = common.Run(args, 'racing_dcgan')
    data = run.load_data()
    batches = run.batches(data)
    evaluator = common.Evaluator(data, args, run.device, n_gen=args.n_gen)
    K = args.n_gen

    generators_raw, discriminator_raw = build_nets(args, data.shape[0])
    for net in (generators_raw, discriminator_raw):  # NHWC convs: a step 1.1x faster on CPU (bench/)
        net.to(memory_format=torch.channels_last)
    generators, discriminator = run.prepare(generators_raw), run.prepare(discriminator_raw)
    # The generator step needs D's gradient with respect to its input only: a frozen, unwrapped
    # D skips D's weight gradients (and, under DDP, their all-reduce), which a plain DCGAN
    # computes and throws away (a step 1.09x faster on CPU, bench/bench_racing_dcgan.py).
    frozen_discriminator = torch.compile(discriminator_raw) if args.compile else discriminator_raw
    opt_G = torch.optim.Adam(generators_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    opt_D = torch.optim.Adam(discriminator_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    fixed_z = torch.randn(10, args.latent_dim, device=run.device)
    start = run.resume(generators=generators_raw, discriminator=discriminator_raw, opt_G=opt_G, opt_D=opt_D)

    # n samples of each generator, (K, n, ...): the metrics (the mixture's, each one's) and --generate
    sample_each = common.ensemble_sampler(generators_raw, args.latent_dim, args.batch_size, run.device)
    if args.generate:   # --generate N: samples from the checkpoint, no training
        return common.write_generated(run, sample_each)

    metrics = {}
    for it in run.iterations(start):
        real, _ = batches.get(it)
        real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(len(real), args.latent_dim, device=run.device)

        # ---- discriminator: BCE(D(x), 1) + (1/K) sum_k BCE(D(G_k(z)), 0) --------------------
        with run.autocast():
            fakes = generators(z)                                           # (K, B, C, S, S)
            logits = discriminator(fakes.detach(), real).float()            # (1 + K, B)
            loss_D = bce(logits[0], 1.0) + bce(logits[1:], 0.0).mean()
        run.step(loss_D, opt_D)

        # ---- generators: non-saturating BCE(D(G_i(z)), 1) + racing term on probabilities ----
        discriminator_raw.requires_grad_(False)
        with run.autocast():
            logits = frozen_discriminator(fakes).float()                    # (K, B), updated D
            race = racing_term(logits.sigmoid(), args.race_mode)            # r_k = sigmoid(l_k)
            loss_G = bce(logits, 1.0) + args.race_weight * race             # (K,)
        run.step(loss_G.sum(), opt_G)  # the sum: each generator gets only its own gradient
        discriminator_raw.requires_grad_(True)

        metrics = evaluator.due(it, run.n_iters, sample_each=sample_each)
        if metrics or run.due(it, args.log_interval):
            run.log(it, {'D': loss_D, 'G': loss_G.detach(), 'race': race.detach()}, metrics)
        if run.due(it, args.sample_interval):
            with common.sampling(generators_raw):
                run.save_samples(it, generators_raw(fixed_z), data)
        if run.due(it, args.ckpt_interval):
            run.save_checkpoint(it, generators=generators_raw, discriminator=discriminator_raw,
                                opt_G=opt_G, opt_D=opt_D)
    run.finish(run.n_iters - 1, metrics)


if __name__ == '__main__':
    common.run_main(main)
