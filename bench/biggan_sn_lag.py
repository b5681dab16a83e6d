"""How far from 1 is the largest singular value of each spectrally normalised weight, as the last
training step used it? torch's spectral_norm (like the SN paper and BigGAN) runs one power iteration
per forward, so its sigma estimate lags the weights a little. Reads a biggan_sn.py checkpoint and
reports, over every SN layer of G and D, the median and max |sigma(W / sigma_est) - 1| as stored,
and after 100 more power iterations on the fixed weights.

    OMP_NUM_THREADS=1 python bench/biggan_sn_lag.py bench/work/digits/biggan
"""
import importlib.util
import json
import os
import statistics
import sys

import torch
from torch.nn.utils import parametrize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def sigma(m):
    w = m.weight.movedim(m.parametrizations.weight[0].dim, 0).flatten(1)
    return torch.linalg.matrix_norm(w.double(), 2).item()


def main():
    spec = importlib.util.spec_from_file_location('biggan_sn', os.path.join(REPO, 'biggan_sn.py'))
    bg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bg)
    folder = sys.argv[1]
    with open(os.path.join(folder, 'args.json')) as f:
        saved = json.load(f)
    args = bg.parser.parse_args([])
    vars(args).update(saved)
    state = torch.load(os.path.join(folder, 'ckpt.pt'), map_location='cpu', weights_only=False)
    n_classes = state['D']['embed.parametrizations.weight.original'].shape[0] if args.arch == 'biggan' and \
        'embed.parametrizations.weight.original' in state['D'] else 0
    G, D = bg.build_nets(args, 1 if args.dataset in ('digits', 'mnist', 'fashion-mnist') else 3, n_classes)
    G.load_state_dict(state['G'])
    D.load_state_dict(state['D'])
    layers = [m for net in (G, D) for m in net.modules() if parametrize.is_parametrized(m, 'weight')]
    with torch.no_grad():
        stored = [abs(sigma(m.eval()) - 1) for m in layers]
        for m in layers:
            m.train()
            for _ in range(100):
                m.weight  # noqa: B018  (one power iteration per access in train mode)
        converged = [abs(sigma(m.eval()) - 1) for m in layers]
    out = dict(checkpoint_iteration=state['iteration'], layers=len(layers),
               stored_median=statistics.median(stored), stored_max=max(stored),
               converged_median=statistics.median(converged), converged_max=max(converged))
    print(json.dumps(out))


if __name__ == '__main__':
    main()
