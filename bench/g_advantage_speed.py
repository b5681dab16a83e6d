"""Cost of one generator update in g_advantage_dcgan.py: D frozen (the script) vs D's weight
gradients computed and thrown away (pytorch/examples' dcgan.py). With R = 50 the generator
updates are almost all of the work, so this is the step that matters.

    OMP_NUM_THREADS=1 python bench/g_advantage_speed.py                 # 16 px, widths 32 and 64
    OMP_NUM_THREADS=1 python bench/g_advantage_speed.py --img_size 32

Interleaved: blocks of --steps updates alternate between the two variants (order flipped every
round), --rounds rounds; reports the median ms per update of each and their ratio.
"""
import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common                      # noqa: E402
import g_advantage_dcgan as gad    # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--img_size', type=int, default=16)
p.add_argument('--widths', type=int, nargs='+', default=[32, 64])
p.add_argument('--batch_size', type=int, default=64)
p.add_argument('--steps', type=int, default=10)
p.add_argument('--rounds', type=int, default=7)
args = p.parse_args()
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))


def g_update(G, D, opt_G, freeze):
    z = torch.randn(args.batch_size, 100)
    if freeze:
        with gad.frozen(D):
            loss = gad.g_loss(D(G(z)[0]))
    else:
        loss = gad.g_loss(D(G(z)[0]))
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()


def main():
    print(f'command: OMP_NUM_THREADS={torch.get_num_threads()} python bench/g_advantage_speed.py '
          + ' '.join(sys.argv[1:]))
    for width in args.widths:
        torch.manual_seed(0)
        G = common.DCGANGenerators(1, 100, args.img_size, 1, ngf=width)
        D = common.DCGANDiscriminator(args.img_size, 1, ndf=width)
        opt_G = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
        for freeze in (True, False):  # warm-up
            for _ in range(3):
                g_update(G, D, opt_G, freeze)
        times = {True: [], False: []}
        for r in range(args.rounds):
            for freeze in ((True, False) if r % 2 == 0 else (False, True)):
                t = time.perf_counter()
                for _ in range(args.steps):
                    g_update(G, D, opt_G, freeze)
                times[freeze].append((time.perf_counter() - t) / args.steps * 1000)
        frozen, plain = statistics.median(times[True]), statistics.median(times[False])
        print(f'{args.img_size} px, ngf = ndf = {width}, batch {args.batch_size}: G update with D frozen '
              f'{frozen:.1f} ms, with D weight grads {plain:.1f} ms, ratio {plain / frozen:.2f}x '
              f'(median of {args.rounds} interleaved blocks of {args.steps})', flush=True)


if __name__ == '__main__':
    main()
