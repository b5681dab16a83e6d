"""Benchmark: fid.prdc against the reference `prdc` package (clovaai).

Same random float32 features for both (real and fake: independent N(0, 1)
draws, i.e. two samples of one distribution), nearest_k = 5, this machine's CPU threads. Each measurement
runs in a fresh subprocess (peak RSS is that process's own); fid.prdc and the
reference alternate (ABBA) so that load from other processes hits both alike.
Also measures this CPU's float32 matmul peak and sets it against the
arithmetic floor: 2 D (N^2/2 + M^2/2 + N M) flops (the cross block in full,
the two within-set blocks by symmetry in half).

    python bench/bench_prdc.py                       # 10k vs 10k 2048-d, 2 rounds, + 50k
    python bench/bench_prdc.py --n 2000 --big 0 --out /tmp/x.md   # smoke run
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402


def features(n, m, d, seed=0):
    real = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    fake = np.random.default_rng(seed + 1).standard_normal((m, d), dtype=np.float32)
    return real, fake


def worker(args):
    """One measurement in this process: prints a JSON line."""
    real, fake = features(args.n, args.m, args.d)
    use0 = resource.getrusage(resource.RUSAGE_SELF)
    base = use0.ru_maxrss / 2 ** 20
    t = time.perf_counter()
    if args.worker == 'reference':
        import contextlib
        import io
        import prdc
        with contextlib.redirect_stdout(io.StringIO()):
            out = {k: float(v) for k, v in prdc.compute_prdc(real, fake, args.k).items()}
    else:
        out = fid.prdc(real, fake, args.k)
    dt = time.perf_counter() - t
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps(dict(seconds=dt, result=out, rss_gb=use.ru_maxrss / 2 ** 20,
                          features_rss_gb=base, cpu_seconds=use.ru_utime + use.ru_stime - use0.ru_utime - use0.ru_stime)))


def measure(which, n, m, d, k):
    cmd = [sys.executable, __file__, '--worker', which, '--n', str(n), '--m', str(m),
           '--d', str(d), '--k', str(k)]
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f'{which} failed:\n{p.stderr[-3000:]}')
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res['load'] = (load, os.getloadavg()[0])      # 1-minute load average before / after
    return res


def matmul_gflops(reps=5):
    """Best of `reps` float32 matmul GFLOP/s: torch.mm on all threads for the
    square 2048 shape bench_fid.py uses and for fid.prdc's block shape
    (1024 x 2064 @ 2064 x 4096), and that block shape as fid.prdc runs it: one
    single-threaded matmul per core at the same time."""
    def best(fn, flops):
        fn()
        b = float('inf')
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            b = min(b, time.perf_counter() - t)
        return flops / b / 1e9

    out = {}
    for mm, kk, nn in ((2048, 2048, 2048), (1024, 2064, 4096)):
        a, b, c = torch.randn(mm, kk), torch.randn(nn, kk), torch.empty(mm, nn)
        out[f'{mm}x{kk} @ {kk}x{nn}, {torch.get_num_threads()} threads'] = \
            best(lambda: torch.mm(a, b.T, out=c), 2 * mm * kk * nn)
    workers = torch.get_num_threads()
    mats = [(torch.randn(1024, 2064), torch.randn(4096, 2064), torch.empty(1024, 4096))
            for _ in range(workers)]

    def concurrent():
        def one(a, b, c):
            torch.set_num_threads(1)
            torch.mm(a, b.T, out=c)
        ts = [threading.Thread(target=one, args=m) for m in mats]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    out[f'1024x2064 @ 2064x4096, {workers} at once on 1 thread each'] = \
        best(concurrent, workers * 2 * 1024 * 2064 * 4096)
    torch.set_num_threads(workers)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=10000)
    ap.add_argument('--m', type=int, default=None, help='fake features (default: --n)')
    ap.add_argument('--d', type=int, default=2048)
    ap.add_argument('--k', type=int, default=5)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--big', type=int, default=50000, help='also N vs N with fid.prdc alone (0: skip)')
    ap.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'prdc.md'))
    ap.add_argument('--worker', choices=['ours', 'reference'], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.m = args.m or args.n
    if args.worker:
        return worker(args)

    command = ' '.join(['python', 'bench/bench_prdc.py'] + sys.argv[1:])
    load0 = os.getloadavg()
    peak = matmul_gflops()
    runs = {'ours': [], 'reference': []}
    for r in range(args.rounds):
        for which in (('ours', 'reference') if r % 2 == 0 else ('reference', 'ours')):
            res = measure(which, args.n, args.m, args.d, args.k)
            runs[which].append(res)
            print(which, f"{res['seconds']:.2f} s", res['result'], flush=True)
    big = measure('ours', args.big, args.big, args.d, args.k) if args.big else None
    if big:
        print('big', big, flush=True)
    peak_after = matmul_gflops()
    load1 = os.getloadavg()

    med = {w: float(np.median([r['seconds'] for r in v])) for w, v in runs.items()}
    same = all(r['result'] == runs['reference'][0]['result'] for v in runs.values() for r in v)
    best_peak = max(max(peak.values()), max(peak_after.values()))
    flops = 2 * args.d * (args.n ** 2 / 2 + args.m ** 2 / 2 + args.n * args.m)
    floor = flops / (best_peak * 1e9)
    lines = [
        '# fid.prdc benchmark', '',
        f'`{command}`, {time.strftime("%Y-%m-%d")}, {platform.processor() or platform.machine()} '
        f'({os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads), '
        f'nearest_k = {args.k}, random float32 features (real and fake: independent N(0, 1) draws). '
        f'Load average (1/5/15 min) at the start {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, '
        f'at the end {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}.', '',
        f'## {args.n:,} vs {args.m:,} features, {args.d}-d', '',
        '| | wall s per run (ABBA order) | median | CPU s per run | load before -> after | peak RSS GB |',
        '|---|---|---|---|---|---|',
    ]
    for w, name in (('reference', 'prdc.compute_prdc'), ('ours', 'fid.prdc')):
        times = ', '.join('%.2f' % r['seconds'] for r in runs[w])
        cpu = ', '.join('%.1f' % r['cpu_seconds'] for r in runs[w])
        load = ', '.join('%.1f -> %.1f' % tuple(r['load']) for r in runs[w])
        rss = max(r['rss_gb'] for r in runs[w])
        lines.append(f'| {name} | {times} | {med[w]:.2f} | {cpu} | {load} | {rss:.2f} |')
    lines += [
        '', f'Speed-up (median reference / median fid.prdc): **{med["reference"] / med["ours"]:.2f}x**. '
        f'Same four numbers in every run: {"yes" if same else "NO"} '
        f'({runs["reference"][0]["result"]}).', '',
        '## Against the arithmetic floor', '',
        '- float32 matmul GFLOP/s, best of 5 (before / after the runs): '
        + '; '.join(f'{name}: {peak[name]:.0f} / {peak_after[name]:.0f}' for name in peak) + '.',
        f'- Floor: 2 D (N^2/2 + M^2/2 + N M) = {flops / 1e12:.2f} TFLOP at {best_peak:.0f} GFLOP/s '
        f'= {floor:.2f} s; fid.prdc\'s median {med["ours"]:.2f} s is {100 * floor / med["ours"]:.0f}% '
        f'of the floor\'s speed ({med["ours"] / floor:.2f}x the floor). The reference computes all three '
        f'matrices in full ({2 * args.d * (args.n ** 2 + args.m ** 2 + args.n * args.m) / 1e12:.2f} TFLOP).',
    ]
    if big:
        bflops = 2 * args.d * 2 * args.big ** 2
        lines += [
            '', f'## {args.big:,} vs {args.big:,} features, {args.d}-d (fid.prdc alone)', '',
            f'- {big["seconds"]:.1f} s ({100 * bflops / (best_peak * 1e9) / big["seconds"]:.0f}% of the floor\'s '
            f'speed; {big["cpu_seconds"]:.0f} CPU s; load {big["load"][0]:.1f} -> {big["load"][1]:.1f}), peak RSS {big["rss_gb"]:.2f} GB (of which {big["features_rss_gb"]:.2f} GB are the '
            f'process and the two feature arrays before the call). The reference would hold three '
            f'{args.big:,}^2 float32 matrices: {3 * 4 * args.big ** 2 / 1e9:.0f} GB.',
            f'- Result: {big["result"]}.',
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
