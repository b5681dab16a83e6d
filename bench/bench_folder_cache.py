"""The decoded folder cache (common.folder_cache) against decoding every image in memory.

A generated folder of N JPEGs of varied sizes (64 to 159 px a side, smooth random colours,
quality 90, 1,000 to a subfolder), used at --img_size 64:

1. first-run decoding: the baseline's single-process load_folder (--baseline, default the
   commit before the cache) against the cache built with --workers processes, each in a fresh
   process (wall seconds of load_data, peak RSS);
2. cached start-up: load_data of the built cache, and Data.to('cpu') in memory (a private
   copy) and memory-mapped (GAN_DATA_IN_MEMORY_MAX=0);
3. host memory of `torchrun --nproc_per_node 2 racing_dcgan.py` (nets 8 wide, --n_iters 30):
   the baseline against the cache in memory and memory-mapped; per rank the peak RSS (VmHWM),
   and the peak private (anonymous) memory and proportional set size (Pss: shared page-cache
   pages divided between the processes that map them) sampled every 0.1 s from /proc;
4. training speed: racing_dcgan.py in one process, in memory against memory-mapped, runs
   alternating (ABAB...); it/s from metrics.csv after the first --log_interval iterations;
   plus the data path alone: Batches.get per batch, in memory against memory-mapped.

    python bench/bench_folder_cache.py --n 100000 --out bench/results/folder_cache.md
    python bench/bench_folder_cache.py --n 100000 --parts train --rounds 5   # part 4 again, more pairs

Every child runs with OMP_NUM_THREADS=1 (the machine is shared). The folder and its cache live
under --work (default /tmp/bench_folder_cache), reused when they are already there.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def generate(root, n, seed=0):
    """N JPEGs, 64..159 px a side, in subfolders of 1,000; kept when already there."""
    import numpy as np
    from PIL import Image
    marker = os.path.join(root, f'.generated-{n}')
    if os.path.exists(marker):
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    t = time.time()
    for i in range(n):
        w, h = (int(v) for v in rng.integers(64, 160, 2))
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        folder = os.path.join(root, f'{i // 1000:03d}')
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f'{i:06d}.jpg'), quality=90)
    open(marker, 'w').close()
    return time.time() - t


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS='1')
    for k in ('GAN_DATA_IN_MEMORY_MAX', 'GAN_DATA_CACHE', 'GAN_DECODE_WORKERS'):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def child(code, what, root, size, extra_env=None):
    """Run `--child what` in a fresh process importing common from `code`; its JSON line."""
    out = subprocess.run([PY, os.path.abspath(__file__), '--child', what, '--code', code, '--root', root,
                          '--size', str(size)], env=env(**(extra_env or {})), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'child {what} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(args):
    import resource
    sys.path.insert(0, args.code)
    import common
    import torch
    t = time.time()
    data = common.load_data('folder', data_root=args.root, img_size=args.size)
    res = {'load_s': time.time() - t, 'n': len(data)}
    if args.child == 'load':
        t = time.time()
        moved = data.to('cpu')
        res['to_s'] = time.time() - t
        res['streamed'] = bool(getattr(moved, 'streamed', False))
    if args.child == 'batches':
        in_memory = data.to('cpu')
        os.environ['GAN_DATA_IN_MEMORY_MAX'] = '0'
        mapped = data.to('cpu')
        sources = {'memory': in_memory, 'mapped': mapped}
        times = {k: [] for k in sources}
        for block in range(6):   # alternating blocks of 200 batches of 64
            for k, d in sources.items():
                b = common.Batches(d, 64, seed=block)
                t = time.perf_counter()
                for it in range(200):
                    b.get(it)
                times[k].append((time.perf_counter() - t) / 200)
        res['per_batch_ms'] = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        res['equal'] = all(torch.equal(common.Batches(in_memory, 64, 1).get(i)[0],
                                       common.Batches(mapped, 64, 1).get(i)[0]) for i in (0, 7))
    res['maxrss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def proc_children(pid):
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in proc_children(k)]


def proc_memory(pid):
    """(VmHWM, RssAnon, Pss) in MiB, or None once the process is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            status = {line.split(':')[0]: line.split()[1] for line in f if line.endswith('kB\n')}
        with open(f'/proc/{pid}/smaps_rollup') as f:
            rollup = {line.split(':')[0]: line.split()[1] for line in f if line.endswith('kB\n')}
        return int(status['VmHWM']) / 1024, int(status['RssAnon']) / 1024, int(rollup['Pss']) / 1024
    except (OSError, KeyError, ValueError):
        return None


TRAIN = ['--dataset', 'folder', '--img_size', '64', '--n_gen', '1', '--ngf', '8', '--ndf', '8',
         '--batch_size', '64', '--sample_interval', '0', '--ckpt_interval', '0']


def torchrun_memory(code, root, out_dir, extra_env=None, n_iters=30):
    """Peak memory per rank of a 2-process torchrun racing_dcgan run (the script from `code`)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cmd = [PY, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
           os.path.join(code, 'racing_dcgan.py')] + TRAIN + ['--data_root', root, '--n_iters', str(n_iters),
                                                            '--log_interval', '10', '--out_dir', out_dir]
    t = time.time()
    proc = subprocess.Popen(cmd, env=env(PYTHONPATH=code, **(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peaks = {}
    while proc.poll() is None:
        for pid in proc_children(proc.pid):
            m = proc_memory(pid)
            if m is not None:
                old = peaks.get(pid, (0, 0, 0))
                peaks[pid] = tuple(max(a, b) for a, b in zip(old, m))
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f'torchrun failed:\n{err[-3000:]}')
    ranks = sorted(peaks.values(), key=lambda p: -p[0])[:2]   # the two workers: the largest
    return {'wall_s': time.time() - t, 'ranks': ranks, 'stdout': out}


def train_speed(root, out_dir, mapped, n_iters, log_interval):
    import csv
    cmd = [PY, os.path.join(REPO, 'racing_dcgan.py')] + TRAIN + [
        '--data_root', root, '--n_iters', str(n_iters), '--log_interval', str(log_interval), '--out_dir', out_dir]
    out = subprocess.run(cmd, env=env(**({'GAN_DATA_IN_MEMORY_MAX': '0'} if mapped else {})),
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'training failed:\n{out.stderr[-3000:]}')
    assert ('memory-mapped cache' in out.stdout) == mapped, out.stdout
    with open(os.path.join(out_dir, 'metrics.csv')) as f:
        rows = [r for r in csv.DictReader(f) if r.get('wall_seconds')]
    first, last = rows[0], rows[-1]
    return (int(last['iteration']) - int(first['iteration'])) / (float(last['wall_seconds']) - float(first['wall_seconds']))


def uptime():
    return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=100_000, help='images in the generated folder')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2, help='decoding processes for the cache')
    p.add_argument('--baseline', default='bfc6269', help='git revision whose common.py decodes in memory')
    p.add_argument('--work', default='/tmp/bench_folder_cache')
    p.add_argument('--train_iters', type=int, default=200)
    p.add_argument('--rounds', type=int, default=2, help='in-memory/mapped training pairs')
    p.add_argument('--parts', nargs='+', choices=('decode', 'torchrun', 'train'), default=['decode', 'torchrun', 'train'],
                   help='what to measure (train and torchrun need the cache: run decode once first)')
    p.add_argument('--out', default=None, help='write the results as markdown here')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--code', default=REPO, help=argparse.SUPPRESS)
    p.add_argument('--root', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args)

    os.makedirs(args.work, exist_ok=True)
    root = os.path.join(args.work, f'jpegs{args.n}')
    baseline = os.path.join(args.work, 'baseline')
    shutil.rmtree(baseline, ignore_errors=True)
    os.makedirs(baseline)
    archive = subprocess.run(['git', '-C', REPO, 'archive', args.baseline, 'common.py', 'racing_dcgan.py', 'fid.py'],
                             capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', baseline], input=archive, check=True)
    lines = [f'# Decoded folder cache: {args.n:,} JPEGs at {args.size} px', '',
             f'`python bench/bench_folder_cache.py --n {args.n} --workers {args.workers} --train_iters '
             f'{args.train_iters} --rounds {args.rounds} --parts {" ".join(args.parts)}` ({time.strftime("%Y-%m-%d")}), '
             f'{os.cpu_count()} CPUs, torch {__import__("torch").__version__}, every child with OMP_NUM_THREADS=1; '
             f'baseline: common.py of {args.baseline} (single-process decoding into one tensor per process).',
             '', f'Load at the start: `{uptime()}`', '']

    def say(line=''):
        print(line, flush=True)
        lines.append(line)

    gen_s = generate(root, args.n)
    du = subprocess.run(['du', '-sm', '--exclude=.decoded', root], capture_output=True, text=True).stdout.split()[0]
    say(f'Folder: {args.n:,} JPEGs, {du} MB' + (f', generated in {gen_s:.0f} s' if gen_s else ' (generated before)'))
    say()

    tmp = tempfile.mkdtemp(dir=args.work)
    if 'decode' in args.parts:
        decode_part(args, root, baseline, say)
    if 'torchrun' in args.parts:
        torchrun_part(root, baseline, tmp, say)
    if 'train' in args.parts:
        train_part(args, root, tmp, say)
    say(f'Load at the end: `{uptime()}`')
    shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        with open(args.out, 'w') as f:
            f.write('\n'.join(lines) + '\n')


def decode_part(args, root, baseline, say):
    """1. first-run decoding, 2. cached start-up."""
    say('## Decoding and start-up (each a fresh process)')
    say()
    say('| what | wall s | peak RSS MiB (after Data.to(cpu) too) |')
    say('|---|---|---|')
    old = child(baseline, 'load', root, args.size)
    say(f'| baseline: load_data, single-process decoding into memory | {old["load_s"]:.1f} | {old["maxrss_mb"]:.0f} |')
    shutil.rmtree(os.path.join(root, '.decoded'), ignore_errors=True)
    new = child(REPO, 'load', root, args.size, {'GAN_DECODE_WORKERS': args.workers})
    say(f'| cache: first load_data, decoding with {args.workers} processes into the cache | {new["load_s"]:.1f} | '
        f'{new["maxrss_mb"]:.0f} (the parent; Data.to copies the set into memory) |')
    cached = child(REPO, 'load', root, args.size)
    say(f'| cache: later load_data (opens the memory map) + Data.to(cpu) in memory | '
        f'{cached["load_s"]:.2f} + {cached["to_s"]:.2f} | {cached["maxrss_mb"]:.0f} |')
    mapped = child(REPO, 'load', root, args.size, {'GAN_DATA_IN_MEMORY_MAX': 0})
    assert mapped['streamed'] and not cached['streamed']
    say(f'| cache: later load_data + Data.to(cpu) memory-mapped | {mapped["load_s"]:.2f} + {mapped["to_s"]:.3f} | '
        f'{mapped["maxrss_mb"]:.0f} |')
    say()
    say(f'First-run decoding: {old["load_s"] / new["load_s"]:.2f}x faster than the baseline; a cached start-up '
        f'{old["load_s"] / (mapped["load_s"] + mapped["to_s"]):.0f}x faster.')
    say()


def torchrun_part(root, baseline, tmp, say):
    """3. host memory under torchrun."""
    say('## Host memory of `torchrun --nproc_per_node 2 racing_dcgan.py` (30 iterations)')
    say()
    say('Per rank, MiB: peak RSS (VmHWM, counts mapped file pages the process touched), peak private memory '
        '(RssAnon), peak Pss (shared pages split between the processes mapping them).')
    say()
    say('| run | wall s | rank A: VmHWM / RssAnon / Pss | rank B: VmHWM / RssAnon / Pss |')
    say('|---|---|---|---|')
    runs = [('baseline (each rank decodes into memory)', baseline, {}),
            ('cache, in memory (each rank copies the map)', REPO, {}),
            ('cache, memory-mapped (GAN_DATA_IN_MEMORY_MAX=0)', REPO, {'GAN_DATA_IN_MEMORY_MAX': 0})]
    for i, (name, code, extra) in enumerate(runs):
        r = torchrun_memory(code, root, os.path.join(tmp, f'torchrun{i}'), extra)
        cells = ' | '.join(' / '.join(f'{v:.0f}' for v in rank) for rank in r['ranks'])
        say(f'| {name} | {r["wall_s"]:.0f} | {cells} |')
    say()


def train_part(args, root, tmp, say):
    """4. training speed, and the data path alone."""
    say(f'## Training speed, one process (racing_dcgan.py, {args.train_iters} iterations, nets 8 wide, batch 64)')
    say()
    speeds = {'memory': [], 'mapped': []}
    for r in range(args.rounds):
        for kind in ('memory', 'mapped'):
            speeds[kind].append(train_speed(root, os.path.join(tmp, f'train_{kind}{r}'), kind == 'mapped',
                                            args.train_iters, 50))
    for kind, v in speeds.items():
        say(f'- {"in memory" if kind == "memory" else "memory-mapped"}: {", ".join(f"{s:.2f}" for s in v)} it/s')
    ratios = sorted(b / a for a, b in zip(speeds['memory'], speeds['mapped']))
    say(f'- memory-mapped / in memory, each pair of adjacent runs: {", ".join(f"{r:.3f}" for r in ratios)}; '
        f'median {statistics.median(ratios):.3f}')
    b = child(REPO, 'batches', root, args.size)
    say(f'- the data path alone (Batches.get, batch 64, median of 6 blocks of 200): in memory '
        f'{b["per_batch_ms"]["memory"]:.3f} ms, memory-mapped {b["per_batch_ms"]["mapped"]:.3f} ms per batch; '
        f'batches equal: {b["equal"]}')
    say()


if __name__ == '__main__':
    main()
