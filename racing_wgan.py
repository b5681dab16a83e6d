"""Racing-GAN inside WGAN (Paul & Saha, "Racing-GAN Multi-Generator Framework within Wasserstein And
Deep Convolution Generative Adversarial Networks"): K generators race against one shared critic.

Every step all K generators get the same z. The critic sees real images and the fakes of all K.
Generator i minimises its Wasserstein term plus a racing term against each rival j, on paired
samples:  L_Gi = -E D(G_i(z)) + lambda * sum_{j != i} E_z max(0, sg(D(G_j(z))) - D(G_i(z)))
(--race_mode lag: a generator behind a rival is pushed to catch up). --race_mode paper uses the
formula as printed (section 2.4), max(0, D(G_i(z)) - sg(D(G_j(z)))); --race_mode off trains K
independent generators. --n_gen 1 is the classic WGAN's step (PyTorch-GAN's wgan.py: weight
clipping, RMSprop, a generator step on the critic step's z after every n_critic-th critic step),
with two differences of schedule: the generator steps when the global iteration is a multiple of
n_critic (the classic counts the batch index within each epoch, restarting at every epoch), and
each epoch drops its last partial batch (the classic's DataLoader keeps it).

    python racing_wgan.py --n_gen 2                          # digits, offline, a few CPU minutes
    python racing_wgan.py --dataset ring8 --n_gen 4 --gp 10  # 2-D, reports mode coverage
    torchrun --nproc_per_node 2 racing_wgan.py --n_gen 2     # DDP
"""
import torch

import common

parser = common.base_parser(__doc__)
parser.add_argument('--n_gen', type=common.positive_int, default=2, help='number of generators K')
parser.add_argument('--race_mode', choices=('lag', 'paper', 'off'), default='lag', help='racing term')
parser.add_argument('--race_weight', type=common.non_negative_float, default=1.0,
                    help='lambda, the racing term weight')
parser.add_argument('--n_critic', type=common.positive_int, default=5, help='critic steps per generator step')
parser.add_argument('--clip_value', type=common.positive_float, default=0.01,
                    help='critic weight clipping (when --gp is 0)')
parser.add_argument('--gp', type=common.non_negative_float, default=0.0,
                    help='gradient penalty weight (WGAN-GP; 0 = clipping)')
parser.set_defaults(lr=None, b1=None, b2=None,  # by --gp: complete_args
                    img_size=16, n_epochs=430, sample_interval=2000, log_interval=200, eval_interval=2000)
common.describe_default(parser, '--lr', 'RMSprop 5e-5 with clipping, Adam 1e-4 with --gp')
common.describe_default(parser, '--b1', '0.5 (unused by RMSprop) with clipping, 0 with --gp')
common.describe_default(parser, '--b2', '0.999 (unused by RMSprop) with clipping, 0.9 with --gp')


def racing_term(scores, mode):
    """Racing term per generator: the paper's generator loss (section 2.4; two generators, section 4)
    with the sign of --race_mode.

    scores: (K, B) critic values r_k = D(G_k(z)) on the same z. Returns (K,):
    lag:   sum_{j != i} mean_b max(0, sg(r_j) - r_i)
    paper: sum_{j != i} mean_b max(0, r_i - sg(r_j))
    The rival's score is detached, so generator i's term sends no gradient into generator j.
    """
    k = scores.shape[0]
    if mode == 'off' or k == 1:
        return scores.new_zeros(k)
    rival, own = scores.detach()[None, :, :], scores[:, None, :]      # (1, K_j, B), (K_i, 1, B)
    gap = torch.relu(rival - own) if mode == 'lag' else torch.relu(own - rival)  # (K_i, K_j, B)
    not_self = 1.0 - torch.eye(k, device=scores.device, dtype=scores.dtype)[:, :, None]
    return (gap * not_self).mean(2).sum(1)


def gradient_penalty(critic, real, fake):
    """WGAN-GP (Gulrajani et al.): E (||grad_x D(x_hat)||_2 - 1)^2 on random interpolates, in fp32."""
    alpha = torch.rand(len(real), *[1] * (real.dim() - 1), device=real.device)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def build_nets(args, data):
    """The classic WGAN MLPs over flattened pixels; a small MLP without tanh for 2-D sets."""
    if data.is_2d:
        generators = common.MLPGenerators(args.n_gen, args.latent_dim, data.shape, hidden=(128, 128, 128),
                                          batchnorm=False, tanh=False)
        return generators, common.MLPDiscriminator(data.shape, hidden=(128, 128, 128))
    return (common.MLPGenerators(args.n_gen, args.latent_dim, data.shape),
            common.MLPDiscriminator(data.shape))


def complete_args(args):
    """Optimizer defaults by Lipschitz method: the classic WGAN's RMSprop 5e-5 with clipping;
    WGAN-GP's Adam 1e-4, betas (0, 0.9) (Gulrajani et al., Algorithm 1) with --gp."""
    for name, clipped, penalty in (('lr', 5e-5, 1e-4), ('b1', 0.5, 0.0), ('b2', 0.999, 0.9)):
        if getattr(args, name) is None:
            setattr(args, name, penalty if args.gp else clipped)
    return args


def main():
    args = complete_args(common.parse_args(parser))
    run = common.Run(args, 'racing_wgan')
    data = run.load_data()
    batches = run.batches(data)
    evaluator = common.Evaluator(data, args, run.device, n_gen=args.n_gen)
    K = args.n_gen

    generators_raw, critic_raw = build_nets(args, data)
    generators, critic = run.prepare(generators_raw), run.prepare(critic_raw)
    opt_G = torch.optim.RMSprop(generators_raw.parameters(), lr=args.lr)  # K generators, one
    opt_D = torch.optim.RMSprop(critic_raw.parameters(), lr=args.lr)      # elementwise optimizer
    if args.gp:  # WGAN-GP's own recipe (complete_args)
        opt_G = torch.optim.Adam(generators_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
        opt_D = torch.optim.Adam(critic_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    fixed_z = torch.randn(500 if data.is_2d else 10, args.latent_dim, device=run.device)
    start = run.resume(generators=generators_raw, critic=critic_raw, opt_G=opt_G, opt_D=opt_D)

    # n samples of each generator, (K, n, ...): the metrics (the mixture's, each one's) and --generate
    sample_each = common.ensemble_sampler(generators_raw, args.latent_dim, args.batch_size, run.device)
    if args.generate:   # --generate N: samples from the checkpoint, no training
        return common.write_generated(run, sample_each)

    loss_G = race = None  # logged from the first generator step on (a resume may land between two)
    metrics = {}
    for it in run.iterations(start):
        real, _ = batches.get(it)
        B = len(real)
        z = torch.randn(B, args.latent_dim, device=run.device)

        # ---- critic: -E D(x) + (1/K) sum_k E D(G_k(z)), all fakes in one call --------------
        with torch.no_grad(), run.autocast():
            fakes = generators(z).flatten(0, 1)                          # (K * B, ...)
        with run.autocast():
            scores = critic(torch.cat([real, fakes.to(real.dtype)])).float()
            loss_D = -scores[:B].mean() + scores[B:].mean()
        if args.gp:
            # through the plain critic: torch.compile has no double backward; under DDP the
            # penalty's gradient joins the DDP forward's in the same backward, so it is synced
            loss_D = loss_D + args.gp * gradient_penalty(critic_raw, real.repeat(K, *[1] * (real.dim() - 1)),
                                                         fakes.float())
        run.step(loss_D, opt_D)
        if not args.gp:
            with torch.no_grad():
                for p in critic_raw.parameters():
                    p.clamp_(-args.clip_value, args.clip_value)

        # ---- generators, every n_critic iterations: Wasserstein term + racing term ------------
        # The critic is frozen here: only its input gradient is needed, so its weight gradients
        # (and their DDP all-reduce) are skipped; the plain module is called, not the DDP wrapper.
        if it % args.n_critic == 0:
            critic_raw.requires_grad_(False)
            with run.autocast():
                r = critic_raw(generators(z).flatten(0, 1)).float().view(K, B)   # r_k = D(G_k(z))
                race = racing_term(r, args.race_mode)
                loss_G = -r.mean(1) + args.race_weight * race                     # (K,)
            run.step(loss_G.sum(), opt_G)  # the sum: each generator gets only its own gradient
            critic_raw.requires_grad_(True)

        metrics = evaluator.due(it, run.n_iters, sample_each=sample_each)
        if metrics or run.due(it, args.log_interval):
            losses = {'D': loss_D}
            if loss_G is not None:
                losses.update(G=loss_G.detach(), race=race.detach())
            run.log(it, losses, metrics)
        if run.due(it, args.sample_interval):
            with common.sampling(generators_raw):
                run.save_samples(it, generators_raw(fixed_z), data)
        if run.due(it, args.ckpt_interval):
            run.save_checkpoint(it, generators=generators_raw, critic=critic_raw, opt_G=opt_G, opt_D=opt_D)
    run.finish(run.n_iters - 1, metrics)


if __name__ == '__main__':
    common.run_main(main)
