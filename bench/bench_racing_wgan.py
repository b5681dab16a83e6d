"""Speed of racing_wgan.py: against the classic PyTorch-GAN wgan.py, and against --n_gen.

1. One epoch of standard WGAN (--n_gen 1) on 60,000 28x28 images, classic layer sizes, batch 64,
   against eriklindernoren/PyTorch-GAN implementations/wgan/wgan.py on the same images. Offline,
   the images are the embedded digits resized to 28x28 and tiled to 60,000, written as MNIST idx
   files that both scripts read. Runs alternate (A B A B ...); whole-process wall time each.
   The classic script is not part of this repository: get it yourself and pass its path, e.g.
     git clone https://github.com/eriklindernoren/PyTorch-GAN bench/work/PyTorch-GAN
     python bench/bench_racing_wgan.py --classic bench/work/PyTorch-GAN/implementations/wgan/wgan.py
2. Seconds per iteration for --n_gen 1, 2, 4, 8 on the same images, next to the multiply-adds
   each iteration needs: each extra generator should cost no more than its extra arithmetic.
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--classic', default=os.path.join(REPO, 'bench/work/classic/implementations/wgan/wgan.py'))
parser.add_argument('--work', default=os.path.join(REPO, 'bench/work/racing_wgan'))
parser.add_argument('--rounds', type=int, default=2, help='alternating runs of each script')
parser.add_argument('--gen_iters', type=int, default=500, help='iterations per --n_gen timing')
parser.add_argument('--threads', default=os.environ.get('OMP_NUM_THREADS', '2'))


def write_idx(path, array):
    """MNIST idx format: magic (0, 0, 8 = ubyte, ndim), big-endian dims, raw bytes."""
    with open(path, 'wb') as f:
        f.write(bytes([0, 0, 8, array.ndim]))
        for d in array.shape:
            f.write(int(d).to_bytes(4, 'big'))
        f.write(array.astype(np.uint8).tobytes())


def write_fake_mnist(mnist_root):
    """Digits resized to 28x28, tiled to 60,000 (train) and 10,000 (test), as MNIST/raw idx files."""
    images, labels = common.load_digits()
    images = common.resize_uint8(images, 28)[:, 0].numpy()
    raw = os.path.join(mnist_root, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (('train', 60000), ('t10k', 10000)):
        idx = np.arange(n) % len(images)
        write_idx(os.path.join(raw, f'{prefix}-images-idx3-ubyte'), images[idx])
        write_idx(os.path.join(raw, f'{prefix}-labels-idx1-ubyte'), labels.numpy()[idx])


def timed(cmd, cwd, env):
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'failed: {" ".join(cmd)}\n{out.stderr[-2000:]}')
    return time.perf_counter() - start


def macs_per_iteration(k, batch=64, latent=100, pixels=784, n_critic=5):
    g = latent * 128 + 128 * 256 + 256 * 512 + 512 * 1024 + 1024 * pixels      # one G forward
    d = pixels * 512 + 512 * 256 + 256                                        # one D forward
    critic_step = k * batch * g + 3 * (1 + k) * batch * d                    # G fwd, D fwd+bwd
    generator_step = 3 * k * batch * (g + d)                                  # every n_critic
    return critic_step + generator_step / n_critic


def main():
    args = parser.parse_args()
    if not os.path.exists(args.classic):
        sys.exit(f'classic wgan.py not found at {args.classic}: see this script\'s docstring')
    work = os.path.abspath(args.work)
    classic_dir = os.path.join(work, 'classic', 'implementations', 'wgan')
    os.makedirs(classic_dir, exist_ok=True)
    shutil.copy(args.classic, os.path.join(classic_dir, 'wgan.py'))
    mnist_root = os.path.join(work, 'classic', 'data', 'mnist')   # the classic reads ../../data/mnist
    write_fake_mnist(mnist_root)
    env = dict(os.environ, OMP_NUM_THREADS=args.threads, PYTHONPATH=REPO)

    classic = [sys.executable, 'wgan.py', '--n_epochs', '1']
    ours = [sys.executable, os.path.join(REPO, 'racing_wgan.py'), '--n_gen', '1', '--dataset', 'mnist',
            '--data_root', mnist_root, '--img_size', '28', '--n_epochs', '1', '--batch_size', '64',
            '--sample_interval', '400', '--log_interval', '200']
    times = {'classic': [], 'ours': []}
    for r in range(args.rounds):
        times['classic'].append(timed(classic, classic_dir, env))
        times['ours'].append(timed(ours + ['--out_dir', os.path.join(work, f'ours-{r}')], work, env))
        print(f'round {r}: classic {times["classic"][-1]:.1f} s, ours {times["ours"][-1]:.1f} s', flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f'one epoch, 938 batches, whole process: classic {best["classic"]:.1f} s, ours {best["ours"]:.1f} s, '
          f'speed-up {best["classic"] / best["ours"]:.2f}x (best of {args.rounds}; threads {args.threads})')

    print('\n--n_gen scaling (seconds per iteration, measured inside the training loop):')
    rows = []
    for k in (1, 2, 4, 8):
        out = os.path.join(work, f'gen{k}')
        shutil.rmtree(out, ignore_errors=True)
        timed(ours[:2] + ['--n_gen', str(k)] + ours[4:-6] + ['--n_iters', str(args.gen_iters), '--sample_interval', '0',
                                                            '--log_interval', '100', '--out_dir', out], work, env)
        with open(os.path.join(out, 'metrics.csv')) as f:   # loop time between the first and last log
            logged = [(int(r['iteration']), float(r['wall_seconds'])) for r in csv.DictReader(f)]
        (i0, t0), (i1, t1) = logged[0], logged[-2]   # the last row also holds the final evaluation
        rows.append((k, (t1 - t0) / (i1 - i0)))
    base_time, base_macs = rows[0][1], macs_per_iteration(1)
    print('| n_gen | ms / iteration | time vs n_gen 1 | multiply-adds vs n_gen 1 |')
    print('|---|---|---|---|')
    for k, sec in rows:
        print(f'| {k} | {1000 * sec:.2f} | {sec / base_time:.2f}x | {macs_per_iteration(k) / base_macs:.2f}x |')


if __name__ == '__main__':
    main()
