"""What the quality figures cost next to training: seconds per evaluation (mixture, every generator,
overlap, precision/recall/density/coverage) against seconds per training iteration (the loop's time
without the evaluations), and the share of a run's time they take at --eval_interval 1000.

    OMP_NUM_THREADS=1 python bench/eval_cost.py            # results in bench/results/eval_cost.md
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import common  # noqa: E402

CASES = [   # (script, flags): each script's default configuration on its default data
    ('racing_wgan', ['--n_gen', '2']),
    ('racing_dcgan', ['--n_gen', '2']),
    ('pmgan', ['--n_gen', '8', '--dataset', 'ring8']),
    ('auction_gan', ['--dataset', 'ring8']),
]


def measure(name, flags, iters, work):
    module = __import__(name)
    spent, calls = [0.0], [0]
    evaluate = common.Evaluator.evaluate

    def timed(self, *a, **k):
        start = time.perf_counter()
        try:
            return evaluate(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - start
            calls[0] += 1
    loop = common.Run.iterations

    def timed_loop(self, start):
        began = time.perf_counter()
        yield from loop(self, start)
        spent.append(time.perf_counter() - began)
    common.Evaluator.evaluate, common.Run.iterations = timed, timed_loop
    sys.argv = [f'{name}.py', *flags, '--n_iters', str(iters), '--eval_interval', str(iters // 2),
                '--log_interval', str(iters), '--sample_interval', '0', '--out_dir', os.path.join(work, name)]
    try:
        module.main()
    finally:
        common.Evaluator.evaluate, common.Run.iterations = evaluate, loop
    per_eval = spent[0] / calls[0]
    per_iter = (spent[-1] - spent[0]) / iters   # the loop without its evaluations (the final one is after it)
    return per_eval, per_iter, per_eval / (per_eval + 1000 * per_iter)


def main():
    torch.set_num_threads(1)
    lines = ['# Evaluation cost', '', f'`OMP_NUM_THREADS=1 python bench/eval_cost.py`, {time.strftime("%Y-%m-%d")}, '
             f'load average {os.getloadavg()[0]:.1f} (2-core CPU)', '',
             '| script | s per evaluation | s per iteration | share of run time at --eval_interval 1000 |',
             '|---|---|---|---|']
    with tempfile.TemporaryDirectory() as work:
        for name, flags in CASES:
            per_eval, per_iter, share = measure(name, flags, 200, work)
            lines.append(f'| {name} {" ".join(flags)} | {per_eval:.2f} | {per_iter:.4f} | {share:.1%} |')
            print(lines[-1], flush=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'eval_cost.md')
    with open(out, 'w') as f:
        f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
