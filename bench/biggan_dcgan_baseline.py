"""Plain DCGAN baseline for bench/biggan_digits.py: common's Radford nets (BN in G and D, no spectral
norm), BCE from logits, Adam 2e-4 betas (0.5, 0.999), one D step per G step; the run folder and
metrics (fd_digits) are the same as biggan_sn.py's, through common.Run and common.Evaluator.

    OMP_NUM_THREADS=1 python bench/biggan_dcgan_baseline.py --ngf 16 --n_iters 3000
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

parser = common.base_parser(__doc__)
parser.add_argument('--ngf', type=int, default=16, help='width of G and D (ngf = ndf)')
parser.set_defaults(latent_dim=120, sample_interval=500)


def main():
    args = parser.parse_args()
    run = common.Run(args, 'dcgan_baseline')
    data = run.load_data()
    batches = run.batches(data)
    evaluator = common.Evaluator(data, args, run.device)
    G_raw = common.DCGANGenerators(1, args.latent_dim, args.img_size, data.shape[0], ngf=args.ngf)
    D_raw = common.DCGANDiscriminator(args.img_size, data.shape[0], ndf=args.ngf)
    G, D = run.prepare(G_raw), run.prepare(D_raw)
    opt_G = torch.optim.Adam(G_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    opt_D = torch.optim.Adam(D_raw.parameters(), lr=args.lr, betas=(args.b1, args.b2))
    fixed_z = torch.randn(64, args.latent_dim, device=run.device)
    start = run.resume(G=G_raw, D=D_raw, opt_G=opt_G, opt_D=opt_D)
    bce = F.binary_cross_entropy_with_logits

    def sample_fn(n):
        return common.sample_generators(G_raw, n, args.latent_dim, args.batch_size, run.device)

    metrics = {}
    for it in range(start, run.n_iters):
        real, _ = batches.get(it)
        z = torch.randn(len(real), args.latent_dim, device=run.device)
        with run.autocast():
            fake = G(z)[0]
            # real and fake in separate D calls, as pytorch/examples' DCGAN: D's batch norm must not
            # see a mixed batch (its statistics would give the two sets away)
            real_logits, fake_logits = D(real).float(), D(fake.detach()).float()
            loss_D = bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
        run.step(loss_D, opt_D)
        D_raw.requires_grad_(False)
        with run.autocast():
            out = D_raw(fake).float()
            loss_G = bce(out, torch.ones_like(out))
        run.step(loss_G, opt_G)
        D_raw.requires_grad_(True)
        if run.due(it, args.ckpt_interval):
            run.save_checkpoint(it, G=G_raw, D=D_raw, opt_G=opt_G, opt_D=opt_D)
        metrics = evaluator.due(it, run.n_iters, sample_fn)
        if metrics or run.due(it, args.log_interval):
            run.log(it, {'D': loss_D, 'G': loss_G}, metrics)
        if run.due(it, args.sample_interval):
            with common.sampling(G_raw):
                run.save_samples(it, G_raw(fixed_z).view(8, 8, *data.shape))
    run.finish(run.n_iters - 1, metrics)


if __name__ == '__main__':
    common.run_main(main)
