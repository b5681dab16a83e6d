"""Speed of racing_dcgan.py on this machine.

1. `--part epoch` (default): time per epoch of `racing_dcgan.py --n_gen 1` against the classic
   pytorch/examples dcgan/main.py loop at 64x64 with the same architecture sizes (ngf = ndf = 64,
   nz = 100, batch 64) on the same images: the digits resized to 64x64 and written once as a PNG
   folder that both read. The classic loop is not copied here; `classic_loop()` below re-creates it
   (per-sample ImageFolder + DataLoader with 2 workers, Sequential nets ending in Sigmoid, BCELoss,
   D on real then on fake.detach(), G through D(fake), .item() and a print every iteration, a
   sample grid every 100 iterations, state dicts saved every epoch). Runs alternate
   (classic, ours, ours --amp, classic, ...); each is a fresh process and the figure is its second
   epoch (the first warms up). Then --n_gen 2 and 4: the cost per extra generator.
2. `--part ablation`: one training step at 32x32, ngf = ndf = 64, K = 2, with each design choice of
   racing_dcgan.py switched off in turn, interleaved: separate D calls per batch (the script) vs
   one D call with per-part batch norm; channels-last vs NCHW; D frozen in the G step vs not.
3. `--part ngen`: CPU seconds of one training step at 64x64 (as part 1) for --n_gen 1, 2, 4,
   interleaved: the cost per extra generator without part 1's load noise.
4. `--part ensemble`: the K generators as one module of grouped transposed convolutions
   (common.DCGANGenerators, what the script uses) against K separate one-generator modules.

    python bench/bench_racing_dcgan.py                    # part 1, ~10 CPU minutes on 2 cores
    python bench/bench_racing_dcgan.py --part ablation    # part 2, ~2 CPU minutes
    python bench/bench_racing_dcgan.py --part ngen --n_gens 1 2 4 --steps 2   # part 3, ~2 CPU minutes
    python bench/bench_racing_dcgan.py --part ensemble    # part 4, ~2 CPU minutes
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--part', choices=('epoch', 'ablation', 'ngen', 'ensemble', 'classic'), default='epoch',
                    help='classic: run the classic loop alone (used by part 1)')
parser.add_argument('--images', type=int, default=320, help='images in the PNG folder (320 = 5 batches of 64)')
parser.add_argument('--rounds', type=int, default=2, help='alternating classic / ours / ours --amp runs')
parser.add_argument('--n_gens', type=int, nargs='*', default=[2, 4],
                    help='(epoch) extra --n_gen values timed once; (ngen) the values to time, the first as reference')
parser.add_argument('--epochs', type=int, default=2, help='epochs per run; the last one is timed')
parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'racing_dcgan'))
parser.add_argument('--dataroot', default=None, help='(classic) the PNG folder')
parser.add_argument('--steps', type=int, default=3, help='(ablation, ensemble) timed steps per variant')


# ---- part 1: the classic loop, re-created ---------------------------------------------------------

def classic_loop(args):
    """pytorch/examples dcgan/main.py's training loop and nets (ngf = ndf = 64, nz = 100, nc = 3)."""
    import torchvision.datasets as dset
    import torchvision.transforms as transforms
    import torchvision.utils as vutils
    torch.manual_seed(0)
    nz, ngf, ndf, nc, size = 100, 64, 64, 3, 64
    dataset = dset.ImageFolder(root=args.dataroot, transform=transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]))
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=2)

    def weights_init(m):
        if 'Conv' in type(m).__name__:
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif 'BatchNorm' in type(m).__name__:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def up(cin, cout):
        return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

    def down(cin, cout):
        return [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]

    netG = nn.Sequential(nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
                         *up(ngf * 8, ngf * 4), *up(ngf * 4, ngf * 2), *up(ngf * 2, ngf),
                         nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    netD = nn.Sequential(nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                         *down(ndf, ndf * 2), *down(ndf * 2, ndf * 4), *down(ndf * 4, ndf * 8),
                         nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(), nn.Flatten(0))
    netG.apply(weights_init)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    fixed_noise = torch.randn(64, nz, 1, 1)
    optimizerD = torch.optim.Adam(netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
    outf = os.path.join(os.path.dirname(args.dataroot), 'classic_out')
    os.makedirs(outf, exist_ok=True)
    epoch_seconds = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for i, data in enumerate(dataloader, 0):
            netD.zero_grad()
            real = data[0]
            batch_size = real.size(0)
            label = torch.full((batch_size,), 1.0)
            output = netD(real)
            errD_real = criterion(output, label)
            errD_real.backward()
            D_x = output.mean().item()
            noise = torch.randn(batch_size, nz, 1, 1)
            fake = netG(noise)
            label.fill_(0.0)
            output = netD(fake.detach())
            errD_fake = criterion(output, label)
            errD_fake.backward()
            D_G_z1 = output.mean().item()
            errD = errD_real + errD_fake
            optimizerD.step()
            netG.zero_grad()
            label.fill_(1.0)
            output = netD(fake)
            errG = criterion(output, label)
            errG.backward()
            D_G_z2 = output.mean().item()
            optimizerG.step()
            print('[%d/%d][%d/%d] Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f'
                  % (epoch, args.epochs, i, len(dataloader), errD.item(), errG.item(), D_x, D_G_z1, D_G_z2))
            if i % 100 == 0:
                vutils.save_image(real, f'{outf}/real_samples.png', normalize=True)
                fake = netG(fixed_noise)
                vutils.save_image(fake.detach(), f'{outf}/fake_samples_epoch_{epoch:03d}.png', normalize=True)
        torch.save(netG.state_dict(), f'{outf}/netG_epoch_{epoch}.pth')
        torch.save(netD.state_dict(), f'{outf}/netD_epoch_{epoch}.pth')
        epoch_seconds.append(time.perf_counter() - start)
    print(json.dumps({'epoch_seconds': epoch_seconds, 'batches': len(dataloader)}))


def write_png_folder(root, n_images):
    """The first n digits at 64x64 (resized once), as grey PNGs in root/digits/ (ImageFolder wants a class)."""
    from PIL import Image
    folder = os.path.join(root, 'digits')
    if os.path.isdir(folder) and len(os.listdir(folder)) == n_images:
        return root
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    images, _ = common.load_digits()
    images = common.resize_uint8(images[:n_images], 64)
    for i, im in enumerate(images):
        Image.fromarray(im[0].numpy(), mode='L').save(os.path.join(folder, f'{i:05d}.png'))
    return root


def run(cmd, env):
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f'failed: {" ".join(str(c) for c in cmd)}\n{result.stderr[-3000:]}')
    return result.stdout


def time_classic(args, png, env):
    out = run([sys.executable, __file__, '--part', 'classic', '--dataroot', png, '--epochs', args.epochs], env)
    return json.loads(out.strip().splitlines()[-1])['epoch_seconds'][-1]


def time_ours(args, png, env, n_gen=1, amp=False, tag=''):
    """racing_dcgan.py's last epoch, from the wall clock in its metrics.csv (one row per epoch)."""
    out_dir = os.path.join(args.work, f'ours{tag}')
    per_epoch = args.images // 64
    cmd = [sys.executable, os.path.join(REPO, 'racing_dcgan.py'), '--dataset', 'folder', '--data_root', png,
           '--channels', 3, '--img_size', 64, '--ngf', 64, '--ndf', 64, '--latent_dim', 100, '--batch_size', 64,
           '--n_gen', n_gen, '--n_epochs', args.epochs, '--log_interval', per_epoch, '--sample_interval', 0,
           '--ckpt_interval', 0, '--out_dir', out_dir] + (['--amp'] if amp else [])
    if os.path.exists(os.path.join(out_dir, 'metrics.csv')):
        os.remove(os.path.join(out_dir, 'metrics.csv'))
    run(cmd, env)
    with open(os.path.join(out_dir, 'metrics.csv')) as f:
        wall = [float(r['wall_seconds']) for r in csv.DictReader(f)]
    return wall[-1] - wall[-2]


def part_epoch(args):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), PYTHONPATH=REPO)
    png = write_png_folder(os.path.join(args.work, 'png'), args.images)
    print(f'{args.images} digits as 64x64 PNGs in {png}; {args.images // 64} batches of 64 per epoch; '
          f'OMP_NUM_THREADS={env["OMP_NUM_THREADS"]}; each figure is the last of {args.epochs} epochs', flush=True)
    times = {'classic': [], 'ours': [], 'ours --amp': []}
    for r in range(args.rounds):
        times['classic'].append(time_classic(args, png, env))
        times['ours'].append(time_ours(args, png, env))
        times['ours --amp'].append(time_ours(args, png, env, amp=True, tag='_amp'))
        print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:.1f} s' for k, v in times.items()), flush=True)
    for k in args.n_gens:
        times[f'ours --n_gen {k}'] = [time_ours(args, png, env, n_gen=k, tag=f'_k{k}')]
        print(f'--n_gen {k}: {times[f"ours --n_gen {k}"][0]:.1f} s', flush=True)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    print('\n| run | seconds per epoch (each run) | mean | vs classic |\n|---|---|---|---|')
    for k, v in times.items():
        print(f'| {k} | {", ".join(f"{x:.1f}" for x in v)} | {mean[k]:.1f} | {mean["classic"] / mean[k]:.2f}x |')
    ratios = [c / o for c, o in zip(times['classic'], times['ours'])]
    print(f'\nclassic / ours per round: {", ".join(f"{x:.2f}" for x in ratios)}; '
          f'fp32 / amp per round: {", ".join(f"{a / b:.2f}" for a, b in zip(times["ours"], times["ours --amp"]))}')
    for k in args.n_gens:
        print(f'--n_gen {k}: {mean[f"ours --n_gen {k}"] / mean["ours"]:.2f}x the time of --n_gen 1, '
              f'{(mean[f"ours --n_gen {k}"] / mean["ours"] - 1) / (k - 1):.2f}x per extra generator')


# ---- part 2: the design choices, one step at a time -----------------------------------------------

class PartBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with separate statistics for each of `parts` equal slices of the batch."""
    parts = 1

    def forward(self, x):
        p, (n, c, h, w) = self.parts, x.shape
        y = x.reshape(p, n // p, c, h, w).transpose(0, 1).reshape(n // p, p * c, h, w)
        y = F.batch_norm(y, None, None, self.weight.repeat(p), self.bias.repeat(p), True, 0.0, self.eps)
        return y.reshape(n // p, p, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def part_ablation(args):
    sys.argv = ['racing_dcgan.py']
    import importlib.util
    spec = importlib.util.spec_from_file_location('racing_dcgan', os.path.join(REPO, 'racing_dcgan.py'))
    rd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rd)
    B = 64

    def nets(one_call, channels_last, S=32, K=2, C=1):
        torch.manual_seed(0)
        G, D = common.DCGANGenerators(K, 100, S, C, 64), rd.Discriminator(S, C, ndf=64)
        if one_call:
            for i, m in enumerate(D.body):
                if isinstance(m, nn.BatchNorm2d):
                    D.body[i] = PartBatchNorm2d(m.num_features)
        if channels_last:
            G.to(memory_format=torch.channels_last)
            D.to(memory_format=torch.channels_last)
        return G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())

    def discriminate(D, fakes, real, one_call):
        if not one_call:
            return D(fakes, real)                               # the script: one D call per batch
        batches = ([] if real is None else [real]) + list(fakes)
        for m in D.modules():
            if isinstance(m, PartBatchNorm2d):
                m.parts = len(batches)
        return common.DCGANDiscriminator.forward(D, torch.cat(batches)).view(len(batches), -1)

    def step(state, one_call, channels_last, freeze, S=32, C=1):
        G, D, opt_G, opt_D = state
        real = torch.randn(B, C, S, S)
        real = real.contiguous(memory_format=torch.channels_last) if channels_last else real
        fakes = G(torch.randn(B, 100))
        logits = discriminate(D, fakes.detach(), real, one_call)
        loss_D = rd.bce(logits[0], 1.0) + rd.bce(logits[1:], 0.0).mean()
        opt_D.zero_grad(); loss_D.backward(); opt_D.step()
        D.requires_grad_(not freeze)
        logits = discriminate(D, fakes, None, one_call)
        loss_G = (rd.bce(logits, 1.0) + rd.racing_term(logits.sigmoid(), 'lag')).sum()
        opt_G.zero_grad(); loss_G.backward(); opt_G.step()
        D.requires_grad_(True)

    if args.part == 'ngen':   # the script's step at 64x64, 3 channels, for each K
        states = {k: nets(False, True, S=64, K=k, C=3) for k in args.n_gens}
        times = {k: [] for k in args.n_gens}
        for rep in range(args.steps + 1):
            for k in args.n_gens:
                start = time.process_time()
                step(states[k], False, True, True, S=64, C=3)
                if rep:
                    times[k].append(time.process_time() - start)
        one = min(times[args.n_gens[0]])
        print(f'one racing_dcgan.py training step, 64x64x3, ngf = ndf = 64, batch 64, CPU seconds (min of '
              f'{args.steps}), OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}\n\n'
              f'| --n_gen | CPU s per step | vs --n_gen {args.n_gens[0]} | per extra generator |\n|---|---|---|---|')
        for k, t in times.items():
            extra = f'{(min(t) / one - 1) / (k - args.n_gens[0]):.2f}x' if k != args.n_gens[0] else ''
            print(f'| {k} | {min(t):.2f} | {min(t) / one:.2f}x | {extra} |')
        return
    variants = {'racing_dcgan.py (separate D calls, channels-last, frozen D)': (False, True, True),
                'one D call, per-part batch norm': (True, True, True),
                'NCHW instead of channels-last': (False, False, True),
                'D weight gradients in the G step': (False, True, False),
                'NCHW and D weight gradients (a plain DCGAN step)': (False, False, False)}
    states = {name: nets(v[0], v[1]) for name, v in variants.items()}
    times = {name: [] for name in variants}
    for rep in range(args.steps + 1):                       # interleaved; the first pass warms up
        for name, v in variants.items():
            start = time.process_time()
            step(states[name], *v)
            if rep:
                times[name].append(time.process_time() - start)
    ref = min(times[next(iter(variants))])
    print(f'one training step, 32x32, ngf = ndf = 64, K = 2, batch 64, CPU seconds (min of {args.steps}), '
          f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}\n\n| variant | CPU s per step | vs the script |\n|---|---|---|')
    for name, t in times.items():
        print(f'| {name} | {min(t):.3f} | {min(t) / ref:.2f}x |')


def part_ensemble(args):
    """common.DCGANGenerators(K) (grouped transposed convs) against K separate K = 1 modules."""
    print(f'generator forward + backward, batch 64, channels-last, CPU seconds (min of {args.steps}), '
          f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}\n\n'
          '| size, ngf | K | one grouped module | K separate modules | grouped / separate |\n|---|---|---|---|---|')
    for size, ngf in ((32, 16), (32, 64), (64, 64)):
        for k in (2, 4):
            torch.manual_seed(0)
            grouped = common.DCGANGenerators(k, 100, size, 1, ngf).to(memory_format=torch.channels_last)
            separate = [common.DCGANGenerators(1, 100, size, 1, ngf).to(memory_format=torch.channels_last)
                        for _ in range(k)]
            z = torch.randn(64, 100)
            times = {'grouped': [], 'separate': []}
            for rep in range(args.steps + 1):
                for name in times:
                    start = time.process_time()
                    for net in ([grouped] if name == 'grouped' else separate):
                        net(z).square().mean().backward()
                    if rep:
                        times[name].append(time.process_time() - start)
            g, s_ = min(times['grouped']), min(times['separate'])
            print(f'| {size}, {ngf} | {k} | {g:.3f} | {s_:.3f} | {g / s_:.2f}x |', flush=True)


def main():
    args = parser.parse_args()
    if args.part == 'classic':
        classic_loop(args)
    elif args.part in ('ablation', 'ngen'):
        part_ablation(args)
    elif args.part == 'ensemble':
        part_ensemble(args)
    else:
        part_epoch(args)


if __name__ == '__main__':
    main()
