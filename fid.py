"""FID, Inception Score, KID and precision/recall/density/coverage with the
Inception network pytorch-fid uses.

Usable as a CLI (`python fid.py PATH1 PATH2`, same flags and output as
`python -m pytorch_fid`) and from training loops (statistics straight from
tensors or a generator, streaming, cached reference statistics, torchrun).

Sections: 1 weights, 2 network, 3 streaming statistics and extraction,
4 metrics (Frechet distance, IS, KID, PRDC), 5 training-loop helpers, 6 CLI.
"""
import argparse
import hashlib
import math
import os
import sys
import tempfile
import threading
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/'
                   'fid_weights/pt_inception-2015-12-05-6726825d.pth')
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
DIMS = (64, 192, 768, 2048)      # block outputs, as pytorch-fid's --dims
IMAGE_EXTENSIONS = {'bmp', 'gif', 'jpg', 'jpeg', 'pgm', 'png', 'ppm', 'tif',
                    'tiff', 'webp'}


class FIDError(Exception):
    """A user-facing failure; the CLI prints `error: <message>`, exit code 2."""


# ---------------------------------------------------------------------------
# 1. Weights
# ---------------------------------------------------------------------------

def hub_weights_path():
    """Where torch hub (and pytorch-fid) caches the weights file."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', WEIGHTS_FILE)


def resolve_weights(path=None):
    """Path of the FID Inception weights: `path`, else $FID_WEIGHTS, else the
    torch hub cache file, else downloaded there from FID_WEIGHTS_URL."""
    for given, what in ((path, 'weights file'),
                        (os.environ.get('FID_WEIGHTS'), '$FID_WEIGHTS file')):
        if given:
            if not os.path.isfile(given):
                raise FIDError(f'{what} not found: {given}')
            return given
    cached = hub_weights_path()
    if os.path.isfile(cached):
        return cached
    tmp = None
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cached), suffix='.part')
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=30) as r, \
                os.fdopen(fd, 'wb') as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, cached)       # never leave a half-written file
        return cached
    except Exception as e:            # offline, proxy, permissions, ...
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        why = str(getattr(e, 'reason', e)).replace('\n', ' ')
        raise FIDError(f'FID Inception weights not found and the download '
                       f'failed ({why}): download {FID_WEIGHTS_URL} and put '
                       f'it at {cached}, or pass --weights PATH, or set '
                       f'FID_WEIGHTS=PATH') from None


def load_weights(model, path):
    """Load a weights file into `model`; a broken file (truncated download,
    wrong file) raises a one-line FIDError."""
    try:
        model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    except Exception as e:
        raise FIDError(f'weights file {path} is corrupt or not the FID '
                       f'Inception weights ({type(e).__name__}); delete it and '
                       f'fetch it again from {FID_WEIGHTS_URL}') from None
    return model


def check_weights(path):
    """Fail now, with load_weights' one-line FIDError, if `path` is not a
    loadable FID Inception weights file (training scripts call this before
    they make a run folder)."""
    load_weights(FIDInception(), path)
    return path


def random_weights(seed=0):
    """A state dict with the weight file's keys and random values that keep
    activations O(1) through the network (He-scaled convs, perturbed BN):
    for tests and benchmarks offline, never for real scores."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in FIDInception().state_dict().items():
        if k.endswith('num_batches_tracked'):
            sd[k] = torch.zeros_like(v)
        elif k.endswith('conv.weight'):
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif k.endswith('bn.weight') or k.endswith('bn.running_var'):
            sd[k] = 0.75 + 0.5 * torch.rand(v.shape, generator=g)
        elif k.endswith('bn.bias') or k.endswith('bn.running_mean'):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:                                          # fc
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[-1])
    return sd


# ---------------------------------------------------------------------------
# 2. Network: the TF 2015-12-05 Inception v3 as pytorch-fid ports it.
#    Module names match torchvision's Inception3, hence the weight file.
# ---------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU; `fuse()` folds the BN."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.fused = False

    def fuse(self):
        # BN(conv(x)) = conv(x) * s + (beta - mean * s), s = gamma / sqrt(var + eps),
        # folded in float64; non-persistent buffers: the state dict is unchanged
        bn, w = self.bn, self.conv.weight.detach()
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        b = bn.bias.double() - bn.running_mean.double() * s
        self.register_buffer('w_fused', (w.double() * s[:, None, None, None]).to(w.dtype),
                             persistent=False)
        self.register_buffer('b_fused', b.to(w.dtype).detach(), persistent=False)
        self.fused = True

    def forward(self, x):
        if not self.fused:
            return torch.relu_(self.bn(self.conv(x)))
        c = self.conv
        if x.device.type == 'cpu' and not x.requires_grad and _onednn_conv_relu():
            # conv + bias + ReLU in one oneDNN call (same numbers, ~15% faster)
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.w_fused, self.b_fused, c.padding, c.stride, c.dilation,
                1, 'relu', [], '')
        return torch.relu_(F.conv2d(x, self.w_fused, self.b_fused, c.stride, c.padding))


_ONEDNN = []


def _onednn_conv_relu():
    """Whether torch's private oneDNN conv+ReLU op exists and agrees with
    F.conv2d + ReLU here (checked once; otherwise the public ops are used)."""
    if not _ONEDNN:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(4, 8, 3, 3, generator=g), torch.randn(4, generator=g)
            y = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [2, 2], [1, 1],
                                                        1, 'relu', [], '')
            ok = torch.allclose(y, F.relu(F.conv2d(x, w, b, 2, 1)), rtol=1e-5, atol=1e-5)
        except Exception:
            ok = False
        _ONEDNN.append(ok)
    return _ONEDNN[0]


def _cat(*branches):
    return torch.cat(branches, 1)


def _avg3(x):
    # FID patch: TF's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):            # Mixed_5b..5d (patched pool)
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return _cat(self.branch1x1(x),
                    self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(_avg3(x)))


class InceptionB(nn.Module):            # Mixed_6a (grid reduction)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return _cat(self.branch3x3(x),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    F.max_pool2d(x, 3, stride=2))


class InceptionC(nn.Module):            # Mixed_6b..6e (patched pool)
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f'branch7x7dbl_{i}')(d)
        return _cat(self.branch1x1(x), b7, d, self.branch_pool(_avg3(x)))


class InceptionD(nn.Module):            # Mixed_7a (grid reduction)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f'branch7x7x3_{i}')(b7)
        return _cat(self.branch3x3_2(self.branch3x3_1(x)), b7,
                    F.max_pool2d(x, 3, stride=2))


class InceptionE(nn.Module):
    """Mixed_7b (pool patched: average ignoring padding) and Mixed_7c (pool
    patched: max pool, as in the TF graph)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return _cat(self.branch1x1(x),
                    self.branch3x3_2a(a), self.branch3x3_2b(a),
                    self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                    self.branch_pool(p))


class FIDInception(nn.Module):
    """The FID Inception v3. `forward(x)` takes images in [-1, 1], (B, 1 or 3,
    H, W) of any size, and returns (B, dims) float32 features;
    `forward(x, return_logits=True)` also returns the (B, 1008) logits used
    for the Inception Score (pool features @ fc.weight.T, without the bias)."""

    # the four blocks whose outputs give the 64/192/768/2048-d features
    STAGES = [['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'pool'],
              ['Conv2d_3b_1x1', 'Conv2d_4a_3x3', 'pool'],
              ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b',
               'Mixed_6c', 'Mixed_6d', 'Mixed_6e'],
              ['Mixed_7a', 'Mixed_7b', 'Mixed_7c']]

    def __init__(self, dims=2048):
        super().__init__()
        if dims not in DIMS:
            raise FIDError(f'--dims must be one of {DIMS}, not {dims}')
        self.dims = dims
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.channels_last = False

    def fuse(self, channels_last=True):
        """Fold every BatchNorm into its conv and (optionally) switch to
        channels_last: features change by ~1e-6 of their scale (rounding),
        faster on CPU. The state dict is unchanged."""
        for m in self.modules():
            if isinstance(m, BasicConv2d):
                m.fuse()
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def prepare(self, x, zero_one=False):
        """Images -> (B, 3, 299, 299) float32 in [-1, 1]. pytorch-fid resizes
        [0, 1] images (bilinear, align_corners=False, no antialias) and then
        maps to [-1, 1]; `zero_one=True` follows that exact order."""
        x = x.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode='bilinear',
                              align_corners=False)
        return 2 * x - 1 if zero_one else x

    def train(self, mode=True):
        """Always eval: BatchNorm must use the weight file's statistics."""
        return super().train(False)

    def forward(self, x, return_logits=False, zero_one=False):
        x = x.to(self.fc.weight.device)
        with _exact_fp32(x.device):
            x = self.prepare(x, zero_one)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = None
            for dims, names in zip(DIMS, self.STAGES):
                for name in names:
                    x = F.max_pool2d(x, 3, stride=2) if name == 'pool' \
                        else getattr(self, name)(x)
                if dims == self.dims:
                    # lower blocks are averaged over space, as pytorch-fid does
                    feats = F.adaptive_avg_pool2d(x, 1).flatten(1)
                    if not return_logits:
                        return feats
            pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return feats, F.linear(pool, self.fc.weight)


@contextmanager
def _exact_fp32(device):
    """fp32 without TF32 on CUDA and without autocast, restoring the
    caller's settings afterwards."""
    if device.type != 'cuda':
        with torch.autocast(device.type, enabled=False):
            yield
        return
    # The allow_tf32 flags (torch >= 2.4; newer torch maps them onto its
    # fp32_precision settings). common.py sets TF32 through the same flags:
    # mixing them with the fp32_precision API makes torch raise.
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = cuda.allow_tf32, cudnn.allow_tf32
    cuda.allow_tf32 = cudnn.allow_tf32 = False
    try:
        with torch.autocast('cuda', enabled=False):
            yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32 = saved


def load_inception(weights=None, device='cpu', dims=2048, fast=True):
    """The FID Inception in eval mode, fp32, on `device`. `fast` folds the
    BatchNorms and uses channels_last (see FIDInception.fuse)."""
    model = load_weights(FIDInception(dims), resolve_weights(weights))
    model.requires_grad_(False).eval().to(device)
    return model.fuse(channels_last=True) if fast else model


def model_fingerprint(model):
    """Short hash of the weights, stored with cached statistics."""
    sd, h = model.state_dict(), hashlib.sha1()
    for k in ('Conv2d_1a_3x3.conv.weight', 'Mixed_7c.branch_pool.conv.weight', 'fc.bias'):
        h.update(sd[k].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# 3. Streaming statistics and feature extraction (sharded under torchrun)
# ---------------------------------------------------------------------------

_ALONE = []   # non-empty inside _alone(): this process works as if it were the only one


def _dist():
    """(rank, world size); (0, 1) unless torch.distributed is initialised (or inside _alone)."""
    if dist.is_available() and dist.is_initialized() and not _ALONE:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def _alone():
    """No sharding and no collectives inside: for a rank computing on its own data."""
    _ALONE.append(True)
    try:
        yield
    finally:
        _ALONE.pop()


class _ErrorOnSomeRank(FIDError):
    """An error one rank hit, raised on every rank (see _raise_on_every_rank)."""


def _raise_on_every_rank(error):
    """Under torch.distributed every rank learns whether any rank failed, so none is left waiting
    in a collective (gloo's default timeout is 30 minutes), and all raise the first failing rank's
    message; in one process, raise `error` if there is one."""
    rank, world = _dist()
    if world == 1:
        if error is not None:
            raise error
        return
    messages = [None] * world
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [m for m in messages if m is not None]
    if failed:
        raise _ErrorOnSomeRank(failed[0])


def _comm_device():
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


class RunningStats:
    """Mean and covariance of features seen so far, in float64, from the
    running sum and the running sum of outer products: memory does not grow
    with the number of samples."""

    def __init__(self, dims=None):
        self.n, self.dims, self.sum, self.outer = 0, dims, None, None

    def update(self, features):
        f = torch.as_tensor(features).detach().flatten(1).to(torch.float64)
        if self.sum is None:
            self.dims = f.shape[1]
            self.sum = f.new_zeros(self.dims)
            self.outer = f.new_zeros(self.dims, self.dims)
        elif f.shape[1] != self.dims:
            raise FIDError(f'features have {f.shape[1]} dims, expected {self.dims}')
        self.n += f.shape[0]
        self.sum += f.sum(0).to(self.sum.device)
        self.outer += (f.T @ f).to(self.outer.device)
        return self

    def all_reduce(self):
        """Sum the statistics of every rank (no-op without torch.distributed)."""
        if _dist()[1] == 1:
            return self
        if self.dims is None:
            raise FIDError('RunningStats.all_reduce needs dims on a rank without samples')
        dev = _comm_device()
        buf = torch.zeros(1 + self.dims + self.dims ** 2, dtype=torch.float64, device=dev)
        if self.sum is not None:
            buf[0] = self.n
            buf[1:1 + self.dims] = self.sum.to(dev)
            buf[1 + self.dims:] = self.outer.to(dev).flatten()
        dist.all_reduce(buf)
        self.n = int(round(buf[0].item()))
        self.sum = buf[1:1 + self.dims].clone()
        self.outer = buf[1 + self.dims:].view(self.dims, self.dims).clone()
        return self

    def mean_cov(self):
        """(mu, sigma) as float64 numpy arrays (sigma with the N - 1 divisor)."""
        if self.n < 2:
            raise FIDError(f'need at least 2 samples for a covariance, got {self.n}')
        if self.n < self.dims and _dist()[0] == 0:
            warnings.warn(f'{self.n} samples for {self.dims}-d features: the '
                          f'covariance is singular and FID is biased; use at '
                          f'least {self.dims} (10,000+ to compare with papers)')
        mu = self.sum / self.n
        # sigma = (sum x x^T - n mu mu^T) / (n - 1)
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _all_gather_rows(x):
    """Concatenate per-rank rows, undoing the `items[rank::world]` sharding."""
    rank, world = _dist()
    if world == 1:
        return x
    dev = _comm_device()
    x = x.to(dev)
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = x.new_zeros((max(sizes),) + x.shape[1:])
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    out = x.new_empty((sum(sizes),) + x.shape[1:])
    for r in range(world):
        out[r::world] = parts[r][:sizes[r]]
    return out


# A progress bar (tqdm, on stderr) while features are extracted: None shows it
# only when stderr is a terminal (never in a log file), True/False force it.
# The extract_* functions' `progress` argument overrides this per call.
PROGRESS = None


def _stderr_is_tty():
    """Whether stderr is a terminal (the default for showing a progress bar)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):       # replaced or closed stream
        return False


def _progress_bar(total, desc, progress=None):
    """A tqdm bar counting images (rank 0 only), or None when not shown."""
    show = PROGRESS if progress is None else progress
    if show is None:
        show = _stderr_is_tty()
    if not show or _dist()[0] != 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit='img', file=sys.stderr, dynamic_ncols=True)


class _Extractor:
    """Runs batches through the model, feeding RunningStats and, when asked
    (IS, KID, PRDC), keeping the features and logits; counts images on a
    progress bar (see PROGRESS) of `total` images."""

    def __init__(self, model, features=False, logits=False, total=None,
                 desc='features', progress=None):
        self.model, self.keep, self.want_logits = model, features, logits
        self.device = next(model.parameters()).device
        self.stats = RunningStats(model.dims)
        self.feats, self.logits = [], []
        self.bar = _progress_bar(total, desc, progress)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @torch.no_grad()
    def add(self, x, zero_one=False):
        x = x.to(self.device, non_blocking=True)
        out = self.model(x, return_logits=self.want_logits, zero_one=zero_one)
        f, lg = out if self.want_logits else (out, None)
        self.stats.update(f)
        if self.keep:
            self.feats.append(f.cpu())
        if lg is not None:
            self.logits.append(lg.cpu())
        if self.bar is not None:
            self.bar.update(len(x))

    def result(self):
        """dict with mu, sigma (and features, logits): same on every rank."""
        self.close()
        res = dict(zip(('mu', 'sigma'), self.stats.all_reduce().mean_cov()))
        for name, rows in (('features', self.feats), ('logits', self.logits)):
            if rows:
                res[name] = _all_gather_rows(torch.cat(rows)).cpu().numpy()
        return res


def _stack_images(items):
    """collate_fn: a batch of images, or of (image, label, ...) tuples."""
    return torch.stack([t[0] if isinstance(t, (tuple, list)) else t for t in items])


def extract_images(images, model, batch_size=50, num_workers=0,
                   features=False, logits=False, progress=None):
    """dict(mu, sigma[, features][, logits]) of a (N, C, H, W) tensor in
    [-1, 1] (or uint8 in 0..255), or of a data set whose items are such
    images (or (image, label) tuples). Sharded across ranks under torch.distributed (images
    rank::world); every rank gets the same result, rows in the original order.
    `progress`: a progress bar on stderr (None: PROGRESS decides)."""
    rank, world = _dist()
    ex = _Extractor(model, features, logits, len(range(rank, len(images), world)),
                    'images', progress)
    if torch.is_tensor(images):
        shard = images[rank::world]
        for i in range(0, len(shard), batch_size):
            x = shard[i:i + batch_size]
            if x.dtype == torch.uint8:   # 0..255, converted a batch at a time (no float copy of all)
                x = x.float().div_(127.5).sub_(1.0)
            ex.add(x)
    else:
        sub = torch.utils.data.Subset(images, range(rank, len(images), world))
        loader = torch.utils.data.DataLoader(
            sub, batch_size=batch_size, num_workers=num_workers,
            collate_fn=_stack_images)
        for x in loader:
            ex.add(x)
    return ex.result()


def extract_generator(sample_fn, n_samples, model, batch_size=50,
                      features=False, logits=False, progress=None):
    """dict(mu, sigma[, features][, logits]) of n_samples images drawn as
    sample_fn(n) -> (n, C, H, W) in [-1, 1] on any device, under no_grad.
    Under torch.distributed each rank keeps its share of the draws and every
    rank gets the same result; every rank calls sample_fn with the same sizes
    (ceil(n / world) in all), so sample_fn may itself be a collective.
    `progress`: a progress bar on stderr (None: PROGRESS decides)."""
    rank, world = _dist()
    keep = n_samples // world + (rank < n_samples % world)   # this rank's share
    todo = -(-n_samples // world)   # every rank makes the same calls of the same
    ex = _Extractor(model, features, logits, keep, 'samples', progress)   # sizes
    with torch.no_grad():
        while todo > 0:
            b = min(batch_size, todo)
            x = sample_fn(b)
            if x.shape[0] != b:
                raise FIDError(f'sample_fn({b}) returned {x.shape[0]} images')
            if keep > 0:
                ex.add(x[:keep].detach())
            keep, todo = keep - b, todo - b
    return ex.result()


def statistics_from_images(images, model, batch_size=50, num_workers=0):
    """(mu, sigma) of images in [-1, 1]: a tensor or a data set (extract_images)."""
    res = extract_images(images, model, batch_size, num_workers)
    return res['mu'], res['sigma']


def statistics_from_generator(sample_fn, n_samples, model, batch_size=50):
    """(mu, sigma) of n_samples images from sample_fn(n) (extract_generator)."""
    res = extract_generator(sample_fn, n_samples, model, batch_size)
    return res['mu'], res['sigma']


# --- image folders ---------------------------------------------------------

DECODED_CACHE_ENV = 'GAN_DATA_CACHE'   # as in common.py: where the training scripts keep folder caches


class _FolderFiles(list):
    """list_images' result: the sorted files, and the folder they were listed from."""
    root = None


def list_images(path):
    """Every image under `path` (recursive), sorted."""
    if not os.path.isdir(path):
        raise FIDError(f'{path}: no such folder or .npz file')
    files = _FolderFiles(sorted(os.path.join(root, f) for root, _, names in os.walk(path)
                                for f in names
                                if f.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS))
    if len(files) < 2:
        raise FIDError(f'{path}: found {len(files)} image(s), need at least 2 '
                       f'(extensions: {", ".join(sorted(IMAGE_EXTENSIONS))})')
    files.root = path
    return files


def _decoded_cache(files):
    """The training scripts' decoded cache of the folder `files` was listed from (common.py's
    folder_cache: <folder>/.decoded/<S>px-rgb.json and the .npy it names, or the folder's
    directory under $GAN_DATA_CACHE), memory-mapped as uint8 (N, 3, S, S), when it holds
    exactly the pixels _ImageFiles reads: every image was already S x S with no EXIF rotation
    ('as_is'), RGB, the same files with the same sizes and mtimes, the same Pillow. Else None:
    a cache of larger images holds crops resized to the training size, not what FID reads."""
    import glob
    import json
    from PIL import __version__ as pillow
    root = getattr(files, 'root', None)
    if root is None:
        return None
    cache_dir = os.path.join(root, '.decoded')
    if os.environ.get(DECODED_CACHE_ENV):
        real = os.path.realpath(root)
        name = ''.join(c if c.isalnum() or c in '._-' else '_' for c in os.path.basename(real)) or 'root'
        cache_dir = os.path.join(os.environ[DECODED_CACHE_ENV],
                                 f'{name}-{hashlib.sha1(real.encode()).hexdigest()[:12]}')
    prefix = os.path.join(root, '')
    names = [(f[len(prefix):] if f.startswith(prefix) else os.path.relpath(f, root)).replace(os.sep, '/')
             for f in files]
    for meta_path in sorted(glob.glob(os.path.join(glob.escape(cache_dir), '*px-rgb.json'))):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if not (meta['format'] == 1 and meta['decoder'] == 1 and meta['as_is'] and meta['mode'] == 'RGB'
                    and meta['pillow'] == pillow and meta['files'] == names):
                continue
            stats = [os.stat(f) for f in files]
            if (meta['bytes'] != [s.st_size for s in stats]
                    or meta['mtime_ns'] != [s.st_mtime_ns for s in stats]):
                continue
            rows = np.load(os.path.join(cache_dir, meta['array']), mmap_mode='r')
            if rows.dtype == np.uint8 and rows.shape == (len(files), 3, meta['size'], meta['size']):
                return rows
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


class _ImageFiles(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors as PIL's convert('RGB') gives them; a broken
    file yields its error text (raised, named, in the main process)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                a = np.asarray(im.convert('RGB'))
            return torch.from_numpy(a.copy()).permute(2, 0, 1), None
        except Exception as e:
            return None, f'cannot read image {self.files[i]}: {e}'


def extract_folder(path, model, batch_size=50, num_workers=0,
                   features=False, logits=False, progress=None):
    """dict(mu, sigma[, features][, logits]) of the images under `path` (or
    of a list of image files), read exactly as pytorch-fid reads them: PIL
    RGB, /255, resized in [0, 1], then mapped to [-1, 1]. Sharded like
    extract_images; `progress` as there. A folder the training scripts have
    decoded at its own image size is read from their cache (_decoded_cache):
    the same pixels."""
    rank, world = _dist()
    files = path if isinstance(path, list) else list_images(path)
    ex = _Extractor(model, features, logits, len(files[rank::world]),
                    os.path.basename(os.path.normpath(path)) if isinstance(path, str) else 'images',
                    progress)
    cached = _decoded_cache(files)
    if cached is not None:   # the pixels _ImageFiles would give, decoded once already
        shard = cached[rank::world]
        for i in range(0, len(shard), batch_size):
            x = torch.from_numpy(np.array(shard[i:i + batch_size]))
            ex.add(x.to(torch.float32).div(255), zero_one=True)
        ex.close()
        return ex.result()
    loader = torch.utils.data.DataLoader(
        _ImageFiles(files[rank::world]), batch_size=batch_size,
        num_workers=num_workers, collate_fn=list)
    error = None
    for items in loader:
        error = next((FIDError(err.replace('\n', ' ')) for _, err in items if err), None)
        if error is not None:
            break
        imgs = [img for img, _ in items]
        # ToTensor divides by 255; mixed sizes are resized one by one
        if all(im.shape == imgs[0].shape for im in imgs):
            ex.add(torch.stack(imgs).to(torch.float32).div(255), zero_one=True)
        else:
            ex.add(torch.cat([model.prepare(im[None].to(torch.float32).div(255),
                                            zero_one=True) for im in imgs]))
    ex.close()
    _raise_on_every_rank(error)   # a broken file in one rank's shard stops every rank
    return ex.result()


def load_npz(path):
    """(mu, sigma) from an .npz written by pytorch-fid or fid.py."""
    try:
        with np.load(path) as f:
            if 'mu' not in f or 'sigma' not in f:
                raise FIDError(f'{path} has no mu/sigma arrays (it has: '
                               f'{", ".join(f.files) or "nothing"})')
            return f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
    except FIDError:
        raise
    except Exception as e:
        raise FIDError(f'cannot read {path}: {type(e).__name__}: {e}') from None


# ---------------------------------------------------------------------------
# 4. Metrics
# ---------------------------------------------------------------------------

def _clean_eigenvalues(w, what, scale):
    """Eigenvalues of a symmetric PSD matrix, rounding noise set to 0.

    pytorch-fid raises when sqrtm has a large imaginary part (> 1e-3), i.e.
    the matrices are not covariances; here that shows as a clearly negative
    eigenvalue (sqrt(-w) > 1e-3). An eigenvalue below d * eps * scale (scale:
    the norm the matrix was computed from) is rounding noise, as in
    rank-deficient covariances (N < d): it becomes 0, since sqrt would magnify
    it (sqrt(1e-16) = 1e-8)."""
    tol = len(w) * np.finfo(np.float64).eps * scale
    if w[0] < -max(1e-6, tol):
        raise FIDError(f'{what} is not positive semi-definite (eigenvalue '
                       f'{w[0]:.3g}): not a covariance matrix')
    return np.where(w > tol, w, 0.0)


def sqrt_factor(sigma):
    """(A, |sigma|) with A A^T = sigma for a symmetric PSD matrix: A = V diag(sqrt w) over the
    nonzero eigenvalues w only (with N < d samples, A is d x (N - 1)). frechet_distance takes it
    as sigma1_sqrt to skip sigma1's eigendecomposition when it measures many samples against the
    same statistics (FIDTracker's real images)."""
    w, v = np.linalg.eigh(sigma)
    scale = np.abs(w).max()
    w = _clean_eigenvalues(w, 'sigma1', scale)
    keep = w > 0
    return v[:, keep] * np.sqrt(w[keep]), scale


def _trace_sqrt_product(sigma1, sigma2, sigma1_sqrt=None):
    """tr sqrt(sigma1 sigma2) for symmetric PSD matrices, in float64.

    With sigma1 = V diag(w) V^T and A = V diag(sqrt w), sigma1 sigma2 is
    similar to A^T sigma2 A (symmetric PSD), so tr sqrt(sigma1 sigma2) =
    sum sqrt(eig(A^T sigma2 A)), as with sqrt(sigma1) sigma2 sqrt(sigma1).
    A's columns for the zero eigenvalues are 0 and only add zero rows and
    columns to A^T sigma2 A, so they are dropped (sqrt_factor): with N < d
    samples the second eigendecomposition is N x N, not d x d."""
    a, w1 = sigma1_sqrt if sigma1_sqrt is not None else sqrt_factor(sigma1)
    m = a.T @ sigma2 @ a
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    # M's rounding error scales with |sigma1| |sigma2| (2-norm, here bounded
    # by the Frobenius norm), not with its own norm
    scale = w1 * np.linalg.norm(sigma2)
    return np.sqrt(_clean_eigenvalues(lam, 'sigma2 (seen through sigma1)', scale)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, sigma1_sqrt=None):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), float64,
    without scipy.linalg.sqrtm (see _trace_sqrt_product). sigma1_sqrt: sqrt_factor(sigma1),
    when the same sigma1 is measured against many sigma2."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise FIDError(f'statistics have different dimensions: mu {mu1.shape} '
                       f'sigma {s1.shape} vs mu {mu2.shape} sigma {s2.shape} '
                       f'(compute both with the same --dims)')
    for a in (mu1, mu2, s1, s2):
        if not np.isfinite(a).all():
            raise FIDError('statistics contain NaN or inf')
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    try:
        tr = _trace_sqrt_product(s1, s2, sigma1_sqrt)
    except np.linalg.LinAlgError:
        tr = float('nan')
    if not np.isfinite(tr):
        # pytorch-fid's rule for a singular product: offset the diagonals
        warnings.warn(f'fid calculation produces singular product; adding '
                      f'{eps} to diagonal of cov estimates')
        off = np.eye(len(s1)) * eps
        tr = _trace_sqrt_product(s1 + off, s2 + off)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr)


def inception_score(logits_or_probs, splits=10, probs=None):
    """(mean, std) over `splits` consecutive parts of exp(E_x KL(p(y|x) || p(y))),
    as the original improved-GAN code, TTUR and torch-fidelity (without its
    shuffle). Classes: all 1008 outputs of the TF graph's softmax (the 1000
    ImageNet classes plus the graph's 8 extra outputs that no label uses),
    from the logits without the fc bias, as improved-GAN's matmul with the
    softmax weights (FIDInception's return_logits, torch-fidelity's
    'logits_unbiased'). Rows that are non-negative and sum to 1 are taken as
    probabilities unless `probs` says otherwise."""
    x = np.asarray(torch.as_tensor(logits_or_probs).double().cpu())
    if probs is None:
        probs = bool((x >= 0).all() and np.allclose(x.sum(1), 1, atol=1e-5))
    if len(x) < splits:
        raise FIDError(f'Inception Score needs at least {splits} images, got {len(x)}')
    if probs:
        p = x
        logp = np.log(np.clip(p, 1e-300, None))
    else:
        logp = x - x.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        p = np.exp(logp)
    scores = []
    for k in range(splits):
        part = slice(k * len(x) // splits, (k + 1) * len(x) // splits)
        log_py = np.log(p[part].mean(0))
        kl = (p[part] * (logp[part] - log_py)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(feats1, feats2, n_subsets=100, subset_size=1000, seed=0):
    """(mean, std) of the unbiased MMD^2 with the kernel k(x, y) = (x.y/d + 1)^3
    over n_subsets pairs of subsets of m = min(subset_size, n1, n2) rows, drawn
    without replacement by numpy RandomState(seed).choice (set 1, then set 2)."""
    f1 = np.asarray(torch.as_tensor(feats1).double().cpu())
    f2 = np.asarray(torch.as_tensor(feats2).double().cpu())
    if f1.shape[1] != f2.shape[1]:
        raise FIDError(f'KID features have different dimensions: {f1.shape[1]} vs {f2.shape[1]}')
    d, m = f1.shape[1], min(subset_size, len(f1), len(f2))
    if m < 2:
        raise FIDError('KID needs at least 2 images in each set')
    rng = np.random.RandomState(seed)
    vals = []
    for _ in range(n_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        # MMD^2_u = sum_{i!=j} (kxx + kyy) / (m (m-1)) - 2 sum kxy / m^2
        off = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        vals.append(off / (m * (m - 1)) - 2 * kxy.sum() / m ** 2)
    return float(np.mean(vals)), float(np.std(vals))


# --- precision, recall, density, coverage ----------------------------------
#
# Exact k-NN in blocks. One float32 matmul gives a block of squared distances
# with a proven error bound (_Points.bound); only the comparisons that the
# bound leaves undecided are settled with exact distances (float64, from the
# differences), rounded as the reference rounds them (_as_reference). Within a
# set only the blocks right of the diagonal are computed (_candidates), then
# the cross blocks (_cross); on a CPU whole blocks go to worker threads.

PRDC_CHUNK = 1024          # rows per distance block on a CPU (a multiple of 64);
PRDC_CHUNK_CUDA = 4096     # on a GPU. A block has 4x as many columns.
_EXTRA = 8                 # nearest-neighbour candidates kept beyond the k + 1
_ROW_GROUP = 32            # block columns summarised by one minimum (row search)
_COL_GROUP = 16            # block rows summarised by one minimum (column search)
_BIG = 1e30                # squared distance of a padding row to anything
_TINY = 1e-30              # absolute slack on every bound (float32 underflow)
_DELTA = 1e-6              # relative slack: rounding of d^2 and sqrt(d^2) to
                           # float32 cannot move d^2 across r^2 (1 +- 1e-6)
_U32, _U64 = 2.0 ** -24, 2.0 ** -53


def _gamma(k, u):
    """Higham's gamma_k: a length-k dot product summed in any order, rounding
    to unit u, is within gamma_k * sum |a_i b_i| of the exact value."""
    return k * u / (1 - k * u)


def _prdc_features(x, what, device=None):
    """(N, D) features as a contiguous tensor on `device` (default: their own),
    float32, or float64 for any other type (as sklearn promotes them). NaN and
    inf are caught by _Points (in the norms: one pass)."""
    if not torch.is_tensor(x):
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    x = x.detach()
    if x.dim() != 2:
        raise FIDError(f'{what} features must be a 2-D (N, D) array, got shape {tuple(x.shape)}')
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float64)
    return x.to(device or x.device).contiguous()


class _Points:
    """A feature set for the distance blocks: rows padded to a multiple of 64;
    float32 copies, moved by `center` (the real features' mean: distances are
    unchanged, norms shrink, and so does the error bound) and augmented so
    that one matmul gives squared distances,

        left_i = [x_i, |x_i|^2, 1],  right_j = [-2 x_j, 1, |x_j|^2],
        left_i . right_j = |x_i - x_j|^2,

    padding rows [0, BIG, 1] and [0, 0, BIG] (BIG away from every point)."""

    STEP = 256                                      # rows converted at a time

    def __init__(self, x, center, what, workers):
        self.x, self.n, self.d = x, x.shape[0], x.shape[1]
        self.workers = workers
        self.f32 = x.dtype == torch.float32
        self.center = center
        self.width = -(-(self.d + 2) // 16) * 16          # zero columns: aligned
        self.pad = -(-self.n // 64) * 64
        left = x.new_empty((self.pad, self.width), dtype=torch.float32)
        left[:, self.d:] = 0
        left[self.n:] = 0
        self.sq = torch.empty(self.n, dtype=torch.float64, device=x.device)

        def move(s):                                  # small steps: in cache
            part = left[s:s + self.STEP, :self.d][:self.n - s]
            if self.f32:
                torch.sub(x[s:s + self.STEP], center, out=part)
            else:
                part.copy_(x[s:s + self.STEP].double() - center.double())
            self.sq[s:s + self.STEP] = part.double().pow_(2).sum(1)
        _pool_map(move, range(0, self.n, self.STEP), workers)
        if not bool(torch.isfinite(self.sq).all()):
            raise FIDError(f'{what} features contain NaN or inf')
        self.sqmax = float(self.sq.max())
        if self.sqmax > 1e28:
            raise FIDError(f'{what} features too large for float32 distances '
                           f'(|x - mean|^2 up to {self.sqmax:.3g})')
        left[:self.n, self.d] = self.sq.to(torch.float32)
        left[:self.n, self.d + 1] = 1
        left[self.n:, self.d] = _BIG
        left[self.n:, self.d + 1] = 1
        self.cache = {'left': left}

    def left(self):
        return self.cache['left']

    def right(self):
        """Built from left (which must still be there): -2 x is exact."""
        if 'right' not in self.cache:
            left, n, d = self.cache['left'], self.n, self.d
            right = torch.empty_like(left)
            _pool_map(lambda s: torch.mul(left[s:s + self.STEP], -2, out=right[s:s + self.STEP]),
                      range(0, self.pad, self.STEP), self.workers)
            right[:n, d], right[:n, d + 1] = 1, left[:n, d]
            right[n:, d], right[n:, d + 1] = 0, _BIG
            self.cache['right'] = right
        return self.cache['right']

    def forget(self, name):
        """Free a cached augmented copy (left or right)."""
        self.cache.pop(name, None)

    def bound(self):
        """Coefficient c with |approx d^2 - d^2| <= c (|x_i|^2 + |y_j|^2) (+ _TINY),
        |.|^2 the moved float32 norms: the matmul's terms sum in absolute value
        to at most 2 (|x_i|^2 + |y_j|^2) (gamma, for any summation order), the
        norms are rounded once to float32 (2u), and the moved features too
        (4u: |d'^2 - d^2| <= 2 |d| |e| + |e|^2, |e| <= u (|x_i| + |y_j|))."""
        return 1.01 * (2 * _gamma(self.width, _U32) + 6 * _U32)


class _Nearest:
    """For every row of a set, the kk smallest approximate squared distances
    offered so far and their columns (sorted), and tau, the most an entry may
    be and still matter: min(the kk-th smallest so far, the (k+1)-th smallest
    so far + slack), slack = twice the row's error bound (see _radii: only
    entries up to the (k+1)-th smallest + 2e are needed). inf until seen;
    -inf for padding rows, which are never searched."""

    def __init__(self, n, pad, kk, k1, slack):
        dev = slack.device
        self.kk, self.k1, self.slack = kk, k1, slack
        self.vals = torch.full((pad, kk), float('inf'), device=dev)
        self.idx = torch.zeros((pad, kk), dtype=torch.long, device=dev)
        self.tau = torch.full((pad,), float('inf'), device=dev)
        self.tau[n:] = float('-inf')
        self.lock = threading.Lock()        # offers come from several threads

    def bound(self, smallest, rows):
        """tau from the sorted smallest values of some rows."""
        return torch.minimum(smallest[:, self.kk - 1], smallest[:, self.k1 - 1] + self.slack[rows])

    def offer(self, r, c, v):
        """Candidates (row r, column c, value v), flat, r ascending: keep the
        kk smallest per row."""
        if len(r) == 0:
            return
        with self.lock:
            self._merge(r, c, v)

    def _merge(self, r, c, v):
        kk, dev = self.kk, r.device
        rows, counts = torch.unique_consecutive(r, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(rows), device=dev), counts)
        slot = torch.arange(len(r), device=dev) - (torch.cumsum(counts, 0) - counts)[group]
        pv = torch.full((len(rows), kk + int(counts.max())), float('inf'), device=dev)
        pc = torch.zeros(pv.shape, dtype=torch.long, device=dev)
        pv[:, :kk], pc[:, :kk] = self.vals[rows], self.idx[rows]
        pv[group, kk + slot], pc[group, kk + slot] = v, c
        top = pv.topk(kk, 1, largest=False)
        self.vals[rows], self.idx[rows] = top.values, pc.gather(1, top.indices)
        self.tau[rows] = self.bound(top.values, rows)

    def _first_bound(self, gm, dim, rows):
        """tau for rows not yet seen, from the block's group minima gm (each is
        an entry, so the j-th smallest of them bounds the j-th smallest entry);
        inf with fewer than kk groups."""
        if gm.shape[dim] < self.kk:
            return torch.full((gm.shape[1 - dim],), float('inf'), device=gm.device)
        smallest = gm.topk(self.kk, dim, largest=False).values
        return self.bound(smallest if dim == 1 else smallest.T, rows)

    def search_rows(self, m, gm, r0, c0, g):
        """Offer the entries of block m (rows r0.., columns c0..) at or below
        their row's tau, found through gm, the minima over groups of g columns."""
        h, w = m.shape
        rows = slice(r0, r0 + h)
        tau = self.tau[rows].clone()          # a bound even if an offer moves it meanwhile
        if not bool(torch.isfinite(tau).all()):
            tau = torch.minimum(tau, self._first_bound(gm, 1, rows))
        ri, gi = (gm <= tau[:, None]).nonzero(as_tuple=True)
        vals = m.view(-1, g).index_select(0, ri * gm.shape[1] + gi)     # whole groups
        pi, pt = (vals <= tau[ri, None]).nonzero(as_tuple=True)
        self.offer(ri[pi] + r0, gi[pi] * g + pt + c0, vals[pi, pt])

    def search_cols(self, m, off, gm, r0, c0, g):
        """search_rows for the columns off.. of m (rows c0 + off.. of the set,
        columns r0..), gm their minima over groups of g rows."""
        h, w = m.shape[0], m.shape[1] - off
        rows = slice(c0 + off, c0 + off + w)
        tau = self.tau[rows].clone()
        if not bool(torch.isfinite(tau).all()):
            tau = torch.minimum(tau, self._first_bound(gm, 0, rows))
        cj, gi = (gm.T <= tau[:, None]).nonzero(as_tuple=True)      # by column
        rows = gi[:, None] * g + torch.arange(g, device=m.device)
        vals = m.view(-1).take(rows * m.shape[1] + (cj + off)[:, None])
        pi, pt = (vals <= tau[cj, None]).nonzero(as_tuple=True)
        self.offer(cj[pi] + c0 + off, rows[pi, pt] + r0, vals[pi, pt])


_BUFFERS = threading.local()


def _block(left, right, r0, r1, c0, c1, size):
    """left[r0:r1] . right[c0:c1]^T (approximate squared distances), in this
    thread's buffer of `size` floats."""
    buf = getattr(_BUFFERS, 'buf', None)
    if buf is None or buf.numel() < size or buf.device != left.device:
        buf = _BUFFERS.buf = left.new_empty(size)
    return torch.mm(left[r0:r1], right[c0:c1].T,
                    out=buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))


@contextmanager
def _threads(n):
    """torch on n CPU threads inside, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _pool_map(fn, items, workers):
    """[fn(item) for item in items] on `workers` Python threads, each running
    torch on one CPU thread. prdc spreads whole blocks (matmul and search)
    over threads instead of splitting each op: most of its ops are small, and
    a parallel op waits for its slowest thread, which on a busy machine costs
    milliseconds per op (several times the work)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]

    def run(x):
        torch.set_num_threads(1)              # this thread's own OpenMP setting
        return fn(x)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, items))


def _shard(items):
    """This rank's share of the work items under torch.distributed."""
    rank, world = _dist()
    return items[rank::world]


def _candidates(p, kk, k, chunk):
    """For every row of p, the kk smallest approximate squared distances to
    the rows of p (itself included) and their columns, sorted, as far as they
    matter (_Nearest; inf for those that do not). Only blocks
    from the diagonal rightwards: strips of `chunk` rows against the columns
    from the strip's first row on, 4 * chunk at a time; each block serves its
    rows and, transposed, its columns right of the strip (so every pair is
    offered once to each of its rows). Under torch.distributed the blocks are
    sharded and the ranks' candidates merged."""
    slack = torch.zeros(p.pad, dtype=torch.float32, device=p.x.device)
    slack[:p.n] = _up32(2 * _row_bound(p))
    near = _Nearest(p.n, p.pad, kk, k + 1, slack)
    left, right = p.left(), p.right()
    tiles = [(r0, min(r0 + chunk, p.pad), c0, min(c0 + 4 * chunk, p.pad))
             for r0 in range(0, p.pad, chunk) for c0 in range(r0, p.pad, 4 * chunk)]

    def tile(t):
        r0, r1, c0, c1 = t
        m = _block(left, right, r0, r1, c0, c1, 4 * chunk * chunk)
        h, w = m.shape
        off = max(r1 - c0, 0)                   # columns inside the strip: rows only
        near.search_rows(m, m.view(h, w // _ROW_GROUP, _ROW_GROUP).amin(2), r0, c0, _ROW_GROUP)
        if off < w:
            near.search_cols(m, off, m[:, off:].view(h // _COL_GROUP, _COL_GROUP, w - off).amin(1),
                             r0, c0, _COL_GROUP)
    _pool_map(tile, _shard(tiles), p.workers)
    vals, idx = near.vals, near.idx
    if _dist()[1] > 1:
        dev = _comm_device()
        parts = []
        for t in (vals, idx):
            got = [torch.empty_like(t, device=dev) for _ in range(_dist()[1])]
            dist.all_gather(got, t.to(dev))
            parts.append(torch.cat(got, 1).to(t.device))
        top = parts[0].topk(kk, 1, largest=False)
        vals, idx = top.values, parts[1].gather(1, top.indices)
    return vals[:p.n], idx[:p.n]


def _exact_d2(x, y, i, j, workers=1):
    """|x_i - y_j|^2 for index pairs, in float64 from the differences (exact
    products of float32 values; relative error <= D * 2^-53), a few pairs at a
    time (numpy on a CPU: a third of torch's time for such small pieces)."""
    if x.device.type != 'cpu':
        out = torch.empty(len(i), dtype=torch.float64, device=x.device)
        step = max(1, (1 << 22) // max(1, x.shape[1]))
        for s in range(0, len(i), step):
            d = x[i[s:s + step]].double() - y[j[s:s + step]].double()
            out[s:s + step] = d.mul_(d).sum(1)
        return out
    xn, yn, i, j = x.numpy(), y.numpy(), i.numpy(), j.numpy()
    out = np.empty(len(i))

    def part(s0):
        for s in range(s0, min(s0 + 4096, len(i)), 64):
            d = xn[i[s:s + 64]].astype(np.float64)
            d -= yn[j[s:s + 64]]
            out[s:s + 64] = np.einsum('ij,ij->i', d, d)
    _pool_map(part, range(0, len(i), 4096), workers)
    return torch.from_numpy(out)


def _as_reference(d2, f32):
    """Distances from exact squared distances, rounded as the reference's
    sklearn rounds them: float32 squared distance, float32 sqrt (float64
    throughout for float64 features)."""
    d2 = d2.cpu().numpy()
    return np.sqrt(d2.astype(np.float32)) if f32 else np.sqrt(d2)


def _radii(p, k, chunk):
    """Distance of every row of p to its k-th nearest neighbour in p, itself
    excluded: the (k+1)-th smallest distance with itself (0) included, as the
    reference takes it; rounded as the reference rounds (numpy array).

    With a = the (k+1)-th smallest approximate value and e the row's error
    bound, at most k entries lie truly below a - e and the (k+1)-th is at most
    a + e; so entries approximately below a - 2e are certainly below it,
    entries above a + 2e certainly above, and it is found among the band in
    between, computed exactly. A row whose kept candidates may miss part of
    the band goes through _radii_dense."""
    kk = min(k + 1 + _EXTRA, p.n)
    vals, idx = _candidates(p, kk, k, chunk)
    d2, rest = _band_kth(p, vals, idx, k)
    if len(rest):
        d2[rest] = _radii_dense(p, rest, k, chunk)
    return _as_reference(d2, p.f32)


def _row_bound(p):
    """Error bound of every row's approximate squared distances within p."""
    return p.bound() * (p.sq + p.sqmax) + _TINY


def _band_kth(p, vals, idx, k):
    """_radii's exact (k+1)-th smallest for the rows whose band lies among the
    candidates, and the other rows (for _radii_dense)."""
    kk = vals.shape[1]
    vals, order = vals.double().sort(1)
    idx = idx.gather(1, order)
    e = _row_bound(p)
    a = vals[:, k]
    lo, hi = (a - 2 * e)[:, None], (a + 2 * e)[:, None]
    complete = vals[:, -1] > hi[:, 0] if kk < p.n else torch.ones_like(a, dtype=torch.bool)
    band = (vals >= lo) & (vals <= hi) & complete[:, None]
    below = (vals < lo).sum(1)
    r, c = band.nonzero(as_tuple=True)
    exact = torch.full_like(vals, float('inf'))
    exact[r, c] = _exact_d2(p.x, p.x, r, idx[r, c], p.workers)
    pick = (k - below).clamp(0, kk - 1)[:, None]
    d2 = exact.sort(1).values.gather(1, pick)[:, 0]
    return d2, (~complete).nonzero()[:, 0]


def _radii_dense(p, rows, k, chunk):
    """_radii for rows whose band did not fit among the candidates (many points
    at nearly the same distance: duplicates, tight clusters): all their
    distances in float64 (moved by the center; matmul error <= c64 (|x_i|^2 +
    |x_j|^2)), then the band around the (k+1)-th smallest from the
    differences. Exact duplicates short-cut: if the smallest band entries
    are exactly 0, so is the answer."""
    c64 = 1.01 * (3 * _gamma(p.d, _U64) + 8 * _U64)
    x64 = torch.empty(p.x.shape, dtype=torch.float64, device=p.x.device)
    for s in range(0, p.n, p.STEP):
        x64[s:s + p.STEP] = p.x[s:s + p.STEP].double() - p.center.double()
    sq = x64.pow(2).sum(1)
    out = torch.empty(len(rows), dtype=torch.float64, device=p.x.device)
    step = max(1, chunk * chunk // max(1, p.n))
    for s in range(0, len(rows), step):
        rs = rows[s:s + step]
        with _threads(p.workers):
            d2 = x64[rs] @ x64.T
        d2 = sq[rs, None] + sq[None, :] - 2 * d2
        e = (c64 * (sq[rs] + sq.max()) + _TINY)[:, None]
        a = d2.kthvalue(k + 1, 1).values[:, None]
        below = (d2 < a - 2 * e).sum(1)
        band = (d2 - a).abs() <= 2 * e
        _dense_rows(p, rs, d2, band, below, k, out[s:s + step])
    return out


def _dense_rows(p, rs, d2, band, below, k, out):
    """_radii_dense's exact answers, row by row."""
    for t, r in enumerate(rs.tolist()):
        cols = band[t].nonzero()[:, 0]
        cols = cols[d2[t, cols].argsort()]
        need = k - int(below[t])                 # index of the answer in the band
        first = _exact_d2(p.x, p.x, cols.new_full((need + 1,), r), cols[:need + 1])
        if bool((first == 0).all()):
            out[t] = 0.0
            continue
        ex = _exact_d2(p.x, p.x, cols.new_full((len(cols),), r), cols)
        out[t] = ex.sort().values[need]


def _up32(t):
    """float64 -> float32, rounded up (a safe threshold)."""
    t32 = t.to(torch.float32)
    return torch.where(t32.double() < t, torch.nextafter(t32, t32.new_tensor(float('inf'))), t32)


class _Tally:
    """The counts prdc needs, as integer tensors (summed over ranks by
    all_reduce): pairs with the fake inside the real ball; per fake, whether
    it is inside some real ball (precision); per real, whether its ball holds
    some fake (coverage) and whether it is inside some fake ball (recall)."""

    def __init__(self, n_real, n_fake, device):
        self.counts = torch.zeros(1 + n_fake + 2 * n_real, dtype=torch.long, device=device)
        self.n_real, self.n_fake = n_real, n_fake
        self.lock = threading.Lock()

    def add(self, i, j, in_real, in_fake):
        """Pairs (real i, fake j): fake inside real ball i / real inside fake ball j."""
        with self.lock:
            self._add(i, j, in_real, in_fake)

    def _add(self, i, j, in_real, in_fake):
        nf, nr = self.n_fake, self.n_real
        self.counts[0] += in_real.sum()
        self.counts[1 + j[in_real]] = 1
        self.counts[1 + nf + i[in_real]] = 1
        self.counts[1 + nf + nr + i[in_fake]] = 1

    def result(self):
        """(pairs inside, precision, coverage, recall flags as numpy), over all ranks."""
        c = self.counts
        if _dist()[1] > 1:
            out = c.to(_comm_device())
            dist.all_reduce(out)
            c = out.to(c.device)
        c, nf, nr = c.cpu(), self.n_fake, self.n_real
        return (int(c[0]), (c[1:1 + nf] > 0).numpy(), (c[1 + nf:1 + nf + nr] > 0).numpy(),
                (c[1 + nf + nr:] > 0).numpy())


def _cross(real, fake, r_real, r_fake, chunk):
    """_Tally.result() over the real x fake pairs, sharded by blocks under
    torch.distributed. A pair is decided by its approximate distance unless
    that lies within the error bound (plus rounding slack) of the radius;
    then its exact distance decides, rounded as the reference rounds it."""
    dev = real.x.device
    c = real.bound()
    r2 = torch.as_tensor(r_real, dtype=torch.float64, device=dev) ** 2
    f2 = torch.as_tensor(r_fake, dtype=torch.float64, device=dev) ** 2
    # ball i can hold pair (i, j) only if approx d^2 <= t_real[i]; likewise for fake balls
    ninf = float('-inf')
    t_real = torch.full((real.pad,), ninf, dtype=torch.float32, device=dev)
    t_fake = torch.full((fake.pad,), ninf, dtype=torch.float32, device=dev)
    t_real[:real.n] = _up32(torch.where(
        r2 > 0, r2 * (1 + _DELTA) + c * (real.sq + fake.sqmax) + _TINY, ninf))
    t_fake[:fake.n] = _up32(torch.where(
        f2 > 0, f2 * (1 + _DELTA) + c * (real.sqmax + fake.sq) + _TINY, ninf))
    # fakes in order of radius: a group of columns then shares nearly one
    # threshold, so its largest is a tight bound for all (fewer candidates)
    order = torch.cat([torch.argsort(f2), torch.arange(fake.n, fake.pad, device=dev)])
    left, right = real.left(), fake.right()[order]
    fake.forget('right')
    t_fake = t_fake[order]
    tiles = [(r0, min(r0 + chunk, real.pad), c0, min(c0 + 4 * chunk, fake.pad))
             for r0 in range(0, real.pad, chunk) for c0 in range(0, fake.pad, 4 * chunk)]
    tally = _Tally(real.n, fake.n, dev)

    def tile(t):
        i0, i1, j0, j1 = t
        m = _block(left, right, i0, i1, j0, j1, 4 * chunk * chunk)
        gm = m.view(m.shape[0], -1, _ROW_GROUP).amin(2)
        i, j, d = _cross_candidates(m, gm, i0, j0, t_real, t_fake)
        j = order[j]
        keep = (i < real.n) & (j < fake.n)
        i, j, d = i[keep], j[keep], d[keep].double()
        e = c * (real.sq[i] + fake.sq[j]) + _TINY
        in_real, maybe_real = _inside(d, r2[i], e)
        in_fake, maybe_fake = _inside(d, f2[j], e)
        tally.add(i, j, in_real, in_fake)
        u = maybe_real | maybe_fake
        return torch.stack([i[u], j[u], maybe_real[u].long(), maybe_fake[u].long()])
    unsure = _pool_map(tile, _shard(tiles), real.workers)
    i, j, maybe_real, maybe_fake = torch.cat(
        unsure or [torch.zeros(4, 0, dtype=torch.long, device=dev)], 1)
    dist_ = _as_reference(_exact_d2(real.x, fake.x, i, j, real.workers), real.f32 and fake.f32)
    in_real = torch.from_numpy(dist_ < np.asarray(r_real)[i.cpu().numpy()]).to(dev)
    in_fake = torch.from_numpy(dist_ < np.asarray(r_fake)[j.cpu().numpy()]).to(dev)
    tally.add(i, j, in_real & maybe_real.bool(), in_fake & maybe_fake.bool())
    return tally.result()


def _cross_candidates(m, gm, i0, j0, t_real, t_fake, g=_ROW_GROUP):
    """(i, j, approx d^2) of block m's entries at or below t_real[i] or
    t_fake[j], found through gm, the minima over groups of g columns."""
    h = m.shape[0]
    t_f = t_fake[j0:j0 + m.shape[1]].view(-1, g)
    thr = torch.maximum(t_real[i0:i0 + h, None], t_f.amax(1)[None, :])
    ri, gj = (gm <= thr).nonzero(as_tuple=True)
    d = m.view(-1, g).index_select(0, ri * gm.shape[1] + gj)          # whole groups
    pi, pt = (d <= torch.maximum(t_real[ri + i0, None], t_f[gj])).nonzero(as_tuple=True)
    return ri[pi] + i0, gj[pi] * g + pt + j0, d[pi, pt]


def _inside(d, r2, e):
    """(certainly inside, undecided) for approximate squared distances d with
    error bound e against squared radii r2 (a radius 0 holds nothing)."""
    inside = (d < r2 * (1 - _DELTA) - e) & (r2 > 0)
    return inside, ~inside & (d <= r2 * (1 + _DELTA) + e) & (r2 > 0)


@contextmanager
def _fp32_matmul(device):
    """Full-precision float32 matmuls: _exact_fp32 (no TF32 on CUDA, no
    autocast), and on a CPU no oneDNN bf16/TF32 for float32 (which
    torch.set_float32_matmul_precision('medium') turns on), restored after."""
    mk = getattr(getattr(torch.backends, 'mkldnn', None), 'matmul', None)
    saved = getattr(mk, 'fp32_precision', None) if device.type == 'cpu' else None
    with _exact_fp32(device):
        if saved not in (None, 'none', 'ieee'):
            mk.fp32_precision = 'ieee'
        try:
            yield
        finally:
            if saved not in (None, 'none', 'ieee'):
                mk.fp32_precision = saved


def prdc(real_features, fake_features, nearest_k=5, chunk_size=None, distributed=True):
    """dict(precision, recall, density, coverage) of fake against real features
    (numpy arrays or tensors, (N, D) and (M, D)), exactly as the reference
    `prdc` package (Naeem et al. 2020) computes them:

    radius of a point = distance to its nearest_k-th nearest neighbour in its
    own set (itself excluded); "inside" = distance < radius (strict);
    precision = fraction of fakes inside >= 1 real ball; recall = fraction of
    reals inside >= 1 fake ball; density = mean over fakes of the number of
    real balls holding it, / nearest_k; coverage = fraction of reals whose
    ball holds >= 1 fake.

    Exact k-NN on the features' device, in blocks of chunk_size x 4 chunk_size
    (default PRDC_CHUNK, PRDC_CHUNK_CUDA on a GPU; memory: one block per worker
    thread and at most three float32 copies of the features, never N x N); on
    a CPU the blocks are spread over torch.get_num_threads() worker threads.
    Distances are those the reference computes, without its rounding noise:
    exact, then rounded to float32 (float64 for float64 features) as sklearn
    rounds them. Under torch.distributed (every rank passing the same
    features) the blocks are sharded across ranks and the counts summed;
    every rank gets the result. distributed=False: each rank computes on its
    own features, alone."""
    if not distributed:
        with _alone():
            return prdc(real_features, fake_features, nearest_k, chunk_size)
    if isinstance(nearest_k, bool) or not isinstance(nearest_k, (int, np.integer)) or nearest_k < 1:
        raise FIDError(f'nearest_k must be an integer >= 1, not {nearest_k!r}')
    k = int(nearest_k)
    real = _prdc_features(real_features, 'real')
    fake = _prdc_features(fake_features, 'fake', real.device)
    if real.shape[1] != fake.shape[1]:
        raise FIDError(f'real and fake features have different dimensions: '
                       f'{real.shape[1]} vs {fake.shape[1]}')
    for x, what in ((real, 'real'), (fake, 'fake')):
        if len(x) < k + 1:
            raise FIDError(f'prdc with nearest_k={k} needs at least {k + 1} {what} '
                           f'samples, got {len(x)}')
    if chunk_size is None:
        chunk_size = PRDC_CHUNK_CUDA if real.device.type == 'cuda' else PRDC_CHUNK
    chunk = max(64, -(-int(chunk_size) // 64) * 64)
    workers = torch.get_num_threads() if real.device.type == 'cpu' else 1
    with torch.no_grad(), _fp32_matmul(real.device), _threads(1):
        # any center leaves distances as they are; a mean shrinks the norms
        center = real[::max(1, len(real) // 1024)].mean(0, dtype=torch.float64).to(torch.float32)
        if not bool(torch.isfinite(center).all()):
            center = torch.zeros_like(center)          # NaN/inf: _Points says which
        real, fake = _Points(real, center, 'real', workers), _Points(fake, center, 'fake', workers)
        r_real = _radii(real, k, chunk)
        real.forget('right')                             # the cross blocks need real.left
        r_fake = _radii(fake, k, chunk)                  # and fake.right
        fake.forget('left')
        inside, prec, cov, rec = _cross(real, fake, r_real, r_fake, chunk)
    return dict(precision=float(prec.mean()), recall=float(rec.mean()),
                density=float((1.0 / k) * (inside / fake.n)),
                coverage=float(cov.mean()))


# ---------------------------------------------------------------------------
# 5. Training-loop helpers: cached reference statistics, FIDTracker
# ---------------------------------------------------------------------------

def reference_statistics(key, images, model, cache_dir, batch_size=50):
    """(mu, sigma) of `images`, cached as <cache_dir>/fid_stats_<key>.npz.
    The cache is used only when its dims, image count and weights match."""
    key = ''.join(c if c.isalnum() or c in '._-' else '_' for c in str(key))
    path = os.path.join(cache_dir, f'fid_stats_{key}.npz')
    want = dict(dims=model.dims, n=len(images), model=model_fingerprint(model))
    cached = None
    try:
        with np.load(path) as f:
            if all(str(f[k]) == str(v) for k, v in want.items()):
                cached = f['mu'], f['sigma']
    except Exception:
        pass                              # absent, stale or unreadable: recompute
    rank, world = _dist()
    if world > 1:                         # all ranks must take the same branch
        flag = torch.tensor([cached is not None], dtype=torch.int32, device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        cached = cached if flag.item() else None
    if cached is not None:
        return cached
    mu, sigma = statistics_from_images(images, model, batch_size)
    if rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.npz')
        os.close(fd)
        np.savez(tmp, mu=mu, sigma=sigma, **want)
        os.replace(tmp, path)
    return mu, sigma


class FIDTracker:
    """FID of generator samples against fixed real images, for training loops.

        tracker = FIDTracker(real_images, 'digits-32', device, n_samples=5000)
        fid = tracker.score(lambda n: G(torch.randn(n, nz, device=device)))

    Weights are resolved when it is built (a missing file fails at start-up,
    not mid-run); the real statistics are cached in `cache_dir`. Under
    torch.distributed each rank draws its share of samples and every rank
    gets the same number. prdc=True adds precision, recall, density and
    coverage (k = 5) against the features of n_samples real images (a fixed
    random subset when there are more), extracted once when it is built."""

    def __init__(self, real_images, key, device, n_samples=10000, batch_size=50,
                 cache_dir='fid_cache', weights=None, dims=2048, prdc=False):
        self.model = load_inception(weights, device, dims)
        self.n_samples, self.batch_size = n_samples, batch_size
        self.mu, self.sigma = reference_statistics(
            f'{key}-n{len(real_images)}-d{dims}', real_images, self.model,
            cache_dir, batch_size)
        sigma = np.asarray(self.sigma, np.float64)
        self.sigma_sqrt = sqrt_factor((sigma + sigma.T) / 2)   # once: every score reuses it
        self.real_features = None
        if prdc:
            g = torch.Generator().manual_seed(0)
            keep = torch.randperm(len(real_images), generator=g)[:n_samples].sort().values
            self.real_features = extract_images(real_images[keep.to(real_images.device)], self.model,
                                                batch_size, features=True)['features']

    def scores(self, sample_fn, isc=False):
        """dict(fid=...), plus is_mean and is_std when isc, and precision,
        recall, density, coverage when built with prdc=True."""
        with_prdc = self.real_features is not None
        res = extract_generator(sample_fn, self.n_samples, self.model,
                                self.batch_size, logits=isc, features=with_prdc)
        out = {'fid': frechet_distance(self.mu, self.sigma, res['mu'], res['sigma'], sigma1_sqrt=self.sigma_sqrt)}
        if isc:
            out['is_mean'], out['is_std'] = inception_score(res['logits'])
        if with_prdc:                     # every rank holds all features: sharded
            out.update(prdc(self.real_features, res['features']))
        if _dist()[1] > 1:                # bit-identical on every rank
            obj = [out]
            dist.broadcast_object_list(obj, src=0)
            out = obj[0]
        return out

    def score(self, sample_fn):
        """FID of sample_fn's images (n_samples of them) against the real ones."""
        return self.scores(sample_fn)['fid']


# ---------------------------------------------------------------------------
# 6. CLI: python fid.py PATH1 PATH2 (as python -m pytorch_fid), torchrun-aware
# ---------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(
        description='FID between two image folders (recursive) or .npz '
                    'statistics, with the Inception pytorch-fid uses.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('path', nargs=2, help='image folders or .npz files with mu/sigma')
    p.add_argument('--batch-size', type=int, default=50)
    p.add_argument('--device', default=None, help='cpu, cuda, cuda:N (default: cuda if available)')
    p.add_argument('--dims', type=int, default=2048, choices=DIMS)
    p.add_argument('--num-workers', type=int, default=None,
                   help='image loading processes (default: 0 on CPU, where '
                        'inference dominates; min(8, cpus) on CUDA)')
    p.add_argument('--weights', default=None, help='weights file (else $FID_WEIGHTS, '
                   'the torch hub cache, or a download)')
    p.add_argument('--save-stats', action='store_true',
                   help='write the statistics of PATH1 (a folder) to PATH2 (.npz)')
    p.add_argument('--is', dest='isc', action='store_true',
                   help='also print the Inception Score of each folder')
    p.add_argument('--kid', action='store_true', help='also print KID (folders only)')
    p.add_argument('--prdc', action='store_true',
                   help='also print precision, recall, density and coverage of PATH2 '
                        'against PATH1 (folders only; Naeem et al. 2020)')
    p.add_argument('--prdc-k', type=int, default=5,
                   help='nearest neighbours that set the radii for --prdc')
    p.add_argument('--quiet', action='store_true',
                   help='no progress bar (shown on stderr only when it is a terminal)')
    return p


def _cli(args):
    if args.batch_size < 1:
        raise FIDError('--batch-size must be at least 1')
    try:
        device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise FIDError(f'--device {args.device}: expected cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise FIDError(f'--device {args.device}: CUDA is not available here')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise FIDError(f'--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)')
    if args.num_workers is not None and args.num_workers < 0:
        raise FIDError('--num-workers must be 0 or more')
    if args.prdc_k < 1:
        raise FIDError('--prdc-k must be at least 1')
    if args.prdc and args.save_stats:
        raise FIDError('--prdc compares two image folders; it does not go with --save-stats')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized():
        if device.type == 'cuda':          # torchrun: one GPU per rank
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    workers = args.num_workers
    if workers is None:
        workers = 0 if device.type == 'cpu' else min(8, len(os.sched_getaffinity(0)))

    # check every input before the (slow) extraction starts
    paths = args.path[:1] if args.save_stats else args.path
    if args.save_stats and os.path.exists(args.path[1]):
        raise FIDError(f'{args.path[1]} exists; not overwriting it')
    inputs = []
    for p in paths:
        if p.endswith('.npz') and not args.save_stats:
            if not os.path.isfile(p):
                raise FIDError(f'{p}: no such file')
            mu, sigma = load_npz(p)
            inputs.append(dict(mu=mu, sigma=sigma))
        else:
            inputs.append(list_images(p))
    folders = [isinstance(x, list) for x in inputs]
    if args.kid and not all(folders):
        raise FIDError('--kid needs two image folders (.npz files hold only mu/sigma)')
    if args.prdc and not all(folders):
        raise FIDError('--prdc needs two image folders (.npz files hold only mu/sigma, '
                       'not the features)')
    for p, x in zip(paths, inputs):
        if args.prdc and len(x) < args.prdc_k + 1:
            raise FIDError(f'{p}: {len(x)} images; --prdc with --prdc-k {args.prdc_k} '
                           f'needs at least {args.prdc_k + 1}')
        if any(folders) and not isinstance(x, list) and len(x['mu']) != args.dims:
            raise FIDError(f'{p} holds {len(x["mu"])}-d statistics but --dims is '
                           f'{args.dims}')

    stats = inputs
    if any(folders):
        model = load_inception(args.weights, device, args.dims)
        stats = [extract_folder(x, model, args.batch_size, workers,
                                features=args.kid or args.prdc, logits=args.isc,
                                progress=False if args.quiet else None)
                 if isinstance(x, list) else x for x in inputs]
    pr = None
    if args.prdc:                         # every rank takes its share of the blocks
        pr = prdc(stats[0]['features'], stats[1]['features'], args.prdc_k)
    if _dist()[0] != 0:
        return None
    if args.save_stats:
        np.savez_compressed(args.path[1], mu=stats[0]['mu'], sigma=stats[0]['sigma'])
        return []
    out = [f'IS ({p}):  {"%s %s" % inception_score(s["logits"])}'
           for p, s in zip(args.path, stats) if 'logits' in s]
    if args.kid:
        out.append('KID:  %s %s' % kernel_inception_distance(stats[0]['features'],
                                                            stats[1]['features']))
    if pr is not None:
        out += [f'{name}: {pr[name]}' for name in ('precision', 'recall', 'density', 'coverage')]
    (m1, s1), (m2, s2) = [(s['mu'], s['sigma']) for s in stats]
    out.append(f'FID:  {frechet_distance(m1, s1, m2, s2)}')
    return out


def main(argv=None):
    args = _parser().parse_args(argv)
    shown = warnings.showwarning          # one line per warning, no source
    warnings.showwarning = lambda msg, *a, **k: print(f'warning: {msg}', file=sys.stderr)
    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        lines = _cli(args)
    except FIDError as e:             # an error every rank shares is printed once
        if _dist()[0] == 0 or not isinstance(e, _ErrorOnSomeRank):
            print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        warnings.showwarning = shown
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    for line in lines or []:
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
