"""Generator advantage in DCGAN for small data sets (Weaver, "Robot vs. Robot: Evening the Field in
Deep Convolutional GANs for Small Datasets").

A Radford DCGAN whose generator gets R updates for every discriminator update (--g_advantage R,
a fresh z for each by default). R = 1 is the plain DCGAN; R = 2 is what DCGAN-tensorflow, the code
the paper modified, does by default (it runs its G step twice after each D step); the paper tried
4 and 50 on 192 mouse faces. A fraction below 1 turns the balance the other way: 0.2 is one
generator update every 5 discriminator updates. Counts are exact: after n discriminator updates the
generator has made ceil(n R) updates (R = 0.2: updates after D updates 1, 6, 11, ...).
--same_z is DCGAN-tensorflow's schedule instead: one z ~ U(-1, 1) per iteration, used by the D step
and by all R G steps (and U(-1, 1) for every sample).

Losses, from logits (the paper's minimax value V(D, G) with the non-saturating generator loss):
    L_D = 1/2 [BCE(D(x), 1) + BCE(D(G(z)), 0)]          real and fake in separate batches (BN)
    L_G = BCE(D(G(z')), 1) = -E log sigmoid(D(G(z')))     z' fresh for each of the R updates
The paper tracks the loss ratio L_G / L_D and plots its log (Figure 1); 0 is the "ideal" it
names, and with L_D a mean of its two terms log(L_G / L_D) is exactly 0 at the GAN equilibrium
D = 1/2, where both losses are ln 2. Every log line records two versions (natural logs):
  D, G, ratio, log_ratio: on the D step's batch before D's update (L_G on the same fake logits),
    both losses from the same nets at the same moment;
  D_after, G_after, ratio_after, log_ratio_after: the statistic behind Figure 1, as DCGAN-tensorflow
    records errD and errG, after the D step and all G steps, on the iteration's real batch and the
    D step's z (DCGAN-tensorflow's printed d_loss sums the two terms: 2 D_after, a log ratio lower
    by ln 2).

    python g_advantage_dcgan.py --subset 192 --g_advantage 4                  # digits, offline
    python g_advantage_dcgan.py --dataset folder --data_root mice/ --img_size 64 --flip
    python g_advantage_dcgan.py --g_advantage 0.2                             # D gets the edge
    python g_advantage_dcgan.py --subset 192 --same_z                         # DCGAN-tensorflow's z
    torchrun --nproc_per_node 2 g_advantage_dcgan.py --subset 192             # DDP
"""
import argparse
import contextlib
import math
from fractions import Fraction

import torch
import torch.nn.functional as F

import common


def advantage(text):
    """--g_advantage: a positive number or fraction ('4', '0.2', '1/3'), read as a fraction whose
    denominator is at most 1000. Returned as a float (args.json); main() takes it back to a Fraction."""
    try:
        value = Fraction(text).limit_denominator(1000)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f'{text!r} is not a number or fraction such as 2, 0.2 or 1/3')
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f'must be from 1/1000 (one G update per 1000 D updates) to 1000, '
                                         f'got {text}')
    return float(value)


parser = common.base_parser(__doc__)
parser.add_argument('--g_advantage', type=advantage, default=2.0,
                    help='R: generator updates per discriminator update (1 = plain DCGAN; 0.2 = one G '
                         'update every 5 D updates)')
parser.add_argument('--ngf', type=common.positive_int, default=64, help='generator width (Radford: 64)')
parser.add_argument('--ndf', type=common.positive_int, default=64, help='discriminator width (Radford: 64)')
parser.add_argument('--flip', action='store_true', help='augment by random horizontal flips (small data)')
parser.add_argument('--same_z', action='store_true',
                    help="DCGAN-tensorflow's schedule: one z ~ U(-1, 1) per iteration for the D step and all "
                         "G steps (samples from U(-1, 1) too); default: N(0, I), fresh z for each G step")
parser.set_defaults(img_size=32, n_epochs=20, sample_interval=500, log_interval=50)


def generator_updates(iteration, R):
    """Generator updates that follow discriminator update `iteration` (0-based), for a Fraction R:
    ceil((i + 1) R) - ceil(i R). Summed over the first n iterations this is exactly ceil(n R)."""
    return math.ceil((iteration + 1) * R) - math.ceil(iteration * R)


def d_loss(real_logits, fake_logits):
    """L_D = 1/2 [BCE(D(x), 1) + BCE(D(G(z)), 0)] on logits, in float32."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):
    """L_G = BCE(D(G(z)), 1) = -E log sigmoid(D(G(z))), the non-saturating generator loss."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


@contextlib.contextmanager
def frozen(net):
    """No parameter gradients for `net` inside: a generator step needs D's input gradient only,
    so D's weight gradients (and, under DDP, their all-reduce) are skipped."""
    net.requires_grad_(False)
    try:
        yield net
    finally:
        net.requires_grad_(True)


def main():
    args = common.parse_args(parser)
    R = Fraction(args.g_advantage).limit_denominator(1000)
    run = common.Run(args, 'g_advantage_dcgan')
    data = run.load_data()
    if data.is_2d:
        raise common.UserError(f'{args.dataset} is a 2-D set; the DCGAN needs images: use --dataset digits, '
                               f'folder, mnist, ...')
    batches = run.batches(data)
    C, S = data.shape[0], data.shape[-1]

    generator_raw = common.DCGANGenerators(1, args.latent_dim, S, C, ngf=args.ngf)
    discriminator_raw = common.DCGANDiscriminator(S, C, ndf=args.ndf)
    evaluator = common.Evaluator(data, args, run.device)
    generator, discriminator = run.prepare(generator_raw), run.prepare(discriminator_raw)
    # The generator steps see D without DDP (D's weights get no gradient there, so nothing to reduce).
    discriminator_for_g = torch.compile(discriminator_raw) if args.compile else discriminator_raw
    opt_G = torch.optim.Adam(generator_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    opt_D = torch.optim.Adam(discriminator_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    def draw_z(n):  # the prior: DCGAN-tensorflow's U(-1, 1) with --same_z, else N(0, I)
        if args.same_z:
            return torch.rand(n, args.latent_dim, device=run.device) * 2 - 1
        return torch.randn(n, args.latent_dim, device=run.device)

    fixed_z = draw_z(64)
    start = run.resume(generator=generator_raw, discriminator=discriminator_raw, opt_G=opt_G, opt_D=opt_D)

    if args.generate:   # --generate N: samples from the checkpoint, no training
        return common.write_generated(run, common.ensemble_sampler(generator_raw, args.latent_dim, args.batch_size,
                                                                   run.device))

    def sample_fn(n):
        with common.sampling(generator_raw):
            return torch.cat([generator_raw(draw_z(args.batch_size))[0]
                              for _ in range(-(-n // args.batch_size))])[:n]

    metrics, balance = {}, {}
    for it in run.iterations(start):
        real, _ = batches.get(it)
        B = len(real)

        # ---- discriminator: one update on a real batch and a fake batch ---------------------
        z = draw_z(B)                                     # the iteration's z
        with torch.no_grad(), run.autocast():
            fake = generator(z)[0]
        with run.autocast():
            real_logits, fake_logits = discriminator(real), discriminator(fake.to(real.dtype))
            loss_D = d_loss(real_logits, fake_logits)
        run.step(loss_D, opt_D)

        # ---- generator: ceil((it + 1) R) - ceil(it R) updates, each on fresh noise -----------
        # (--same_z: all on the iteration's z, as DCGAN-tensorflow)
        with frozen(discriminator_raw):
            for _ in range(generator_updates(it, R)):
                z_g = z if args.same_z else draw_z(B)
                with run.autocast():
                    loss_G = g_loss(discriminator_for_g(generator(z_g)[0]))
                run.step(loss_G, opt_G)

        metrics = evaluator.due(it, run.n_iters, sample_fn)
        if metrics or run.due(it, args.log_interval):
            measured = torch.stack([loss_D.detach(), g_loss(fake_logits.detach())])  # same batch, same D
            # Figure 1's statistic: after the D step and all G steps, the iteration's real batch and
            # z, both nets as in training (train-mode batch norm), no side effects on them
            with common.sampling(generator_raw), common.sampling(discriminator_raw), run.autocast():
                logits_after = discriminator_raw(generator_raw(z)[0].to(real.dtype))
                after = torch.stack([d_loss(discriminator_raw(real), logits_after), g_loss(logits_after)])
            losses, after = run.all_reduce_mean(measured), run.all_reduce_mean(after)
            balance = {'ratio': losses[1] / losses[0], 'log_ratio': losses[1].log() - losses[0].log(),
                       'D_after': after[0], 'G_after': after[1], 'ratio_after': after[1] / after[0],
                       'log_ratio_after': after[1].log() - after[0].log()}
            run.log(it, {'D': losses[0], 'G': losses[1]}, {**balance, **metrics})
        if run.is_main and run.due(it, args.sample_interval):
            with common.sampling(generator_raw):
                run.save_samples(it, generator_raw(fixed_z).view(8, 8, C, S, S), data)
        if run.due(it, args.ckpt_interval):
            run.save_checkpoint(it, generator=generator_raw, discriminator=discriminator_raw,
                                opt_G=opt_G, opt_D=opt_D)
    run.finish(run.n_iters - 1, {**balance, **metrics})


if __name__ == '__main__':
    common.run_main(main)
