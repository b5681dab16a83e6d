"""The prepared GPU check: every GPU path of the project, in one run of a few minutes, on one node.

    bash bench/gpu_check.sh                 # on a machine with CUDA GPUs; writes bench/results/gpu.md
    bash bench/gpu_check.sh --dry-run       # anywhere: print the plan, run nothing

What it runs, each step on its own (a failure is recorded, the rest goes on):
  1. every script for a few dozen iterations on CUDA: fp32, --amp, --amp fp16 and --amp --compile,
     with its it/s (from metrics.csv) and final losses;
  2. torchrun over all visible GPUs (nccl) for racing_wgan and pmgan (generators split across ranks);
  3. a resume on CUDA (RNG states on the CPU, nets on the GPU): 20 + 20 iterations against 40;
  4. biggan_sn --sync_bn under torchrun;
  5. fid.py: Inception features on CUDA against the CPU (max difference) and extraction images/s
     (random weights of the real network's shape: the same arithmetic as the real weights);
  6. K ensemble generators as one grouped module against K separate modules (forward + backward);
  7. fid.prdc on 10,000 x 10,000 2048-d features on the GPU, when fid.py has it.
"""
import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SCRIPTS = {   # a few dozen iterations each, at sizes that exercise the real code paths
    'racing_wgan': ['--n_gen', '2', '--img_size', '16'],
    'racing_dcgan': ['--n_gen', '2', '--img_size', '32'],
    'pmgan': ['--n_gen', '4', '--dataset', 'stacked-digits', '--img_size', '32'],
    'auction_gan': ['--n_gans', '3', '--img_size', '32'],
    'g_advantage_dcgan': ['--img_size', '32'],
    'biggan_sn': ['--img_size', '32', '--ema', '--ema_start', '10'],
}
VARIANTS = {'fp32': [], 'amp': ['--amp'], 'amp_fp16': ['--amp', 'fp16'], 'amp_compile': ['--amp', '--compile']}
FP16_SCRIPTS = ('racing_dcgan', 'pmgan', 'biggan_sn')   # the GradScaler paths: shared, per generator, EMA


DEVICE = 'cuda'


def cuda_flags(work, n_iters=40):
    return ['--device', DEVICE, '--n_iters', str(n_iters), '--log_interval', '10', '--sample_interval', '0',
            '--ckpt_interval', '0', '--eval_samples', '500', '--data_root', os.path.join(work, 'data')]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    p.add_argument('--work', default=None, help='scratch folder (default: a temporary one)')
    p.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'gpu.md'), help='the report')
    p.add_argument('--timeout', type=int, default=150, help='seconds allowed to one command')
    p.add_argument('--device', default='cuda', help='cpu: try the check itself on a CPU (slow; sync_bn fails there)')
    p.add_argument('--scripts', nargs='+', default=list(SCRIPTS), choices=list(SCRIPTS), help='a part of the scripts')
    return p.parse_args()


class Report:
    """Sections of markdown, written out after every step: a check killed at its time limit still
    leaves what it measured."""

    def __init__(self, path):
        self.path, self.parts = path, []

    def add(self, text):
        self.parts.append(text)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, 'w') as f:
            f.write('\n\n'.join(self.parts) + '\n')


def run(cmd, timeout, dry):
    """(ok, seconds, last lines of output) of one command."""
    return run_together([cmd], timeout, dry)[0]


def run_together(cmds, timeout, dry):
    """Start the commands at once (compilation is CPU-bound; the node has cores to spare) and wait:
    [(ok, seconds, last lines of output)] in order."""
    for cmd in cmds:
        print('+ ' + shlex.join(cmd), flush=True)
    if dry:
        return [(True, 0.0, '')] * len(cmds)
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED='1')
    start = time.time()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1, timeout - (time.time() - start)))
            results.append((proc.returncode == 0, time.time() - start, '\n'.join(out.strip().splitlines()[-6:])))
        except subprocess.TimeoutExpired:
            proc.kill()
            results.append((False, time.time() - start, f'timed out after {timeout} s'))
    return results


def run_speed(folder):
    """it/s between the first and the last logged rows of a run (start-up and compilation excluded)."""
    try:
        with open(os.path.join(folder, 'metrics.csv')) as f:
            rows = list(csv.DictReader(f))
        first, last = rows[0], rows[-1]
        return (int(last['iteration']) - int(first['iteration'])) / (
            float(last['wall_seconds']) - float(first['wall_seconds']))
    except (OSError, IndexError, KeyError, ZeroDivisionError, ValueError):
        return float('nan')


def torchrun(n_gpus, *args):
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={n_gpus}', '--master_port=29611', *args]


def scripts_on_cuda(report, work, dry, timeout):
    lines = ['## 1. Every script on CUDA (40 iterations; it/s between the first and last log lines)', '',
             '--amp --compile runs the six scripts at once (compilation is CPU-bound): its it/s are shared.', '',
             '| script | ' + ' | '.join(VARIANTS) + ' |', '|---|' + '---|' * len(VARIANTS)]
    plans = {(name, variant): [sys.executable, f'{name}.py', *flags, *cuda_flags(work), *extra, '--out_dir',
                               os.path.join(work, f'{name}-{variant}')]
             for name, flags in SCRIPTS.items() for variant, extra in VARIANTS.items()
             if variant != 'amp_fp16' or name in FP16_SCRIPTS}
    results = {key: run(cmd, timeout, dry) for key, cmd in plans.items() if key[1] != 'amp_compile'}
    compiled = [key for key in plans if key[1] == 'amp_compile']
    results.update(zip(compiled, run_together([plans[key] for key in compiled], 2 * timeout, dry)))
    failures = []
    for name in SCRIPTS:
        cells = []
        for variant in VARIANTS:
            if (name, variant) not in results:
                cells.append('-')
                continue
            ok, seconds, tail = results[name, variant]
            cells.append(f'{run_speed(os.path.join(work, f"{name}-{variant}")):.1f} it/s ({seconds:.0f} s)'
                         if ok else 'FAILED')
            if not ok:
                failures.append(f'- {name} {variant}:\n\n```\n{tail}\n```')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    report.add('\n'.join(lines + ([''] + failures if failures else [])))


def distributed(report, work, dry, timeout, n_gpus):
    lines = [f'## 2-4. torchrun over {n_gpus} GPU(s) (nccl), resume on CUDA, --sync_bn', '']

    def script(name, *extra, n_iters=40, out):
        return [f'{name}.py', *SCRIPTS[name], *cuda_flags(work, n_iters), *extra, '--out_dir', os.path.join(work, out)]

    checks = {
        'racing_wgan under torchrun': torchrun(n_gpus, *script('racing_wgan', out='ddp-racing')),
        'pmgan under torchrun (generators split)': torchrun(n_gpus, *script('pmgan', out='ddp-pmgan')),
        'biggan_sn --sync_bn under torchrun': torchrun(n_gpus, *script('biggan_sn', '--sync_bn', out='ddp-syncbn')),
        'resume on CUDA: 20 iterations': [sys.executable, *script('racing_dcgan', n_iters=20, out='split')],
        'resume on CUDA: then --resume to 40': [sys.executable, 'racing_dcgan.py', '--resume',
                                                os.path.join(work, 'split'), '--n_iters', '40'],
        'resume on CUDA: 40 straight': [sys.executable, *script('racing_dcgan', out='straight')],
    }
    for label, cmd in checks.items():
        ok, seconds, tail = run(cmd, timeout, dry)
        lines.append(f'- {label}: {"ok" if ok else "FAILED"} ({seconds:.0f} s)' + ('' if ok else f'\n\n```\n{tail}\n```\n'))
    if not dry:
        lines.append(f'- resume vs straight, largest parameter difference: {resume_difference(work)}')
    report.add('\n'.join(lines))


def resume_difference(work):
    import torch
    try:
        a, b = (torch.load(os.path.join(work, f, 'ckpt.pt'), weights_only=True) for f in ('split', 'straight'))
        diffs = [(a[net][k].float() - b[net][k].float()).abs().max().item()
                 for net in ('generators', 'discriminator') for k in a[net] if a[net][k].is_floating_point()]
        return f'{max(diffs):.3g} (cuDNN kernels need not be deterministic)'
    except Exception as e:   # noqa: BLE001 - the report says what went wrong
        return f'not measured ({type(e).__name__}: {e})'


def synchronize():
    import torch
    if DEVICE == 'cuda':
        torch.cuda.synchronize()


def fid_on_cuda(report, work, dry):
    if dry:
        print('+ fid.py: features on CUDA vs CPU; extraction images/s; fid.prdc on the GPU')
        return
    import torch
    import fid
    path = os.path.join(work, fid.WEIGHTS_FILE)
    torch.save(fid.random_weights(0), path)
    images = torch.rand(64, 3, 64, 64) * 2 - 1
    cpu = fid.extract_images(images, fid.load_inception(path, 'cpu'), features=True)['features']
    cuda_model = fid.load_inception(path, DEVICE)
    gpu = fid.extract_images(images.to(DEVICE), cuda_model, features=True)['features']
    diff = (torch.as_tensor(cpu) - torch.as_tensor(gpu).cpu()).abs().max().item()
    big = torch.rand(5000 if DEVICE == 'cuda' else 100, 3, 32, 32, device=DEVICE) * 2 - 1
    fid.extract_images(big[:400], cuda_model, batch_size=200)      # warm-up
    synchronize()
    start = time.time()
    fid.extract_images(big, cuda_model, batch_size=200)
    synchronize()
    rate = len(big) / (time.time() - start)
    lines = ['## 5. fid.py on CUDA (random weights of the real network)', '',
             f'- features of 64 images, CUDA vs CPU: max difference {diff:.3g} (fp32, TF32 off)',
             f'- extraction: {rate:.0f} images/s ({len(big)} images 32 px, resized to 299, batch 200)']
    if hasattr(fid, 'prdc'):
        n = 10000 if DEVICE == 'cuda' else 1000
        real, fake = torch.randn(n, 2048, device=DEVICE), torch.randn(n, 2048, device=DEVICE)
        fid.prdc(real[:1000], fake[:1000])
        synchronize()
        start = time.time()
        figures = fid.prdc(real, fake)
        synchronize()
        lines.append(f'- fid.prdc, {n:,} x {n:,} 2048-d: {time.time() - start:.2f} s ({figures})')
    report.add('\n'.join(lines))


def grouped_generators(report, dry):
    if dry:
        print('+ grouped DCGAN generators vs separate modules, K = 2, 4, 8')
        return
    import torch
    import common
    lines = ['## 6. K DCGAN generators (32 px, batch 64): one grouped module vs K modules, forward + backward', '',
             '| K | grouped ms | separate ms | separate / grouped |', '|---|---|---|---|']
    for k in (2, 4, 8):
        grouped = common.DCGANGenerators(k, 100, 32, 3).to(DEVICE)
        separate = [common.DCGANGenerators(1, 100, 32, 3).to(DEVICE) for _ in range(k)]
        z = torch.randn(k, 64, 100, device=DEVICE)

        def step_grouped():
            grouped(z).square().mean().backward()

        def step_separate():
            sum(g(z[i:i + 1]).square().mean() for i, g in enumerate(separate)).backward()

        times = []
        for step in (step_grouped, step_separate):
            for _ in range(5):
                step()
            synchronize()
            start = time.time()
            for _ in range(30):
                step()
            synchronize()
            times.append((time.time() - start) / 30 * 1000)
        lines.append(f'| {k} | {times[0]:.2f} | {times[1]:.2f} | {times[1] / times[0]:.2f}x |')
    report.add('\n'.join(lines))


def main():
    global DEVICE
    args = parse_args()
    DEVICE = args.device
    for name in set(SCRIPTS) - set(args.scripts):
        del SCRIPTS[name]
    work = args.work or ('WORK' if args.dry_run else tempfile.mkdtemp(prefix='gpu_check_'))
    report = Report(args.out if not args.dry_run else os.devnull)
    n_gpus = 1
    if DEVICE == 'cpu' and not args.dry_run:
        report.add('# GPU check, tried on the CPU (--device cpu): a test of the check itself, no GPU figures')
    elif not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit('gpu_check: no CUDA GPU is visible (use --dry-run to see the plan)')
        n_gpus = torch.cuda.device_count()
        smi = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.strip()
        report.add('# GPU check (bench/gpu_check.sh)\n\n' + '\n'.join([
            f'- date: {time.strftime("%Y-%m-%d %H:%M")}; host: {platform.node()}; python {platform.python_version()}',
            f'- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}',
            f'- GPUs: {n_gpus}; {smi or torch.cuda.get_device_name(0)}; native bf16: '
            f'{torch.cuda.is_bf16_supported(including_emulation=False)}']))
    start = time.time()
    steps = [lambda: scripts_on_cuda(report, work, args.dry_run, args.timeout),
             lambda: distributed(report, work, args.dry_run, args.timeout, n_gpus),
             lambda: fid_on_cuda(report, work, args.dry_run),
             lambda: grouped_generators(report, args.dry_run)]
    for step in steps:
        try:
            step()
        except Exception as e:   # noqa: BLE001 - record and go on
            report.add(f'step failed: {type(e).__name__}: {e}')
    if not args.dry_run:
        report.add(f'Total: {time.time() - start:.0f} s. Raw runs in {work}.')
        print(json.dumps({'report': args.out}))


if __name__ == '__main__':
    main()
