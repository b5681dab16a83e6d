"""The auction's cost per iteration (N = 6), and batched bids against a plain double loop.

    OMP_NUM_THREADS=1 python bench/auction_speed.py       # writes bench/results/auction_speed.md

On a shared machine whole-run timings drift with the load, so everything here is timed in small
interleaved blocks inside one process and reported as medians of per-block ratios:
1. Per iteration, with the script's nets and functions: the ordinary step of all N pairs (D step +
   G step, as in auction_gan.py's loop), the bids alone (lots from every G_i and the N x N bid
   matrix, bid_matrix) and the whole auction (bids + scores + the auxiliary step). Overhead =
   t(auction part) / t(ordinary step), at --lot_size 16, 32 (the default) and 64.
2. The N x N bids: one batched call of the stacked discriminators (bid_matrix) against N^2 calls of
   N separate single discriminators holding the same weights.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

spec = importlib.util.spec_from_file_location('auction_gan', os.path.join(REPO, 'auction_gan.py'))
auction_gan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(auction_gan)


class PlainRun:
    """The parts of common.Run the step functions use, single process, fp32."""
    autocast = staticmethod(contextlib.nullcontext)
    all_reduce_mean = staticmethod(lambda x: x)

    @staticmethod
    def step(loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def make_setup(case, n=6, batch=64, latent=100):
    torch.manual_seed(0)
    if case == 'ring8_mlp128':
        data = common.load_data('ring8')
        G = common.MLPGenerators(n, latent, (2,), hidden=(128,) * 3, batchnorm=False, tanh=False)
        D = common.MLPDiscriminator((2,), hidden=(128,) * 3, n_nets=n)
    else:  # 16 x 16 RGB images, DCGAN pairs of width 32
        data = common.load_data('stacked-digits', img_size=16)
        G = common.DCGANGenerators(n, latent, 16, 3, ngf=32)
        D = common.DCGANDiscriminator(16, 3, ndf=32, n_nets=n, batchnorm=False)
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return dict(data=data, G=G, D=D, opt_G=opt_G, opt_D=opt_D, n=n, batch=batch, latent=latent)


def ordinary_step(s):
    """auction_gan.py's ordinary step for all N pairs (loss gan, n_critic 1)."""
    real, _ = s['data'].batch(torch.randint(len(s['data']), (s['batch'],)))
    fakes = s['G'](torch.randn(s['n'], s['batch'], s['latent']))
    loss_D = auction_gan.d_loss(s['D'](real), s['D'](fakes.detach()), 'gan')
    PlainRun.step(loss_D.sum(), s['opt_D'])
    loss_G = auction_gan.g_loss(s['D'](fakes), 'gan')
    PlainRun.step(loss_G.sum(), s['opt_G'])


def bids(s, lot_size):
    with common.sampling(s['G']):
        lots = s['G'](torch.randn(s['n'], lot_size, s['latent']))
        X, items, _ = auction_gan.bid_matrix(s['D'], lots, 'gan')
    return lots, X, items


def whole_auction(s, lot_size):
    lots, X, items = bids(s, lot_size)
    winner = auction_gan.auction_scores(X).argmax().view(1)
    real, _ = s['data'].batch(torch.randint(len(s['data']), (lot_size,)))
    auction_gan.auxiliary_step(s['D'], s['D'], s['opt_D'], real, lots, items, winner, 'gan', PlainRun())


def timed(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1000


def iteration_costs(case, blocks, reps):
    s = make_setup(case)
    parts = {'ordinary': lambda: ordinary_step(s)}
    for L in (16, 32, 64):
        parts[f'bids_lot{L}'] = lambda L=L: bids(s, L)
        parts[f'auction_lot{L}'] = lambda L=L: whole_auction(s, L)
    for fn in parts.values():   # warm-up (and optimizer state)
        fn()
    ms = {k: [] for k in parts}
    for _ in range(blocks):      # interleaved blocks
        for k, fn in parts.items():
            ms[k].append(timed(fn, reps))
    out = {'ordinary_ms': round(statistics.median(ms['ordinary']), 2)}
    for k in parts:
        if k != 'ordinary':
            ratios = [t / o for t, o in zip(ms[k], ms['ordinary'])]
            out[k] = {'ms': round(statistics.median(ms[k]), 2), 'overhead': round(statistics.median(ratios), 3),
                      'overhead_q25_q75': [round(q, 3) for q in statistics.quantiles(ratios, n=4)[::2]]}
    return out


def single_discriminators(stacked, template):
    """N separate n_nets=1 discriminators holding the stacked members' weights (row i = member i)."""
    n, nets = stacked.n_nets, []
    for i in range(n):
        net = template()
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        net.load_state_dict({k: v.view(n, -1)[i].view(shapes[k]) for k, v in stacked.state_dict().items()})
        nets.append(net)
    return nets


def loop_bids(nets, lots):
    n = len(nets)
    X = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            X[i, j] = torch.sigmoid(nets[j](lots[i])).mean()
    return X


def bid_costs(blocks, reps, n=6, L=32):
    torch.manual_seed(0)
    cases = {
        'ring8_mlp128': (common.MLPDiscriminator((2,), hidden=(128,) * 3, n_nets=n),
                         lambda: common.MLPDiscriminator((2,), hidden=(128,) * 3), torch.randn(n, L, 2)),
        'dcgan32_16px_rgb': (common.DCGANDiscriminator(16, 3, ndf=32, n_nets=n, batchnorm=False),
                             lambda: common.DCGANDiscriminator(16, 3, ndf=32, batchnorm=False),
                             torch.randn(n, L, 3, 16, 16)),
    }
    out = {}
    with torch.no_grad():
        for name, (stacked, template, lots) in cases.items():
            nets = single_discriminators(stacked, template)
            diff = float((auction_gan.bid_matrix(stacked, lots, 'gan')[0] - loop_bids(nets, lots)).abs().max())
            batched, looped = [], []
            for _ in range(blocks):
                batched.append(timed(lambda: auction_gan.bid_matrix(stacked, lots, 'gan'), reps))
                looped.append(timed(lambda: loop_bids(nets, lots), reps))
            out[name] = {'batched_ms': round(statistics.median(batched), 3),
                         'loop_ms': round(statistics.median(looped), 3),
                         'speedup': round(statistics.median([lo / b for lo, b in zip(looped, batched)]), 2),
                         'max_abs_diff': diff}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--blocks', type=int, default=15)
    p.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'auction_speed.md'))
    a = p.parse_args()
    torch.set_num_threads(1)
    results = {'command': 'OMP_NUM_THREADS=1 python bench/auction_speed.py', 'machine': '2-core CPU, shared',
               'threads': torch.get_num_threads(), 'n_gans': 6, 'batch_size': 64,
               'iteration': {'ring8_mlp128': iteration_costs('ring8_mlp128', a.blocks, reps=10),
                             'stacked_digits16_dcgan32': iteration_costs('dcgan', a.blocks, reps=2)},
               'bids': bid_costs(a.blocks, reps=5)}
    write_md(results, a.out)
    print(json.dumps(results, indent=2))


def write_md(results, path):
    lines = ['# auction_gan.py: cost of the auction (written by bench/auction_speed.py)', '',
             f'Command: `{results["command"]}`; machine: {results["machine"]}, {results["threads"]} thread; '
             f'N = {results["n_gans"]} pairs, batch {results["batch_size"]}. Medians over interleaved blocks; '
             'overhead = time / time of one ordinary step of all N pairs (q25-q75 of the block ratios).', '',
             '| nets | ordinary step | part | lot size | ms | overhead |', '|---|---|---|---|---|---|']
    for case, r in results['iteration'].items():
        for part in ('bids', 'auction'):
            for lot in (16, 32, 64):
                x = r[f'{part}_lot{lot}']
                q = x['overhead_q25_q75']
                what = 'bids only' if part == 'bids' else 'bids + aux step'
                lines.append(f'| {case} | {r["ordinary_ms"]:.1f} ms | {what} | {lot} | {x["ms"]:.1f} | '
                             f'{x["overhead"]:.0%} ({q[0]:.0%}-{q[1]:.0%}) |')
    lines += ['', '| bids, N x N, lot 32 | one batched call | N^2 single-net calls | loop / batched | max abs diff |',
              '|---|---|---|---|---|']
    for case, r in results['bids'].items():
        lines.append(f'| {case} | {r["batched_ms"]:.1f} ms | {r["loop_ms"]:.1f} ms | {r["speedup"]:.2f}x | '
                     f'{r["max_abs_diff"]:.1e} |')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n\nRaw numbers:\n\n```json\n' + json.dumps(results, indent=1) + '\n```\n')


if __name__ == '__main__':
    main()
