"""Auction-inspired multi-GAN training (Shim, Choe & Kim, "A Study on Auction-Inspired Multi-GAN
Training"): N GANs that score each other.

N independent pairs (G_i, D_i) train side by side (Algorithm 1). Every iteration each pair takes its
ordinary GAN step (with --n_critic k > 1, an iteration is k critic steps and one generator step).
Every --auction_every iterations an auction follows the generator step: each G_i offers a lot I^i of
--lot_size samples, every D_j bids on every lot, X^{ij} = mean_k D_j(I^i_k) (a probability for
--loss gan, a critic value for --loss wgan), and pair i scores
    S(i) = 1/(N-1) sum_{j != i} X^{ij}  -  1/(N-1) sum_{j != i} X^{ji}
(its samples fool the other discriminators; its discriminator is not fooled by the others' samples).
The best pair b = argmax S is the reference of the auxiliary step (Algorithm 2): every D_i but D_b
moves towards D_b's outputs on real data and on G_i's samples,
    L_aux,i = MSE(D_i(X), sg(D_b(X))) + MSE(D_i(G_i(Z)), sg(D_b(G_i(Z)))),
while D_b (parameters and optimizer state) and every generator stay untouched. The N x N bids are
one batched call: the N discriminators are one module and each sees all N lots. --no_auction trains
the N pairs independently, everything else identical.

--bid_norm standard: a WGAN critic's values carry an offset the WGAN loss does not constrain. With
X^{ij} = q_i + c_j (c_j critic j's offset), S(i) = q_i - mean q_{-i} + mean c_{-i} - c_i: the pair
whose critic has the lowest offset wins, and the auxiliary MSE pulls every critic towards that
offset. `standard` expresses every critic output D_j(.) as (D_j(.) - mu_j) / sigma_j, mu_j and
sigma_j the mean and std of D_j on the auxiliary step's real batch X (no gradient through them),
for the bids and for both sides of the auxiliary MSE. `none` (default) is the paper's raw values.

    python auction_gan.py                                          # ring8, 6 vanilla GANs
    python auction_gan.py --dataset grid25 --loss wgan --gp 0.1    # 6 WGAN-GPs on grid25
    python auction_gan.py --dataset digits --img_size 16           # DCGAN pairs on images
    torchrun --nproc_per_node 2 auction_gan.py                     # DDP
"""
import contextlib

import torch
import torch.nn.functional as F

import common

parser = common.base_parser(__doc__, dataset='ring8')
parser.add_argument('--n_gans', type=common.positive_int, default=6, help='number of GAN pairs N')
parser.add_argument('--loss', choices=('gan', 'wgan'), default='gan', help='vanilla GAN or WGAN pairs')
parser.add_argument('--lot_size', type=common.positive_int, default=32,
                    help='samples per lot; also m, the auxiliary step\'s real and fake batch (its Z are the lots)')
parser.add_argument('--auction_every', type=common.positive_int, default=1,
                    help='iterations of Algorithm 1 (one generator step each) between auctions')
parser.add_argument('--no_auction', action='store_true', help='N independent GANs (the baseline)')
parser.add_argument('--width', type=common.positive_int, default=None,
                    help='net width: MLP hidden units on 2-D sets (default 128), DCGAN ngf = ndf on images (64)')
parser.add_argument('--n_critic', type=common.positive_int, default=None,
                    help='D steps per G step (default 1 for gan, 5 for wgan)')
parser.add_argument('--clip_value', type=common.positive_float, default=0.01,
                    help='wgan critic weight clipping (when --gp is 0)')
parser.add_argument('--gp', type=common.non_negative_float, default=0.0,
                    help='wgan gradient penalty weight (0 = weight clipping)')
parser.add_argument('--bid_norm', choices=('none', 'standard'), default='none',
                    help='none: raw D values (the paper); standard: each D_j\'s values standardised by '
                         'its mean and std on the auxiliary real batch, in bids and auxiliary targets')
parser.set_defaults(lr=None, n_epochs=None, sample_interval=1000, log_interval=100)
common.describe_default(parser, '--lr', '5e-5 (RMSprop) for --loss wgan with weight clipping, else 2e-4 (Adam)')
common.describe_default(parser, '--n_epochs', '25 on images; 2-D sets run 5,000 iterations')


def d_value(logits, loss):
    """The paper's D output: the probability sigmoid(logit) for gan, the critic value for wgan."""
    return torch.sigmoid(logits) if loss == 'gan' else logits


def d_loss(real, fake, loss):
    """Per pair (N,): BCE(D(x), 1) + BCE(D(G(z)), 0) on logits, or the critic's E D(G(z)) - E D(x)."""
    if loss == 'gan':
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real), reduction='none').mean(1)
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake), reduction='none').mean(1))
    return fake.mean(1) - real.mean(1)


def g_loss(fake, loss):
    """Per pair (N,): the non-saturating BCE(D(G(z)), 1), or -E D(G(z))."""
    if loss == 'gan':
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake), reduction='none').mean(1)
    return -fake.mean(1)


def gradient_penalty(critics, real, fakes):
    """WGAN-GP per pair (N,): E (||grad D_i(x_hat)||_2 - 1)^2, x_hat between x and G_i(z), in fp32."""
    alpha = torch.rand(*fakes.shape[:2], *[1] * (fakes.dim() - 2), device=fakes.device)
    x_hat = (alpha * real[None] + (1 - alpha) * fakes).requires_grad_(True)      # (N, B, ...)
    grad, = torch.autograd.grad(critics(x_hat).sum(), x_hat, create_graph=True)  # member i: its own grad
    return ((grad.flatten(2).norm(2, dim=2) - 1) ** 2).mean(1)


def bid_matrix(discriminators, lots, loss, real=None):
    """All N x N bids in one call. lots (N_i, L, ...): every D_j sees all N * L items.

    Returns X (N_i, N_j) with X[i, j] = X^{ij} = mean_k D_j(I^i_k), the item bids (N_j, N_i, L), and
    the standardisation (mu, sigma) (N_j,) of each D_j, or None. With a real batch (--bid_norm
    standard) the same call also shows every D_j the real batch, and every value D_j(.) becomes
    (D_j(.) - mu_j) / sigma_j with mu_j, sigma_j D_j's mean and std over that real batch: a constant
    added to D_j's outputs then changes no bid and no score.
    """
    n, lot_size = lots.shape[:2]
    items = lots.flatten(0, 1) if real is None else torch.cat([lots.flatten(0, 1), real.to(lots.dtype)])
    values = d_value(discriminators(items).float(), loss)                # (N_j, N_i * L [+ B])
    scale = None
    if real is not None:
        on_real = values[:, n * lot_size:]
        scale = on_real.mean(1), on_real.std(1, unbiased=False).clamp_min(1e-6)
        values = standardise(values[:, :n * lot_size], scale)
    items = values.view(n, n, lot_size)
    return items.mean(2).t(), items, scale


def standardise(values, scale):
    """(D_j(.) - mu_j) / sigma_j for values (N_j, ...) of the N discriminators; scale None: unchanged."""
    if scale is None:
        return values
    mu, sigma = (t.view(-1, *[1] * (values.dim() - 1)) for t in scale)
    return (values - mu) / sigma


def auction_scores(X):
    """S(i) = 1/(N-1) sum_{j != i} X^{ij} - 1/(N-1) sum_{j != i} X^{ji} (the paper's score S(i),
    section 2). The diagonal X^{ii} is in both sums and cancels."""
    return (X.sum(1) - X.sum(0)) / (len(X) - 1)


def member_tensors(discriminators, optimizer, n):
    """Every tensor of the N stacked discriminators that a step can change (parameters, buffers,
    optimizer state), viewed (N, -1): row i is D_i's part (ensemble linears and grouped convs alike)."""
    params = list(discriminators.parameters())
    tensors = params + [b for b in discriminators.buffers() if b.dim() > 0]
    for p in params:
        tensors += [s for s in optimizer.state.get(p, {}).values() if torch.is_tensor(s) and s.shape == p.shape]
    return [t.view(n, -1) for t in tensors]


@contextlib.contextmanager
def untouched(tensors, b):
    """Member b's rows of `tensors` are the same after the block as before it. Masking its loss is not
    enough: Adam and RMSprop move a parameter with zero gradient through their running averages."""
    with torch.no_grad():
        saved = [t.index_select(0, b) for t in tensors]
    yield
    with torch.no_grad():
        for t, s in zip(tensors, saved):
            t.index_copy_(0, b, s)


def auxiliary_step(critics, critics_raw, opt_D, real, lots, item_bids, b, loss, run, scale=None):
    """Algorithm 2 for every pair i != b: D_i moves towards the best discriminator D_b's outputs.

    real (B, ...) shown to every D_i; lots (N, L, ...) with D_i judging its own G_i's lot; item_bids
    (N_j, N_i, L) from the auction, so D_b's values on every lot are item_bids[b]; scale: the
    auction's (mu, sigma) per D (--bid_norm standard), so both sides of each MSE are standardised
    values, each D by its own mu, sigma (fixed, no gradient). Returns L_aux (N,).
    """
    n = len(lots)
    with run.autocast():
        on_real = d_value(critics(real).float(), loss)          # (N, B): D_i(X)
        on_fake = d_value(critics(lots).float(), loss)          # (N, L): D_i(G_i(Z))
    on_real, on_fake = standardise(on_real, scale), standardise(on_fake, scale)
    ref_real = on_real.detach().index_select(0, b)              # (1, B): sg(D_b(X))
    ref_fake = item_bids.index_select(0, b)[0]                  # (N, L): sg(D_b(G_i(Z)))
    l_real = ((on_real - ref_real) ** 2).mean(1)                # L_real = 1/m sum (D(x) - D*(x))^2
    l_fake = ((on_fake - ref_fake) ** 2).mean(1)                # L_fake = 1/m sum (D(G(z)) - D*(G(z)))^2
    loss_aux = (l_real + l_fake) * (torch.arange(n, device=b.device) != b).float()   # D_b: no loss ...
    with untouched(member_tensors(critics_raw, opt_D, n), b):                          # ... and no step
        run.step(loss_aux.sum(), opt_D)
    return loss_aux.detach()


def build_nets(args, data):
    """N MLP pairs for 2-D sets (as in racing_wgan); N Radford DCGAN pairs for images. The DCGAN
    discriminators have no batch norm: a bid must not depend on the other items in the batch."""
    n = args.n_gans
    if data.is_2d:
        width = args.width or 128
        return (common.MLPGenerators(n, args.latent_dim, data.shape, hidden=(width,) * 3, batchnorm=False,
                                     tanh=False),
                common.MLPDiscriminator(data.shape, hidden=(width,) * 3, n_nets=n))
    width = args.width or 64
    return (common.DCGANGenerators(n, args.latent_dim, args.img_size, data.shape[0], ngf=width),
            common.DCGANDiscriminator(args.img_size, data.shape[0], ndf=width, n_nets=n, batchnorm=False))


class Wins:
    """Auctions won by each pair, checkpointed with the nets."""

    def __init__(self, n, device):
        self.count = torch.zeros(n, device=device)

    def state_dict(self):
        return {'count': self.count}

    def load_state_dict(self, state):
        self.count.copy_(state['count'])


def main():
    args = common.parse_args(parser)
    if args.n_gans < 2:
        raise common.UserError(f'--n_gans {args.n_gans} leaves no other pair to bid: use --n_gans 2 or more')
    if args.gp and args.loss != 'wgan':
        raise common.UserError('--gp is a WGAN critic penalty: add --loss wgan, or drop --gp')
    if args.bid_norm == 'standard' and args.lot_size < 2:
        raise common.UserError('--bid_norm standard needs a std over the real batch of --lot_size samples: '
                               'use --lot_size 2 or more')
    if args.dataset not in common.TOY_SETS:
        common.check_image_size(args.img_size)
    if args.n_iters is None and args.n_epochs is None:    # defaults: 5,000 iterations on 2-D, 25 epochs on images
        args.n_iters, args.n_epochs = (5000, None) if args.dataset in common.TOY_SETS else (None, 25)
    clipping = args.loss == 'wgan' and not args.gp
    args.lr = args.lr or (5e-5 if clipping else 2e-4)
    args.n_critic = args.n_critic or (5 if args.loss == 'wgan' else 1)
    run = common.Run(args, 'auction_gan')
    data = run.load_data()
    batches = run.batches(data)
    evaluator = common.Evaluator(data, args, run.device, n_gen=args.n_gans)
    N, L = args.n_gans, args.lot_size

    generators_raw, critics_raw = build_nets(args, data)
    generators, critics = run.prepare(generators_raw), run.prepare(critics_raw)
    if clipping:  # the classic WGAN recipe; one elementwise optimizer is N independent ones
        opt_G = torch.optim.RMSprop(generators_raw.parameters(), lr=args.lr)
        opt_D = torch.optim.RMSprop(critics_raw.parameters(), lr=args.lr)
    else:
        opt_G = torch.optim.Adam(generators_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
        opt_D = torch.optim.Adam(critics_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    wins = Wins(N, run.device)
    fixed_z = torch.randn(500 if data.is_2d else 10, args.latent_dim, device=run.device)
    start = run.resume(generators=generators_raw, discriminators=critics_raw, opt_G=opt_G, opt_D=opt_D,
                       wins=wins)

    # n samples of each pair's generator, (N, n, ...): the metrics (the union's, each pair's) and --generate
    sample_each = common.ensemble_sampler(generators_raw, args.latent_dim, args.batch_size, run.device)
    if args.generate:   # --generate N: samples from the checkpoint, no training
        return common.write_generated(run, sample_each)

    def draw_auction():
        """Noise for the N lots, and the auxiliary step's real batch X (m = L samples)."""
        lots_z = torch.randn(N, L, args.latent_dim, device=run.device)
        real_aux, _ = data.batch(torch.randint(len(data), (L,), device=data.device))
        return lots_z, real_aux

    def auction(lots_z, real_aux):
        """Lots from every G_i, the N x N bids (all ranks agree on them), the scores, the winner."""
        with common.sampling(generators_raw), run.autocast():
            lots = generators_raw(lots_z)                                   # (N, L, ...): lot I^i of G_i
            X, item_bids, scale = bid_matrix(critics_raw, lots, args.loss,
                                             real_aux if args.bid_norm == 'standard' else None)
        X = run.all_reduce_mean(X)
        S = auction_scores(X)
        return lots, item_bids, scale, X, S, S.argmax().view(1)

    loss_D = loss_aux = S = torch.zeros(N, device=run.device)
    loss_G = None  # logged from the first generator step on (a resume may land between two)
    X, winner = torch.zeros(N, N, device=run.device), torch.full((1,), -1, device=run.device)
    metrics, auction_log = {}, {}
    for it in run.iterations(start):
        real, _ = batches.get(it)
        B = len(real)
        z = torch.randn(N, B, args.latent_dim, device=run.device)    # each G_i its own noise

        # ---- ordinary step for every pair (Algorithm 1), all N at once --------------------------
        g_step = it % args.n_critic == 0
        with torch.set_grad_enabled(g_step), run.autocast():
            fakes = generators(z)                                        # (N, B, ...): G_i(z_i)
        with run.autocast():
            loss_D = d_loss(critics(real).float(), critics(fakes.detach()).float(), args.loss)  # (N,)
        if args.gp:
            # through the plain critics: torch.compile has no double backward; under DDP the
            # penalty's gradient joins the DDP forward's in the same backward, so it is synced
            loss_D = loss_D + args.gp * gradient_penalty(critics_raw, real, fakes.detach().float())
        run.step(loss_D.sum(), opt_D)   # the sum: each D_i gets only its own gradient
        if clipping:
            with torch.no_grad():
                for p in critics_raw.parameters():
                    p.clamp_(-args.clip_value, args.clip_value)
        if g_step:
            with run.autocast():
                loss_G = g_loss(critics(fakes).float(), args.loss)
            run.step(loss_G.sum(), opt_G)

        # ---- auction and auxiliary step for every pair but the winner (Algorithm 2) -----------
        # once per iteration of Algorithm 1 (n_critic critic steps and a generator step), after
        # the generator step
        full_iterations = it // args.n_critic + 1
        if not args.no_auction and g_step and full_iterations % args.auction_every == 0:
            lots_z, real_aux = draw_auction()
            lots, item_bids, scale, X, S, winner = auction(lots_z, real_aux)
            loss_aux = auxiliary_step(critics, critics_raw, opt_D, real_aux, lots, item_bids, winner,
                                      args.loss, run, scale)
            wins.count.index_add_(0, winner, torch.ones(1, device=run.device))
            run.write_events('auctions.csv', [{'iteration': it + 1, 'winner': winner[0], 'S': S}])
            if clipping:
                with torch.no_grad():
                    for p in critics_raw.parameters():
                        p.clamp_(-args.clip_value, args.clip_value)

        metrics = evaluator.due(it, run.n_iters, sample_each=sample_each)   # the union's, each pair's
        logging = bool(metrics) or run.due(it, args.log_interval)
        if logging:
            if args.no_auction:  # the auction as a bystander: fixed lots, no effect on training
                with evaluator.fixed_rng():
                    _, _, _, X, S, winner = auction(*draw_auction())
            off_diagonal = X.sum() - X.diagonal().sum()
            auction_log = {'S': S, 'winner': winner[0], 'wins': wins.count, 'bid_self': X.diagonal().mean(),
                           'bid_other': off_diagonal / (N * (N - 1))}
            losses = {'D': run.all_reduce_mean(loss_D.detach()),
                      'aux': run.all_reduce_mean(loss_aux.detach())}
            if loss_G is not None:   # under DDP: the mean over ranks, as the gradients
                losses['G'] = run.all_reduce_mean(loss_G.detach())
            run.log(it, losses, {**auction_log, **metrics})
        if run.due(it, args.sample_interval):
            with common.sampling(generators_raw):
                run.save_samples(it, generators_raw(fixed_z), data)
        if run.due(it, args.ckpt_interval):
            run.save_checkpoint(it, generators=generators_raw, discriminators=critics_raw, opt_G=opt_G,
                                opt_D=opt_D, wins=wins)
    run.finish(run.n_iters - 1, {**auction_log, **metrics})


if __name__ == '__main__':
    common.run_main(main)
