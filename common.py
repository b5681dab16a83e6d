"""Shared utilities for the GAN scripts. Nothing here is specific to one method.

Sections, top to bottom:
  1. Errors       UserError and the one-line error path
  2. Data         the data sets (docs/datasets.md): in memory or memory-mapped, batched by indexing
  3. Networks     MLP and Radford DCGAN nets; K generators (or critics) run as one module
  4. Run plumbing flags, device, seeding, AMP, DDP, checkpoints, logging, outputs
  5. Metrics      mode coverage, the digit classifier, fd_digits, per-generator figures, overlap
"""
import argparse
import contextlib
import csv
import glob
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------
# 1. Errors
# ----------------------------------------------------------------------------

class UserError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""


def run_main(main):
    """Run `main()`; turn a UserError into one line and a non-zero exit, and so a collective that
    broke because another process of the job died (torchrun then restarts the group)."""
    try:
        main()
    except UserError as e:
        if int(os.environ.get('RANK', 0)) == 0:
            print(f'error: {e}', file=sys.stderr)
        discard_unused_run_folder()
        sys.exit(2)
    except RuntimeError as e:
        if not (dist.is_available() and dist.is_initialized() and is_peer_failure(e)):
            raise
        print(f'error: rank {dist.get_rank()}: another process of the job failed ({str(e).strip()[:160]}); the '
              f'last checkpoint is kept whole: torchrun --max_restarts N with --resume auto continues from it',
              file=sys.stderr, flush=True)
        os._exit(1)   # no interpreter teardown: destroying a process group with a dead peer can hang


def is_peer_failure(error):
    """A collective that failed because a peer process is gone (gloo: the connection closed)."""
    text = str(error)
    return any(w in text for w in ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe',
                                   'NCCL communicator was aborted', 'ProcessGroupNCCL'))


FRESH_RUN_FOLDER = []  # the run folder this process made, until training writes into it


def discard_unused_run_folder():
    """After bad input found once the run folder exists (an absent data set, an empty image
    folder): remove the folder this process made if it holds only args.json and no samples."""
    for folder in FRESH_RUN_FOLDER:
        samples = os.path.join(folder, 'samples')
        unused = os.path.isdir(samples) and set(os.listdir(folder)) <= {'args.json', 'samples'}
        if unused and not os.listdir(samples):
            shutil.rmtree(folder, ignore_errors=True)
    FRESH_RUN_FOLDER.clear()


def number_type(kind, low=None, high=None, low_open=False, high_open=False, name=None):
    """An argparse type: `kind` (int or float) within [low, high] (open where asked), checked when
    the flags are parsed, so a bad value is one line and exit 2 before anything runs."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}')
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be finite, got {text}')
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if high is None:
                bound = f'more than {low}' if low_open else '0 or more' if low == 0 else f'at least {low}'
            else:
                bound = f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
            raise argparse.ArgumentTypeError(f'must be {bound}, got {text}')
        return value
    check.__name__ = name or kind.__name__   # argparse names the type in its messages
    return check


positive_int = number_type(int, 1, name='positive_int')
non_negative_int = number_type(int, 0, name='non_negative_int')
positive_float = number_type(float, 0, low_open=True, name='positive_float')
non_negative_float = number_type(float, 0, name='non_negative_float')
unit_interval = number_type(float, 0, 1, name='unit_interval')           # [0, 1]
adam_beta = number_type(float, 0, 1, high_open=True, name='adam_beta')  # [0, 1)


def fid_sample_count(text):
    value = positive_int(text)
    if value < 10:
        raise argparse.ArgumentTypeError(f'must be at least 10 (the Inception Score uses 10 splits; '
                                         f'FID wants 10,000), got {value}')
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's lines as written and shows each flag's default, except where
    the default is None (the help then says what decides it) or the help already names one."""

    def _get_help_string(self, action):
        text = action.help or ''
        if action.default in (None, argparse.SUPPRESS) or 'default' in text or action.nargs == 0:
            return text
        return f'{text} (default: %(default)s)'


def describe_default(parser, flag, text):
    """Say in --help what decides a flag's default when the script sets it later (default None)."""
    for action in parser._actions:
        if flag in action.option_strings:
            action.help = f'{action.help}; default: {text}'
            return
    raise KeyError(flag)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the full usage block."""

    def error(self, message):
        print(f'{self.prog}: error: {message} (run with --help for the flags)', file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------

IMAGE_SETS = ('digits', 'stacked-digits', 'mnist', 'fashion-mnist', 'cifar10', 'stacked-mnist',
              'folder', 'celeba')
TOY_SETS = ('ring8', 'grid25')
DATASETS = IMAGE_SETS + TOY_SETS
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
STACKED_SIZE = {'stacked-digits': 20000, 'stacked-mnist': 60000}


@dataclass
class Data:
    """A whole data set: uint8 images (N, C, H, W) or float 2-D points (N, 2).

    In memory on the training device, or (an image folder above the in-memory limit, see
    in_memory_limit) memory-mapped on the host from its decoded cache, `on` naming the device
    each batch is copied to; `device` is the training device either way."""
    name: str
    x: torch.Tensor
    y: torch.Tensor = None          # int64 labels (N,), or None
    n_classes: int = 0              # 0 when unlabelled
    centres: torch.Tensor = None    # 2-D sets: mode centres (M, 2)
    std: float = 0.0                # 2-D sets: std of each Gaussian
    flip: bool = False              # random horizontal flips per batch
    mapped: bool = False            # x is a memory map of a decoded image folder (folder_cache)
    on: torch.device = None         # x stays mapped on the host; batches are copied to this device

    def __len__(self):
        return len(self.x)

    @property
    def is_2d(self):
        return self.centres is not None

    @property
    def shape(self):
        """Shape of one sample: (C, H, W) or (2,)."""
        return tuple(self.x.shape[1:])

    @property
    def device(self):
        """The device batches are on."""
        return self.x.device if self.on is None else self.on

    @property
    def streamed(self):
        """True when x stays memory-mapped on the host and each batch is gathered there."""
        return self.on is not None

    def gather(self, index):
        """The rows at `index` as stored (uint8 images), on x's device: on the host when streamed,
        in pinned memory when they go on to a GPU (then copied with non_blocking)."""
        if self.streamed and torch.is_tensor(index):
            index = index.cpu()
            if self.on.type == 'cuda':
                rows = torch.empty((len(index), *self.x.shape[1:]), dtype=self.x.dtype, pin_memory=True)
                return torch.index_select(self.x, 0, index, out=rows)
        return self.x[index]

    def batch(self, index, augment=True):
        """Samples at `index` as float in [-1, 1] (images) and their labels (or None); random
        horizontal flips with --flip unless augment=False (reference statistics)."""
        return self.finish(self.gather(index), index, augment)

    def finish(self, x, index, augment=True):
        """batch() after gather(): rows on the device, as floats, flipped; the labels."""
        x = x.to(self.device, non_blocking=True)   # streamed rows; in memory they are there
        if x.dtype == torch.uint8:
            x = x.float().div_(127.5).sub_(1.0)
            if self.flip and augment:
                flip = torch.rand(len(x), device=x.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.y is None:
            return x, None
        return x, self.y[index.to(self.y.device) if torch.is_tensor(index) else index]

    def to(self, device):
        """On `device`. A memory-mapped folder is copied there (into private memory on the CPU)
        when it fits in_memory_limit, else it stays mapped and batches are copied one at a time."""
        device = torch.device(device)
        move = lambda t: None if t is None else t.to(device)
        if self.mapped:
            limit, why = in_memory_limit(device)
            if self.x.nbytes > limit:
                if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
                    print(f'{self.name}: {human_bytes(self.x.nbytes)} of images, above the in-memory limit of '
                          f'{human_bytes(limit)} ({why}): each batch is gathered from the memory-mapped cache '
                          f'and copied to {device}', flush=True)
                return Data(self.name, self.x, move(self.y), self.n_classes, move(self.centres), self.std,
                            self.flip, mapped=True, on=device)
            x = self.x.clone() if device.type == 'cpu' else self.x.to(device)
            return Data(self.name, x, move(self.y), self.n_classes, move(self.centres), self.std, self.flip)
        return Data(self.name, move(self.x), move(self.y), self.n_classes, move(self.centres),
                    self.std, self.flip)


def resize_uint8(images, size):
    """Resize uint8 images (N, C, H, W) to size x size (bilinear, antialiased), kept as uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode='bilinear', antialias=True,
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def set_channels(images, channels):
    """Grey to colour by repetition, colour to grey by luminance."""
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    grey = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return grey.round().clamp(0, 255).to(torch.uint8)


def load_digits():
    """The embedded UCI digits: uint8 images (1797, 1, 8, 8) in 0..255, int64 labels."""
    path = os.path.join(REPO_DIR, 'data', 'digits.npz')
    if not os.path.exists(path):
        raise UserError(f'the embedded digits file {path} is missing: copy data/digits.npz from the '
                        f'project next to common.py (or pick another --dataset)')
    with np.load(path) as f:
        return torch.from_numpy(f['images'])[:, None], torch.from_numpy(f['labels']).long()


def torchvision_files(name):
    return {
        'mnist': 'MNIST/raw/train-images-idx3-ubyte and train-labels-idx1-ubyte (or their .gz)',
        'fashion-mnist': 'FashionMNIST/raw/train-images-idx3-ubyte and train-labels-idx1-ubyte (or their .gz)',
        'cifar10': 'cifar-10-batches-py/ (or cifar-10-python.tar.gz)',
    }[name]


def load_torchvision(name, data_root):
    """MNIST, Fashion-MNIST or CIFAR-10 training images as uint8 (N, C, H, W) and labels."""
    import torchvision
    cls = {'mnist': torchvision.datasets.MNIST, 'fashion-mnist': torchvision.datasets.FashionMNIST,
           'cifar10': torchvision.datasets.CIFAR10}[name]
    try:
        try:
            ds = cls(data_root, train=True, download=False)
        except RuntimeError:  # not there yet: the real download path, for users who are online
            with contextlib.redirect_stdout(io.StringIO()):
                ds = cls(data_root, train=True, download=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot find or download {name} ({reason}); place '
                        f'{torchvision_files(name)} under {os.path.abspath(data_root)}')
    images = torch.as_tensor(np.asarray(ds.data))
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets)).long()


# ---- image folders: decoded once into a memory-mapped cache ------------------------------------
#
# The first load of a folder at a size and channel mode decodes every image in worker processes
# into <cache dir>/<S>px-<rgb|grey>[-first<N>].<token>.npy, one uint8 array (N, C, S, S), and
# writes <S>px-<rgb|grey>[-first<N>].json beside it: the array's name and shape, the sorted file
# list with each file's size and mtime, the Pillow version and the decoder version. Both are
# written under temporary names and renamed, the .json last, so a killed or failed build leaves no
# cache that looks whole. Later loads (and the other DDP ranks) open the array memory-mapped when
# the .json still describes the folder's files; any change decodes the folder again. The cache
# dir is <folder>/.decoded, or $GAN_DATA_CACHE/<folder name>-<hash of its path> for folders that
# cannot be written. fid.py reads the same files (its _decoded_cache).

FOLDER_CACHE_FORMAT = 1       # the .json layout
FOLDER_DECODER_VERSION = 1    # bump when decode_image changes what it gives: older caches are rebuilt
CACHE_DIR_ENV = 'GAN_DATA_CACHE'             # caches of every folder under this directory instead
IN_MEMORY_ENV = 'GAN_DATA_IN_MEMORY_MAX'     # bytes (suffix K, M, G or T), overrides the limit below
DECODE_WORKERS_ENV = 'GAN_DECODE_WORKERS'    # decoding processes (default: the CPUs this process may use)
IN_MEMORY_FRACTION = 0.25     # a folder bigger than this share of the device's memory stays mapped
ORIENTATION_TAG = 0x0112      # EXIF orientation; 2..8 rotate or flip the image


def list_folder(root):
    """Every image file under `root` (recursive, hidden files and folders skipped), sorted."""
    if not os.path.isdir(root):
        raise UserError(f'image folder {root} does not exist: pass --data_root DIR with your images')
    paths = sorted(p for p in glob.glob(os.path.join(root, '**', '*'), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f'no images under {root} (looked for {" ".join(IMAGE_EXTENSIONS)}): '
                        f'pass --data_root DIR with your images')
    return paths


def decode_image(path, img_size, mode):
    """One image as the folder sets read it: upright by its EXIF orientation, center-cropped to
    square, resized (PIL bicubic): uint8 (S, S, C). Also whether those pixels are exactly PIL's
    convert(mode) of the file (already S x S, no EXIF rotation): what fid.py reads from it."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        im.load()
        as_is = im.size == (img_size, img_size) and im.getexif().get(ORIENTATION_TAG, 1) not in range(2, 9)
        im = ImageOps.exif_transpose(im).convert(mode)   # camera photos: upright
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((img_size, img_size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).reshape(img_size, img_size, -1), as_is


def _decode_rows(job):
    """Decode `paths` into rows start.. of the .npy at `array_path` (a worker process's share).
    Returns (images done, whether all were as-is, the error line of the first unreadable one)."""
    array_path, start, paths, img_size, mode = job
    rows = np.load(array_path, mmap_mode='r+')
    all_as_is = True
    try:
        for i, path in enumerate(paths):
            try:
                image, as_is = decode_image(path, img_size, mode)
            except Exception as e:
                return i, all_as_is, f'cannot read image {path} ({type(e).__name__}): remove or replace it'
            rows[start + i] = image.transpose(2, 0, 1)
            all_as_is &= as_is
        rows.flush()
    finally:
        del rows
    return len(paths), all_as_is, None


def _decode_worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops the pool on Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the training run's stop handler


def decode_workers(workers=None):
    """Decoding processes: `workers`, else $GAN_DECODE_WORKERS, else the CPUs this process may use."""
    if workers is None:
        text = os.environ.get(DECODE_WORKERS_ENV, '')
        try:
            workers = int(text) if text else len(os.sched_getaffinity(0))
        except ValueError:
            raise UserError(f'{DECODE_WORKERS_ENV}={text!r}: expected a number of processes') from None
        except AttributeError:   # no sched_getaffinity (macOS)
            workers = os.cpu_count() or 1
    return max(1, int(workers))


def folder_cache_dir(root):
    """Where the caches of `root` live: <root>/.decoded, or $GAN_DATA_CACHE/<name>-<path hash>."""
    base = os.environ.get(CACHE_DIR_ENV)
    if not base:
        return os.path.join(root, '.decoded')
    import hashlib
    real = os.path.realpath(root)
    name = ''.join(c if c.isalnum() or c in '._-' else '_' for c in os.path.basename(real)) or 'root'
    return os.path.join(base, f'{name}-{hashlib.sha1(real.encode()).hexdigest()[:12]}')


def file_listing(root, paths):
    """What a cache must match: the files relative to root ('/'-separated), sizes, mtimes (ns)."""
    files, sizes, mtimes = [], [], []
    prefix = os.path.join(root, '')
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise UserError(f'cannot read image {path} ({e.strerror}): remove or replace it') from None
        name = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        files.append(name.replace(os.sep, '/'))
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return {'files': files, 'bytes': sizes, 'mtime_ns': mtimes}


def cache_key(img_size, mode, n=None):
    return f'{img_size}px-{"grey" if mode == "L" else "rgb"}' + (f'-first{n}' if n else '')


def pillow_version():
    import PIL
    return PIL.__version__


def open_folder_cache(cache_dir, key, listing, img_size, mode, prefix=False):
    """The cached array (N, C, S, S), memory-mapped copy-on-write (never written back), when
    <key>.json describes these files (its first ones when `prefix`: a --subset of a cached
    folder); else None."""
    try:
        with open(os.path.join(cache_dir, f'{key}.json')) as f:
            meta = json.load(f)
        n = len(listing['files'])
        same = (meta['format'] == FOLDER_CACHE_FORMAT and meta['decoder'] == FOLDER_DECODER_VERSION
                and meta['pillow'] == pillow_version() and meta['size'] == img_size and meta['mode'] == mode
                and (len(meta['files']) >= n if prefix else len(meta['files']) == n)
                and all(meta[k][:n] == listing[k] for k in ('files', 'bytes', 'mtime_ns')))
        if not same:
            return None
        rows = np.load(os.path.join(cache_dir, meta['array']), mmap_mode='c')
    except (OSError, ValueError, KeyError, TypeError):
        return None   # absent, half there or unreadable: decoded again
    channels = 1 if mode == 'L' else 3
    if rows.dtype != np.uint8 or rows.shape != (len(meta['files']), channels, img_size, img_size):
        return None
    return rows[:n]


def human_bytes(n):
    return (f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB' if n >= 2**20
            else f'{n / 2**10:.1f} KiB')


def _host():
    return ''.join(c if c.isalnum() else '-' for c in socket.gethostname())[:40] or 'host'


def _token():
    """A build's own name part: host, process id, random (remove_stale_partials reads it)."""
    return f'{_host()}-p{os.getpid()}-{os.urandom(4).hex()}'


def remove_stale_partials(cache_dir):
    """Temporary files of builds on this host whose process is gone (killed while writing)."""
    import re
    host = _host()
    for path in glob.glob(os.path.join(cache_dir, '*.partial')):
        m = re.search(r'\.(?P<host>[A-Za-z0-9-]+)-p(?P<pid>\d+)-[0-9a-f]{8}\.', os.path.basename(path))
        if not m or m['host'] != host:
            continue
        try:
            os.kill(int(m['pid']), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(path)
        except OSError:
            pass   # alive, another user's


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def build_folder_cache(root, cache_dir, key, paths, listing, img_size, mode, workers=None):
    """Decode `paths` into a new cache `key` under cache_dir (in `workers` processes) and
    return it memory-mapped; the .json is renamed into place last. A corrupt image, a full disk
    or an unwritable cache dir is one UserError and leaves no cache behind."""
    import errno
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    n, channels = len(paths), 1 if mode == 'L' else 3
    nbytes = n * channels * img_size * img_size
    token = _token()
    array_name = f'{key}.{token}.npy'
    partial = os.path.join(cache_dir, f'{array_name}.partial')
    meta_partial = os.path.join(cache_dir, f'{key}.json.{token}.partial')
    workers = min(decode_workers(workers), -(-n // 8))   # a process per 8 images at least
    chunk = max(1, min(256, -(-n // (workers * 8))))
    jobs = [(partial, s, paths[s:s + chunk], img_size, mode) for s in range(0, n, chunk)]
    is_main = not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
    done = False
    try:
        os.makedirs(cache_dir, exist_ok=True)
        remove_stale_partials(cache_dir)
        rows = np.lib.format.open_memmap(partial, mode='w+', dtype=np.uint8, shape=(n, channels, img_size, img_size))
        offset = rows.offset
        del rows
        fd = os.open(partial, os.O_RDWR)
        try:   # claim the space now: a full disk is an error here, not a SIGBUS while writing
            os.posix_fallocate(fd, 0, offset + nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        except AttributeError:
            pass   # no posix_fallocate (macOS)
        finally:
            os.close(fd)
        if is_main:
            print(f'decoding {n:,} images under {root} at {img_size}px ({human_bytes(nbytes)}) into '
                  f'{cache_dir} with {workers} process(es), once', flush=True)
        start, all_as_is, error, reported, decoded = time.time(), True, None, 0, 0
        pool = None
        if workers > 1:
            import multiprocessing
            method = 'fork' if sys.platform.startswith('linux') else 'spawn'
            pool = ProcessPoolExecutor(workers, multiprocessing.get_context(method), initializer=_decode_worker_init)
        try:
            results = pool.map(_decode_rows, jobs) if pool else map(_decode_rows, jobs)
            for count, as_is, error in results:   # in order: the first unreadable file is named
                if error:
                    break
                decoded, all_as_is = decoded + count, all_as_is and as_is
                if is_main and time.time() - start > 60 * (reported + 1):
                    reported += 1
                    left = (time.time() - start) * (n - decoded) / decoded
                    print(f'decoded {decoded:,} of {n:,} images, about {format_eta(left)} left', flush=True)
        except BrokenProcessPool:
            raise UserError(f'a decoding process died after {decoded:,} of {n:,} images (out of memory?): '
                            f'set {DECODE_WORKERS_ENV} lower') from None
        finally:
            if pool:   # the chunks in flight finish, the others are dropped
                pool.shutdown(wait=True, cancel_futures=True)
        if error:
            raise UserError(error)
        _fsync(partial)
        os.replace(partial, os.path.join(cache_dir, array_name))
        meta = {'format': FOLDER_CACHE_FORMAT, 'decoder': FOLDER_DECODER_VERSION, 'pillow': pillow_version(),
                'root': os.path.abspath(root), 'size': img_size, 'mode': mode, 'array': array_name,
                'shape': [n, channels, img_size, img_size], 'as_is': bool(all_as_is), **listing}
        with open(meta_partial, 'w') as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_partial, os.path.join(cache_dir, f'{key}.json'))
        _fsync(cache_dir, directory=True)
        done = True
        if is_main:
            print(f'decoded {n:,} images in {time.time() - start:.1f} s', flush=True)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        what, fix = ('not enough disk space for', 'free space there') if full else ('cannot write', 'make it writable')
        raise UserError(f'{what} the decoded image cache ({human_bytes(nbytes)}) in {cache_dir} '
                        f'({e.strerror or type(e).__name__}): {fix}, or set {CACHE_DIR_ENV}=DIR to keep '
                        f'caches elsewhere') from None
    finally:
        if not done:
            for path in (partial, meta_partial, os.path.join(cache_dir, array_name)):
                with contextlib.suppress(OSError):
                    os.remove(path)
    for old in glob.glob(os.path.join(cache_dir, f'{glob.escape(key)}.*.npy')):
        if os.path.basename(old) != array_name:   # the arrays of older caches of this key
            with contextlib.suppress(OSError):
                os.remove(old)
    return open_folder_cache(cache_dir, key, listing, img_size, mode)


def _patient_group():
    """A gloo group whose collectives wait a week: the other ranks wait in it while rank 0
    decodes a folder (hours for a big one; the default group's timeout is 10 to 30 minutes)."""
    import datetime
    global _PATIENT_GROUP
    if _PATIENT_GROUP is None or _PATIENT_GROUP[0] is not dist.group.WORLD:
        _PATIENT_GROUP = (dist.group.WORLD, dist.new_group(backend='gloo', timeout=datetime.timedelta(days=7)))
    return _PATIENT_GROUP[1]


_PATIENT_GROUP = None


def rank_zero_builds(build):
    """build() on rank 0 first; the other ranks wait for it (however long it takes) and then run
    build() themselves, which finds what rank 0 wrote, or raise the UserError rank 0 raised."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    group = _patient_group()
    if dist.get_rank() == 0:
        status = ['rank 0 could not build the decoded image cache: see its error']
        try:
            result = build()
            status = [None]
        except UserError as e:
            status = [str(e)]
            raise
        finally:
            dist.broadcast_object_list(status, src=0, group=group)
        return result
    status = [None]
    dist.broadcast_object_list(status, src=0, group=group)
    if status[0] is not None:
        raise UserError(status[0])
    return build()


def folder_cache(root, paths, complete, img_size, mode, workers=None):
    """The decoded cache of these files of root (all of them when `complete`, else the first
    len(paths) for --subset), memory-mapped: built on first use (rank 0 under DDP)."""
    cache_dir = folder_cache_dir(root)
    listing = file_listing(root, paths)
    key = cache_key(img_size, mode, None if complete else len(paths))

    def build():
        rows = open_folder_cache(cache_dir, cache_key(img_size, mode), listing, img_size, mode,
                                 prefix=not complete)   # a --subset reads a complete cache's first rows
        if rows is None and not complete:
            rows = open_folder_cache(cache_dir, key, listing, img_size, mode)
        if rows is None:
            rows = build_folder_cache(root, cache_dir, key, paths, listing, img_size, mode, workers)
        if rows is None:
            raise UserError(f'the decoded image cache in {cache_dir} changed while it was opened: '
                            f'is another job rebuilding it? start again')
        return rows
    return rank_zero_builds(build)


def load_folder(root, img_size, channels, subset=0, workers=None):
    """Every image under `root` (recursive; the first `subset` in sorted order when given), upright
    by its EXIF orientation, center-cropped to square, resized: uint8 (N, C, S, S), memory-mapped
    from the folder's decoded cache (folder_cache; decoded in `workers` processes on first use)."""
    paths = list_folder(root)
    keep = paths[:subset] if subset else paths   # decode only what --subset keeps
    mode = 'L' if channels == 1 else 'RGB'
    rows = folder_cache(root, keep, len(keep) == len(paths), img_size, mode, workers)
    return torch.from_numpy(rows)


def parse_bytes(text):
    """'123', '512M', '4G', '1.5TiB' -> bytes (binary units)."""
    import re
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*', text, re.IGNORECASE)
    if not m:
        raise UserError(f'{IN_MEMORY_ENV}={text!r}: expected bytes, e.g. 0, 512M or 4G')
    return int(float(m[1]) * 1024 ** ' KMGT'.index(m[2].upper() or ' '))


def host_memory():
    """Bytes of RAM this process may use: the machine's, or its cgroup's limit when lower."""
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                total = min(total, int(f.read().strip()))
    return total


def in_memory_limit(device):
    """(bytes, why): the largest decoded image folder kept whole in `device`'s memory; a bigger
    one stays memory-mapped on the host and is copied a batch at a time. A quarter of the GPU's
    memory, or on the CPU a quarter of host memory split between the local DDP processes (each
    holds a copy); $GAN_DATA_IN_MEMORY_MAX overrides it (0: always memory-mapped)."""
    text = os.environ.get(IN_MEMORY_ENV)
    if text:
        return parse_bytes(text), f'{IN_MEMORY_ENV}={text}'
    if device.type == 'cuda':
        total = torch.cuda.get_device_properties(device).total_memory
        return int(IN_MEMORY_FRACTION * total), f'a quarter of the memory of {device}; {IN_MEMORY_ENV} sets it'
    local = max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    shared = f' shared by {local} processes' if local > 1 else ''
    return (int(IN_MEMORY_FRACTION * host_memory() / local),
            f'a quarter of host memory{shared}; {IN_MEMORY_ENV} sets it')


def stack_three(images, labels, n, seed=1234):
    """Stacked data: three random grey images as R, G, B; the label is the digit triple (1000 modes)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(images), (n, 3), generator=g)
    stacked = images[pick][:, :, 0]                     # (n, 3, H, W)
    triple = labels[pick]
    return stacked, triple[:, 0] * 100 + triple[:, 1] * 10 + triple[:, 2]


def toy_centres(name):
    if name == 'ring8':
        angles = torch.arange(8) * (2 * math.pi / 8)
        return torch.stack([2 * angles.cos(), 2 * angles.sin()], 1), 0.02
    grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    return torch.cartesian_prod(grid, grid), 0.05


def load_data(name, data_root='./data', img_size=32, channels=None, subset=0, n_toy=100_000,
              seed=1234, decode_workers=None):
    """Load a data set by name (DATASETS) on the CPU, image folders memory-mapped from their
    decoded cache (folder_cache); `.to(device)` moves it (Data.to)."""
    if name not in DATASETS:
        raise UserError(f'unknown data set {name!r}: choose one of {", ".join(DATASETS)}')
    if name in TOY_SETS:
        centres, std = toy_centres(name)
        g = torch.Generator().manual_seed(seed)
        mode = torch.randint(len(centres), (n_toy,), generator=g)
        points = centres[mode] + std * torch.randn(n_toy, 2, generator=g)
        return Data(name, points, mode, len(centres), centres, std)

    if name.startswith('stacked-') and channels == 1:
        raise UserError(f'{name} is three digits stacked as R, G, B: it needs 3 channels; drop --channels 1')
    n_classes = 10
    if name in ('digits', 'stacked-digits'):
        images, labels = load_digits()
    elif name in ('folder', 'celeba'):
        images, labels, n_classes = load_folder(data_root, img_size, channels, subset, decode_workers), None, 0
    else:
        with rank_zero_first():  # under DDP rank 0 downloads, then the others read its files
            images, labels = load_torchvision('mnist' if name == 'stacked-mnist' else name, data_root)
    if name.startswith('stacked-'):
        images, labels = stack_three(images, labels, STACKED_SIZE[name])
        n_classes = 1000
    if subset:
        images, labels = images[:subset], (None if labels is None else labels[:subset])
    images = set_channels(resize_uint8(images, img_size), channels)
    return Data(name, images.contiguous(), labels, n_classes, mapped=name in ('folder', 'celeba'))


class Batches:
    """Shuffled mini-batches of a data set, drawn by indexing: on its device when it is in memory,
    else gathered from the memory-mapped host copy and copied to the device (on a GPU the next
    batch is gathered into pinned memory while the current one trains).

    Batch b of epoch e is a pure function of (seed, e, b, rank): resuming needs no loader
    state, and each DDP rank takes its own slice of the same permutation.
    """

    def __init__(self, data, batch_size, seed=0, rank=0, world_size=1):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = len(data) // (batch_size * world_size)
        if self.per_epoch == 0:
            raise UserError(f'--batch_size {batch_size} x {world_size} process(es) is more than the '
                            f'{len(data)} samples of {data.name}: lower --batch_size')
        self.orders = {}   # epoch -> permutation, on the device of data.x (the current, the next)
        self.prefetch = data.streamed and data.device.type == 'cuda'
        self.pending, self.thread = None, None   # (iteration, its rows being gathered), the gatherer

    def order(self, epoch):
        if epoch not in self.orders:
            while len(self.orders) > 1:
                del self.orders[min(self.orders)]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.orders[epoch] = torch.randperm(len(self.data), generator=g).to(self.data.x.device)
        return self.orders[epoch]

    def index(self, iteration):
        """The sample indices of global iteration `iteration` on this rank."""
        epoch, b = divmod(iteration, self.per_epoch)
        start = (b * self.world_size + self.rank) * self.batch_size
        return self.order(epoch)[start:start + self.batch_size]

    def get(self, iteration):
        """(x, y) for global iteration `iteration` (one batch per iteration)."""
        index = self.index(iteration)
        if not self.prefetch:
            return self.data.batch(index)
        if self.pending is not None and self.pending[0] == iteration:
            rows = self.pending[1].result()
        else:
            rows = self.data.gather(index)
        if self.thread is None:
            from concurrent.futures import ThreadPoolExecutor
            self.thread = ThreadPoolExecutor(1, thread_name_prefix='batch-prefetch')
        self.pending = (iteration + 1, self.thread.submit(self.gather_in_thread, self.index(iteration + 1)))
        return self.data.finish(rows, index)

    def gather_in_thread(self, index):
        torch.cuda.set_device(self.data.device)   # pinned memory here, not a context on GPU 0
        return self.data.gather(index)


# ----------------------------------------------------------------------------
# 3. Networks
#
# Multi-generator methods run K networks of identical shape. Rather than a Python loop over
# K modules, one module holds all K: linear layers as a batched matmul over a leading member
# axis, conv layers as grouped convolutions, batch norm with per-member statistics. Member k's
# parameters are slices of the stacked tensors, so the K networks stay exactly independent
# (Adam, RMSprop and clipping act elementwise), and K = 1 is the ordinary network.
# ----------------------------------------------------------------------------

class EnsembleLinear(nn.Module):
    """K independent Linear layers as one batched matmul: (K, B, in) -> (K, B, out)."""

    def __init__(self, n_members, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_members, 1, out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleBatchNorm(nn.Module):
    """BatchNorm1d with separate statistics and affine parameters per member: (K, B, F)."""

    def __init__(self, n_members, features, eps=1e-5):
        super().__init__()
        self.norm = nn.BatchNorm1d(n_members * features, eps=eps)

    def forward(self, x):
        k, b, f = x.shape
        y = self.norm(x.transpose(0, 1).reshape(b, k * f))
        return y.view(b, k, f).transpose(0, 1)


class MLPGenerators(nn.Module):
    """K MLP generators z -> x, run as one module. Returns (K, B, *out_shape).

    Defaults are the classic WGAN generator: latent -> 128 -> 256 -> 512 -> 1024 -> x,
    BatchNorm on all hidden layers but the first, LeakyReLU 0.2, Tanh output.
    """

    def __init__(self, n_gen, latent_dim, out_shape, hidden=(128, 256, 512, 1024), batchnorm=True,
                 tanh=True):
        super().__init__()
        self.n_gen, self.out_shape = n_gen, tuple(out_shape)
        layers, width = [], latent_dim
        for i, h in enumerate(hidden):
            layers.append(EnsembleLinear(n_gen, width, h))
            if batchnorm and i > 0:
                layers.append(EnsembleBatchNorm(n_gen, h))
            layers.append(nn.LeakyReLU(0.2))
            width = h
        layers.append(EnsembleLinear(n_gen, width, math.prod(out_shape)))
        if tanh:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        """z: (B, latent) shared by all generators, or (K, B, latent) one batch each."""
        if z.dim() == 2:
            z = z.expand(self.n_gen, *z.shape)
        return self.net(z).view(self.n_gen, z.shape[1], *self.out_shape)


class MLPDiscriminator(nn.Module):
    """Classic WGAN/GAN MLP critic: x -> 512 -> 256 -> n_out with LeakyReLU 0.2, no norm.

    With n_nets = 1 it maps (B, *shape) to (B,) (or (B, n_out)); with n_nets = K it holds K
    independent critics and maps (K, B, *shape), member k seeing x[k], or (B, *shape) shown to
    all, to (K, B[, n_out]). The layout is read from the number of dimensions, never the sizes.
    """

    def __init__(self, in_shape, hidden=(512, 256), n_out=1, n_nets=1):
        super().__init__()
        self.n_nets, self.n_out, self.in_shape = n_nets, n_out, tuple(in_shape)
        layers, width = [], math.prod(in_shape)
        for h in hidden:
            layers += [EnsembleLinear(n_nets, width, h), nn.LeakyReLU(0.2)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = EnsembleLinear(n_nets, width, n_out)
        self.feature_dim = width

    def forward(self, x):
        k = self.n_nets
        member_wise = x.dim() == len(self.in_shape) + 2     # (K, B, *shape): member k sees x[k]
        x = x.reshape(k, x.shape[1], -1) if member_wise else x.reshape(1, len(x), -1).expand(k, -1, -1)
        out = self.head(self.body(x))
        out = out.squeeze(-1) if self.n_out == 1 else out
        return out if member_wise or k > 1 else out[0]


def check_image_size(img_size, smallest=16, largest=None):
    ok = img_size >= smallest and img_size & (img_size - 1) == 0
    if not ok or (largest and img_size > largest):
        top = f' and at most {largest}' if largest else ''
        raise UserError(f'--img_size {img_size} cannot be made by the conv nets: use a power of two '
                        f'of at least {smallest}{top} (e.g. 32 or 64)')


def dcgan_init_(module):
    """Radford et al.'s initialisation: conv weights N(0, 0.02), BN gains N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


class DCGANGenerators(nn.Module):
    """K Radford DCGAN generators as one module of grouped transposed convolutions.

    z (B, latent) shared, or (K, B, latent) -> images (K, B, C, S, S). Each generator:
    4x4 with ngf * S/8 channels, then doubling resolution and halving channels (BN, ReLU),
    Tanh output; at S = 64 and ngf = 64 this is exactly pytorch/examples' DCGAN generator.
    """

    def __init__(self, n_gen, latent_dim, img_size, channels, ngf=64):
        super().__init__()
        check_image_size(img_size)
        self.n_gen, self.latent_dim, self.channels = n_gen, latent_dim, channels
        k, width = n_gen, ngf * img_size // 8
        layers = [nn.ConvTranspose2d(k * latent_dim, k * width, 4, 1, 0, bias=False, groups=k),
                  nn.BatchNorm2d(k * width), nn.ReLU(True)]
        size = 4
        while size * 2 < img_size:
            layers += [nn.ConvTranspose2d(k * width, k * width // 2, 4, 2, 1, bias=False, groups=k),
                       nn.BatchNorm2d(k * width // 2), nn.ReLU(True)]
            width, size = width // 2, size * 2
        layers += [nn.ConvTranspose2d(k * width, k * channels, 4, 2, 1, bias=False, groups=k), nn.Tanh()]
        self.net = dcgan_init_(nn.Sequential(*layers))

    def forward(self, z):
        k = self.n_gen
        if z.dim() == 2:
            z = z.repeat(1, k)                                   # (B, K * latent)
        else:
            z = z.transpose(0, 1).reshape(z.shape[1], -1)       # (B, K * latent)
        x = self.net(z[:, :, None, None])                        # (B, K * C, S, S)
        return x.view(len(x), k, self.channels, *x.shape[2:]).transpose(0, 1)


class DCGANDiscriminator(nn.Module):
    """Radford DCGAN discriminator: strided convs, BN (not on the first), LeakyReLU 0.2, logits.

    `body` maps images to features (B, feature_dim); `head` gives n_out logits. With
    n_nets = K > 1 it holds K discriminators as grouped convs and maps (K, B, C, S, S), or
    (B, C, S, S) shown to all, to (K, B[, n_out]); with n_nets = 1, (B, C, S, S) -> (B[, n_out]).
    """

    def __init__(self, img_size, channels, ndf=64, n_out=1, n_nets=1, batchnorm=True):
        super().__init__()
        check_image_size(img_size)
        k, width, size = n_nets, ndf, img_size // 2
        self.n_nets, self.n_out, self.channels = n_nets, n_out, channels
        layers = [nn.Conv2d(k * channels, k * ndf, 4, 2, 1, bias=False, groups=k), nn.LeakyReLU(0.2, True)]
        while size > 4:
            layers += [nn.Conv2d(k * width, k * width * 2, 4, 2, 1, bias=False, groups=k)]
            layers += [nn.BatchNorm2d(k * width * 2)] if batchnorm else []
            layers += [nn.LeakyReLU(0.2, True)]
            width, size = width * 2, size // 2
        self.body = dcgan_init_(nn.Sequential(*layers))
        self.head = dcgan_init_(nn.Conv2d(k * width, k * n_out, 4, 1, 0, bias=False, groups=k))
        self.feature_dim = width * 16

    def features(self, x):
        """(B, K * width, 4, 4) features of the body; a second head can share them."""
        k = self.n_nets
        if k > 1 or x.dim() == 5:
            x = x.expand(k, *x.shape) if x.dim() == 4 else x
            x = x.transpose(0, 1).reshape(x.shape[1], k * self.channels, *x.shape[3:])
        return self.body(x)

    def forward(self, x):
        """(B, C, S, S) -> (B[, n_out]) for one net, (K, B[, n_out]) for K; (K, B, C, S, S) -> (K, B[, n_out])."""
        out = self.head(self.features(x)).view(-1, self.n_nets, self.n_out).transpose(0, 1)
        out = out.squeeze(-1) if self.n_out == 1 else out
        return out if self.n_nets > 1 or x.dim() == 5 else out[0]


# ----------------------------------------------------------------------------
# 4. Run plumbing
# ----------------------------------------------------------------------------

def base_parser(description, dataset='digits'):
    """The flags every script shares (README: Flags every script shares). Scripts add their own."""
    p = Parser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    a('--dataset', default=dataset, choices=DATASETS, help='data set: digits is embedded (offline); ring8/grid25 are 2-D')
    a('--data_root', default='./data', help='where torchvision data sets, folders and caches live')
    a('--subset', type=non_negative_int, default=0, help='use only the first N images (0 = all)')
    a('--img_size', type=positive_int, default=32, help='image size (a power of two for conv nets)')
    a('--channels', type=int, choices=(1, 3), default=None, help='image channels (default: the data set\'s)')
    a('--batch_size', type=positive_int, default=64, help='batch size per process')
    a('--lr', type=positive_float, default=2e-4, help='learning rate')
    a('--b1', type=adam_beta, default=0.5, help='Adam beta1')
    a('--b2', type=adam_beta, default=0.999, help='Adam beta2')
    a('--latent_dim', type=positive_int, default=100, help='size of z')
    a('--n_epochs', type=positive_int, default=20, help='training length in epochs')
    a('--n_iters', type=positive_int, default=None, help='training length in iterations (wins over --n_epochs)')
    a('--sample_interval', type=non_negative_int, default=500,
      help='iterations between sample grids (0 = end only)')
    a('--log_interval', type=non_negative_int, default=100, help='iterations between log lines')
    a('--eval_interval', type=non_negative_int, default=0,
      help='iterations between quality metrics (0 = end only)')
    a('--eval_samples', type=non_negative_int, default=0, help='samples for metrics (0 = 2,500 for 2-D, 2,000 for '
      'fd_digits, 26,000 for stacked modes)')
    a('--out_dir', default=None, help='run folder (default runs/<script>/<dataset>-NNN, never reused)')
    a('--resume', default=None, help='continue a run from its checkpoint, with the flags in its args.json '
      '(flags given here win): a run folder, "last" (the newest run of this script on --dataset), or '
      '"auto" (the --out_dir run when it has a checkpoint, else a fresh run there: for job scripts '
      'and torchrun --max_restarts)')
    a('--ckpt_interval', type=non_negative_int, default=1000, help='iterations between checkpoints (0 = end only)')
    a('--seed', type=non_negative_int, default=0, help='random seed')
    a('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    a('--amp', nargs='?', const='auto', default=None, choices=('auto', 'bf16', 'fp16'),
      help='mixed precision: bare --amp is bf16 on the CPU and on GPUs with native bf16, else fp16 '
      'with a GradScaler per optimizer; or name the dtype (fp16 on the CPU runs the GradScaler path)')
    a('--compile', action='store_true', help='torch.compile the networks')
    a('--ddp', action='store_true', help='force DDP (automatic under torchrun)')
    a('--fid_every', type=non_negative_int, default=0, help='iterations between FIDs via fid.py (0 = off)')
    a('--fid_samples', type=fid_sample_count, default=10000, help='generated samples per FID')
    a('--fid_weights', default=None, help='FID Inception weights (default: $FID_WEIGHTS or the torch hub cache)')
    a('--prdc', action='store_true', help='with --fid_every: also precision, recall, density and coverage '
      '(Kynkaanniemi et al. 2019; Naeem et al. 2020) on the same Inception features')
    a('--generate', type=positive_int, default=None, metavar='N',
      help='with --resume RUN: write N samples as PNGs (2-D sets: .npy) under RUN/generated/ and stop; '
      'no training, nothing else in the run changes')
    a('--from', dest='from_ckpt', choices=('last', 'best'), default='last',
      help='with --generate: sample ckpt.pt (last) or ckpt_best.pt (best by the tracked quality figure)')
    return p


NOT_INHERITED = {'resume', 'out_dir', 'generate', 'from_ckpt', 'ddp'}  # args.json keys a resume does not take


def parse_args(parser, argv=None):
    """The flags; when resuming (or generating from) a run, its args.json gives the defaults and the
    flags on the command line win, so `--resume RUN` alone continues RUN as it was started."""
    args = parser.parse_args(argv)
    folder = {'auto': args.out_dir, None: None}.get(args.resume, args.resume)
    if args.resume == 'last':
        folder = last_run_folder(os.path.basename(sys.argv[0]).removesuffix('.py'), args.dataset)
    saved_path = os.path.join(folder, 'args.json') if folder else ''
    if not os.path.exists(saved_path):
        return args
    with open(saved_path) as f:
        saved = json.load(f)
    known = {action.dest for action in parser._actions}
    defaults = {k: v for k, v in saved.items() if k in known and k not in NOT_INHERITED}
    if isinstance(defaults.get('amp'), bool):   # args.json from before --amp took a dtype
        defaults['amp'] = 'auto' if defaults['amp'] else None
    return parser.parse_args(argv, namespace=argparse.Namespace(**defaults))


def resolve_device(name, local_rank=0, world_size=1):
    if world_size > 1 and name.startswith('cuda:'):
        raise UserError(f'--device {name} under torchrun would put every process on the same GPU: use '
                        f'--device cuda (each process takes the GPU of its local rank) and choose GPUs '
                        f'with CUDA_VISIBLE_DEVICES')
    if name == 'auto':
        name = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    elif name == 'cuda':
        name = f'cuda:{local_rank}'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {name} asked for, but no CUDA GPU is visible: use --device cpu')
    if not (name == 'cpu' or name.startswith('cuda')):
        raise UserError(f'--device {name!r} is not understood: use auto, cpu, cuda or cuda:N')
    return torch.device(name)


def rng_state():
    """Every RNG's state as tensors and plain types, so checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@contextlib.contextmanager
def rank_zero_first():
    """Under DDP rank 0 runs the block first (a download, a cache file) and the other ranks after
    it, so they read what it wrote instead of writing the same files at the same time."""
    ddp = dist.is_available() and dist.is_initialized()
    if ddp and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if ddp and dist.get_rank() == 0:
            dist.barrier()


def init_torchrun_group(backend):
    """The process group torchrun's environment describes, its store keys prefixed by the restart
    attempt. After `torchrun --max_restarts` restarts a group, the agent's store still holds the dead
    workers' addresses under the same keys, and a new rank can read one and fail to connect (seen
    with torch 2.14 and gloo); each attempt's own prefix keeps them apart."""
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is None:   # not torchrun's elastic agent: plain env://
        return dist.init_process_group(backend)
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    agent_serves = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world_size,
                          is_master=rank == 0 and not agent_serves)
    dist.init_process_group(backend, store=dist.PrefixStore(f'attempt_{attempt}', store), rank=rank,
                            world_size=world_size)


def cuda_has_native_bf16():
    """bf16 in hardware (Ampere and later); torch's default also counts slow emulation (V100, T4),
    where fp16 with a GradScaler is the right choice."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the argument
        return torch.cuda.is_bf16_supported()


def checkpointed(obj):
    """The optimizer or net behind a checkpoint view (pmgan's PerGenerator keeps it as .obj)."""
    return getattr(obj, 'obj', obj)


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def new_run_folder(script, dataset):
    parent = os.path.join('runs', script)
    os.makedirs(parent, exist_ok=True)
    taken = [int(d.rsplit('-', 1)[1]) for d in os.listdir(parent)
             if d.startswith(dataset + '-') and d.rsplit('-', 1)[1].isdigit()]
    number = max(taken, default=0) + 1
    while True:  # mkdir is atomic: two runs started at once still get different folders
        path = os.path.join(parent, f'{dataset}-{number:03d}')
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            number += 1


def last_run_folder(script, dataset):
    runs = [r for r in glob.glob(os.path.join('runs', script, f'{dataset}-*'))
            if os.path.exists(os.path.join(r, 'ckpt.pt')) and r.rsplit('-', 1)[1].isdigit()]
    runs.sort(key=lambda r: int(r.rsplit('-', 1)[1]))  # digits-1000 after digits-999
    if not runs:
        raise UserError(f'--resume last: no run of {script} on {dataset} with a checkpoint under runs/')
    return runs[-1]


def choose_run_folder(args, script, is_main):
    """(run folder, whether to resume it) from --resume and --out_dir. A fresh run never goes into a
    folder that already holds a run: that stops here, before anything is written."""
    checkpoint = 'ckpt_best.pt' if args.generate and args.from_ckpt == 'best' else 'ckpt.pt'
    if args.resume == 'auto':
        if not args.out_dir:
            raise UserError('--resume auto needs --out_dir DIR: the run folder to continue, or to start in')
        if os.path.exists(os.path.join(args.out_dir, 'ckpt.pt')) or args.generate:
            folder = args.out_dir
        else:
            return args.out_dir, False            # nothing to resume yet: a fresh run there
    elif args.resume:
        folder = last_run_folder(script, args.dataset) if args.resume == 'last' else args.resume
    elif args.generate:
        raise UserError('--generate N samples a trained run: pass --resume RUN (a run folder with a checkpoint)')
    elif args.out_dir:
        used = [f for f in ('ckpt.pt', 'metrics.csv') if os.path.exists(os.path.join(args.out_dir, f))]
        if used:
            raise UserError(f'--out_dir {args.out_dir} already holds a run ({" and ".join(used)}); nothing was '
                            f'changed: continue it with --resume {args.out_dir} (or --resume auto), or pass '
                            f'another --out_dir')
        return args.out_dir, False
    else:
        return (new_run_folder(script, args.dataset) if is_main else None), False
    if not os.path.exists(os.path.join(folder, checkpoint)):
        raise UserError(f'--resume {args.resume}: no checkpoint {os.path.join(folder, checkpoint)}; pass a run '
                        f'folder that has one' + (' (ckpt_best.pt exists only where a quality figure was '
                                                  'tracked)' if checkpoint == 'ckpt_best.pt' else ''))
    return folder, True


class CheckpointFiles:
    """A run folder's checkpoints: ckpt.pt (the latest state) and ckpt_best.pt (the state at the best
    value of the tracked quality figure). Written to a temporary file and renamed, so a kill never
    leaves a broken one; read with weights_only=True, so a checkpoint cannot run code on load."""

    def __init__(self, folder):
        self.folder = folder   # None on DDP ranks other than 0 for a new numbered folder: they never write
        self.best = {}         # the tracked figure's best so far: {'metric', 'value', 'iteration'}

    def path(self, which='last'):
        return os.path.join(self.folder, 'ckpt_best.pt' if which == 'best' else 'ckpt.pt')

    def improves(self, metric, value, iteration):
        """Whether `value` of the tracked figure (lower is better) beats the best so far; if so it
        becomes the best, to be written to ckpt_best.pt."""
        if not math.isfinite(value) or (self.best and not value < self.best['value']):
            return False
        self.best = {'metric': metric, 'value': value, 'iteration': iteration}
        return True

    def write(self, state, which='last'):
        path = self.path(which)
        torch.save(state, path + '.tmp')
        os.replace(path + '.tmp', path)  # a kill before this line leaves the old file whole

    def read(self, which='last'):
        path = self.path(which)
        try:   # on the CPU: set_rng_state needs the RNG states there; load_state_dict moves the rest
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            if 'weights_only' not in str(e) and 'Weights only' not in str(e):
                raise UserError(f'cannot read checkpoint {path} (UnpicklingError): it is damaged; start a fresh run')
            raise UserError(f'refusing to load {path}: it holds Python objects other than tensors and plain '
                            f'values, which could run code when loaded; nothing in it was run. Only '
                            f'checkpoints written by these scripts load') from None
        except Exception as e:
            raise UserError(f'cannot read checkpoint {path} ({type(e).__name__}): it is damaged; '
                            f'start a fresh run') from None


class StopSignals:
    """SIGTERM (a cluster's preemption notice; torchrun stopping its workers), SIGUSR1 (SLURM's
    --signal warning) and SIGINT (Ctrl-C) ask the loop to stop after the current iteration: it then
    writes a checkpoint and exits with 128 + the signal number. A second Ctrl-C exits at once.

    Under DDP the ranks agree on the iteration (one tiny all_reduce per iteration). A rank whose peer
    died is stuck in a collective that never completes, where no Python handler runs; a watcher
    thread, woken by the signal through set_wakeup_fd, exits the process when the ranks have not
    agreed within GRACE_SECONDS (torchrun kills its workers 30 s after its SIGTERM). The last
    checkpoint stays whole either way."""

    GRACE_SECONDS = 20
    SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, name))

    def __init__(self, watch_peers):
        self.signum, self.agreed_on, self.previous = 0, None, {}
        if threading.current_thread() is not threading.main_thread():
            return   # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)
        if watch_peers:
            read_end, write_end = socket.socketpair()
            write_end.setblocking(False)
            self.previous['wakeup'] = signal.set_wakeup_fd(write_end.fileno(), warn_on_full_buffer=False)
            self.wakeup = (read_end, write_end)   # kept open for the life of the run
            threading.Thread(target=self.watch, args=(read_end,), daemon=True).start()

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            print('interrupted again: exiting now; the last checkpoint is kept whole', file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = self.signum or signum

    def watch(self, read_end):
        first = read_end.recv(1)[0]
        deadline = time.time() + self.GRACE_SECONDS
        while self.agreed_on is None and time.time() < deadline:
            time.sleep(0.1)
        if self.agreed_on is None:
            print(f'{signal.Signals(first).name}: the processes did not agree on a last iteration within '
                  f'{self.GRACE_SECONDS} s (a peer is gone?); exiting, the last checkpoint is kept whole',
                  file=sys.stderr, flush=True)
            os._exit(128 + first)

    def agreed(self, group=None):
        """The signal any rank received (0: none); under DDP every rank gets the same answer."""
        signum = self.signum
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([signum])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            signum = int(flag)
        if signum:
            self.agreed_on = signum
        return signum

    def restore(self):
        for sig, handler in self.previous.items():
            if sig == 'wakeup':
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(sig, handler)
        self.previous = {}


def write_generated(run, sample_each, n_classes=0, chunk=None):
    """--generate N: N samples of the run's mixture in RUN/generated/all/, and for several generators N
    of each in g<k>/ (the mixture interleaves these draws: equal shares), for a class-conditional run
    N of each class in class<c>/ (classes uniform in all/). uint8 PNGs 000000.png, ... at the trained
    size (grey or colour as trained); 2-D sets write all.npy and g<k>.npy. Drawn and written a batch
    at a time: sample_each(m, classes) -> (K, m, ...) in [-1, 1], classes (m,) labels or None, m at most
    `chunk` (default the batch size: train-mode batch norm then sees batches as in training)."""
    n, chunk = run.args.generate, chunk or run.args.batch_size
    root = os.path.join(run.out_dir, 'generated')
    shutil.rmtree(root, ignore_errors=True)     # an earlier --generate's files, not a mix of both
    os.makedirs(root)
    device = run.device
    plans = [('all', None)] + ([(f'class{c}', c) for c in range(n_classes)] if n_classes else [])
    points, counts = {}, {}

    def write(name, x):
        if x.dim() == 2:   # 2-D points
            points.setdefault(name, []).append(x.numpy())
        else:
            save_png_batch(os.path.join(root, name), x, counts.get(name, 0))
        counts[name] = counts.get(name, 0) + len(x)

    for folder, label in plans:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            if label is not None:
                classes = torch.full((m,), label, device=device)
            else:
                classes = torch.randint(n_classes, (m,), device=device) if n_classes else None
            with torch.no_grad():
                each = sample_each(m, classes).float().cpu()   # (K, m, ...)
            if folder != 'all' or len(each) == 1:
                write(folder, each[0])
                continue
            for k in range(len(each)):
                write(f'g{k}', each[k])
            # all/ item i is g<i mod K>'s item i // K: the first N of the interleaved streams
            mixed = each.transpose(0, 1).flatten(0, 1)
            write('all', mixed[:n - counts.get('all', 0)])
    for name, parts in points.items():
        np.save(os.path.join(root, f'{name}.npy'), np.concatenate(parts))
    print(f'wrote {", ".join(f"{c} to {name}" for name, c in counts.items())} under {root} '
          f'(from {os.path.basename(run.ckpt_file)}, iteration {run.start_iteration})', flush=True)
    return counts


def ensemble_sampler(generators, latent_dim, batch_size, device):
    """sample_each(n) -> (K, n, ...): n samples of each of K ensemble generators, each from its own
    noise, drawn in chunks of batch_size per generator (train-mode batch norm then sees batches of
    training size), without side effects. For the metrics, --generate and sample_generators."""
    def sample_each(n, classes=None):
        k = generators.n_gen
        with sampling(generators):
            return torch.cat([generators(torch.randn(k, batch_size, latent_dim, device=device))
                              for _ in range(-(-n // batch_size))], 1)[:, :n]
    return sample_each


def save_png_batch(folder, images, first):
    """images (B, C, H, W) in [-1, 1] -> folder/NNNNNN.png (uint8, grey or RGB), numbered from `first`."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    pixels = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(pixels):
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(
            os.path.join(folder, f'{first + i:06d}.png'))


def tracked_figure(metrics, fid_on):
    """(name, value) of the quality figure ckpt_best.pt follows, when `metrics` holds it: fid when FID
    runs, else fd_digits (digits), else kl_uniform (2-D and stacked sets). Lower is better for all."""
    for name in ('fid',) if fid_on else ('fd_digits', 'kl_uniform'):
        if name in metrics:
            return name, float(metrics[name])
    return None


class TrainingClock:
    """The CPU seconds a process spends training: its CPU time (every thread) since start(), less
    the time inside evaluating(). The quality figures cost every method the same per sample and
    more per generator, so a compute budget leaves them out. One per process (TRAINING_CLOCK):
    Run starts and reads it, Evaluator excludes itself from it."""

    def __init__(self):
        self.start()

    def start(self, seconds_before=0.0):
        self.before, self.started, self.excluded = seconds_before, time.process_time(), 0.0

    @contextlib.contextmanager
    def evaluating(self):
        began = time.process_time()
        try:
            yield
        finally:
            self.excluded += time.process_time() - began

    def seconds(self):
        return self.before + time.process_time() - self.started - self.excluded


TRAINING_CLOCK = TrainingClock()


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'


def metric_value(value):
    """A float from a loss or metric (tensor, number); the only place the loop syncs to the host."""
    if torch.is_tensor(value):
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value   # counts and indices stay ints
        return value.tolist() if value.dim() else value.item()
    return value


class Run:
    """Everything a training loop needs besides its nets: device, DDP, AMP, outputs, resume.

    One object, plain attributes: `device`, `rank`, `world_size`, `is_main`, `ddp`, `out_dir`,
    `fp16_scaling`; methods for each step of the loop, in the order the loop uses them.
    """

    def __init__(self, args, script):
        self.args, self.script = args, script
        self.ddp = 'RANK' in os.environ or args.ddp
        self.rank, self.world_size, local_rank = 0, 1, 0
        self.control_group = None   # a gloo group for host-side agreement (stop signals, best checkpoint)
        if self.ddp:
            use_cuda = args.device != 'cpu' and torch.cuda.is_available()
            if 'RANK' in os.environ:   # torchrun
                try:
                    init_torchrun_group('nccl' if use_cuda else 'gloo')
                except RuntimeError as e:  # e.g. a restarted group whose peer is not up (torchrun retries)
                    raise UserError(f'could not connect to the other processes of the job '
                                    f'({str(e).strip().splitlines()[0][:160]})') from None
            else:                      # --ddp alone: a one-process group, the DDP code path on one device
                dist.init_process_group('nccl' if use_cuda else 'gloo', store=dist.HashStore(), rank=0,
                                        world_size=1)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            local_rank = int(os.environ.get('LOCAL_RANK', 0))
            if use_cuda and 'RANK' in os.environ:
                self.control_group = dist.new_group(backend='gloo')
        self.is_main = self.rank == 0
        if args.generate and self.world_size > 1:
            raise UserError('--generate runs in one process: start it with python, not torchrun')
        self.device = resolve_device(args.device, local_rank, self.world_size)
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.seed_everything(args.seed + self.rank)  # each rank draws different noise

        # AMP: bare --amp is bf16 on the CPU and on GPUs that have it, else fp16 with a GradScaler.
        amp = {True: 'auto', False: None}.get(args.amp, args.amp)
        if amp == 'auto':
            amp = 'bf16' if self.device.type == 'cpu' or cuda_has_native_bf16() else 'fp16'
        self.amp_dtype = torch.float16 if amp == 'fp16' else torch.bfloat16
        self.fp16_scaling = amp == 'fp16'
        self.scalers = {}  # one GradScaler per optimizer (scaler_for), empty unless fp16

        if args.prdc and not args.fid_every:
            raise UserError('--prdc computes precision/recall/density/coverage with FID: pass --fid_every N too '
                            '(digits and 2-D runs get them offline without it)')
        if args.fid_every and not args.generate:  # refuse before a run folder is made, not after
            fid = import_fid()
            try:
                fid.check_weights(fid.resolve_weights(args.fid_weights))  # present and loadable
            except fid.FIDError as e:
                raise UserError(str(e).replace('--weights', '--fid_weights'))
        self.out_dir, self.resuming = choose_run_folder(args, script, self.is_main)
        self.checkpoints = CheckpointFiles(self.out_dir)
        self.ckpt_path = self.checkpoints.path() if self.out_dir else None
        self.ckpt_file = self.checkpoints.path(args.from_ckpt if args.generate else 'last') if self.out_dir else None
        if self.is_main and not args.generate:
            if not self.resuming and (not args.out_dir or not os.path.exists(args.out_dir)):
                FRESH_RUN_FOLDER[:] = [self.out_dir]
            os.makedirs(os.path.join(self.out_dir, 'samples'), exist_ok=True)
            if not self.resuming:
                with open(os.path.join(self.out_dir, 'args.json'), 'w') as f:
                    json.dump(vars(args), f, indent=2)
        self.stop = None   # StopSignals while the training loop runs (iterations)
        self.rows, self.last_losses, self.event_files, self.pending_events = [], {}, set(), {}
        self.objects, self.saved_at, self.start_iteration = {}, None, 0
        self.best = {}   # the tracked quality figure: {'metric', 'value', 'iteration'} once known
        self.start_time, self.wall_before = time.time(), 0.0
        self.tick, self.tick_iteration, self.tick_iteration_start = time.time(), 0, 0
        self.n_iters, self.per_epoch = 0, 1

    # ---- set-up -------------------------------------------------------------------------

    @staticmethod
    def seed_everything(seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def load_data(self, **overrides):
        """The data set named by the flags, on the training device."""
        a = self.args
        kwargs = dict(data_root=a.data_root, img_size=a.img_size, channels=a.channels, subset=a.subset)
        kwargs.update(overrides)
        data = load_data(a.dataset, **kwargs).to(self.device)
        data.flip = bool(getattr(a, 'flip', False))
        return data

    def batches(self, data):
        """The batch source, and the schedule: --n_iters, else --n_epochs full epochs."""
        batches = Batches(data, self.args.batch_size, self.args.seed, self.rank, self.world_size)
        self.per_epoch = batches.per_epoch
        self.n_iters = self.args.n_iters or self.args.n_epochs * batches.per_epoch
        return batches

    def prepare(self, model):
        """Move to the device; torch.compile and DDP-wrap as the flags say. Keep the plain
        module for checkpoints and sampling; train through the returned one."""
        model = model.to(self.device)
        if self.args.compile:
            model = torch.compile(model)
        if self.ddp:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=bool(self.args.amp))

    def step(self, loss, optimizer):
        """Backward and optimizer step, through the optimizer's GradScaler when fp16 needs one."""
        optimizer.zero_grad(set_to_none=True)
        if not self.fp16_scaling:
            loss.backward()
            optimizer.step()
            return
        scaler = self.scaler_for(optimizer)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def scaler_for(self, optimizer):
        """fp16's GradScaler for this optimizer. One per optimizer: nets whose gradients are
        rank-local (pmgan's generators) must not move the scale of nets whose gradients DDP
        averages, or ranks would scale the same averaged gradient differently and drift apart."""
        if id(optimizer) not in self.scalers:
            self.scalers[id(optimizer)] = torch.amp.GradScaler(self.device.type)
        return self.scalers[id(optimizer)]

    def all_reduce_mean(self, tensor):
        if self.ddp:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def due(self, iteration, interval):
        """True after iteration `iteration` (0-based) when `interval` divides the count, or at the end."""
        done = iteration + 1
        return done == self.n_iters or (interval > 0 and done % interval == 0)

    # ---- the loop and its checkpoints ----------------------------------------------------

    def iterations(self, start):
        """range(start, n_iters) for the training loop. After a SIGTERM, SIGUSR1 or SIGINT (under
        DDP: on any rank, agreed by all) it stops after the iteration in flight: a checkpoint, one line
        on how to continue, exit 128 + the signal number. The handlers are installed for the loop only."""
        self.stop = StopSignals(watch_peers=self.world_size > 1)
        try:
            for it in range(start, self.n_iters):
                yield it
                signum = self.stop.agreed(self.control_group)
                if signum:
                    if self.saved_at != it:
                        self.save_checkpoint(it)
                    if self.is_main:
                        print(f'{signal.Signals(signum).name}: stopped after iteration {it + 1} of {self.n_iters}; '
                              f'checkpoint {self.ckpt_path}. Continue with: python {self.script}.py --resume '
                              f'{self.out_dir}', file=sys.stderr, flush=True)
                    self.close()
                    sys.exit(128 + signum)
        finally:
            self.stop.restore()

    def save_checkpoint(self, iteration, which='last', **objects):
        """Atomically write the objects (by default those given to resume: nets, optimizers, ...), their
        GradScalers, every rank's RNG state and the iteration to ckpt.pt (or ckpt_best.pt). Every rank
        calls it; objects with a collect() (a view of rank-local state) gather it first."""
        objects = objects or self.objects
        for obj in objects.values():
            if hasattr(obj, 'collect'):
                obj.collect()
        rngs = [None] * self.world_size
        if self.ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if which == 'last':
            self.saved_at = iteration
        if not self.is_main:
            return
        self.check_finite(iteration, nets=objects)  # never overwrite a good checkpoint with NaN
        state = {name: unwrap(obj).state_dict() for name, obj in objects.items()}
        scalers = {name: self.scalers[id(checkpointed(obj))].state_dict() for name, obj in objects.items()
                   if id(checkpointed(obj)) in self.scalers}
        state.update(iteration=iteration + 1, scalers=scalers, rng=rngs, best=self.checkpoints.best,
                     wall_seconds=self.wall_seconds(), cpu_seconds=TRAINING_CLOCK.seconds(),
                     world_size=self.world_size)
        self.checkpoints.write(state, which)
        if which == 'last':
            self.flush_events()

    def resume(self, **objects):
        """Name the objects a checkpoint holds (nets, optimizers, ...; save_checkpoint, a stop signal and
        ckpt_best.pt write these) and, when resuming or generating, load them from the run's checkpoint.
        Returns the first iteration to run; called just before the loop, it also starts the it/s clock."""
        self.objects = objects
        self.tick = time.time()
        TRAINING_CLOCK.start()
        if not self.resuming:
            return 0
        state = self.checkpoints.read(self.args.from_ckpt if self.args.generate else 'last')
        if state['iteration'] >= self.n_iters and not self.args.generate:
            if self.args.resume == 'auto':   # a job script started again after the run ended
                if self.is_main:
                    print(f'{self.out_dir} is complete ({state["iteration"]} iterations): nothing to do', flush=True)
                self.close()
                sys.exit(0)
            raise UserError(f'--resume {self.args.resume}: the run already has {state["iteration"]} iterations; '
                            f'pass a larger --n_iters (or --n_epochs) to extend it')
        for name, obj in objects.items():
            if name not in state:
                raise UserError(f'checkpoint {self.ckpt_file} has no {name!r}: it was written by '
                                f'another script or version')
            try:
                unwrap(obj).load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as e:   # other sizes: other flags
                raise UserError(f'checkpoint {self.ckpt_file}: its {name!r} does not fit this run '
                                f'({str(e).splitlines()[0][:120]}); resume with the flags in args.json')
        self.start_iteration = state['iteration']
        if self.args.generate:   # sampling only: the seed's RNG, no clocks, no rows
            return state['iteration']
        for name, scaler_state in state.get('scalers', {}).items():
            if self.fp16_scaling and name in objects:
                self.scaler_for(checkpointed(objects[name])).load_state_dict(scaler_state)
        if state['world_size'] == self.world_size:
            set_rng_state(state['rng'][self.rank])
        else:
            self.seed_everything(self.args.seed + self.rank + 7919 * state['iteration'])
        self.checkpoints.best = state.get('best') or {}
        self.wall_before = state['wall_seconds']
        TRAINING_CLOCK.start(state.get('cpu_seconds', 0.0))
        self.rows = [r for r in self.read_rows() if int(r['iteration']) <= state['iteration']]
        self.tick_iteration = self.tick_iteration_start = state['iteration']
        return state['iteration']

    def from_rank0(self, value):
        """Rank 0's float, on every rank (one host-side broadcast under DDP)."""
        if not self.ddp:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0, group=self.control_group)
        return float(t)

    def close(self):
        """Signal handlers back as they were, DDP torn down: the end of a run, or a stop."""
        FRESH_RUN_FOLDER.clear()  # it holds results now
        if self.stop:
            self.stop.restore()
        if self.ddp and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ---- logging and outputs --------------------------------------------------------------

    def wall_seconds(self):
        return self.wall_before + time.time() - self.start_time

    def write_events(self, name, rows):
        """Rows for <run folder>/<name> (dicts with an 'iteration'; tensors allowed, one column per
        element), for what happens more often than a log line (e.g. every auction). Kept in memory
        (no host sync per event) and appended at every log line, checkpoint and stop."""
        if self.is_main and rows:
            self.pending_events.setdefault(name, []).extend(rows)

    def flush_events(self):
        """Append the pending event rows; the first write of a resumed run first drops the file's
        rows past the checkpoint (they are redone now)."""
        for name, rows in self.pending_events.items():
            path = os.path.join(self.out_dir, name)
            flat = []
            for row in rows:
                out = {}
                for key, value in row.items():
                    value = metric_value(value)
                    columns = enumerate(value) if isinstance(value, list) else [(None, value)]
                    out.update({key if i is None else f'{key}_{i}': v for i, v in columns})
                flat.append(out)
            if name not in self.event_files:
                self.event_files.add(name)
                kept = []
                if self.resuming and os.path.exists(path):
                    with open(path) as f:
                        kept = [r for r in csv.DictReader(f) if int(r['iteration']) <= self.tick_iteration_start]
                with open(path, 'w', newline='') as f:
                    writer = csv.DictWriter(f, list(flat[0]))
                    writer.writeheader()
                    writer.writerows(kept)
            with open(path, 'a', newline='') as f:
                csv.DictWriter(f, list(flat[0])).writerows(flat)
        self.pending_events = {}

    def read_rows(self):
        path = os.path.join(self.out_dir, 'metrics.csv')
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return list(csv.DictReader(f))

    def write_rows(self):
        columns = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        tmp = os.path.join(self.out_dir, 'metrics.csv.tmp')
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, os.path.join(self.out_dir, 'metrics.csv'))

    def check_finite(self, iteration, nets=None):
        """Stop with one line when a logged loss, or a weight of `nets`, is NaN/inf."""
        bad = [f'{k} loss' for k, v in self.last_losses.items() if not np.all(np.isfinite(v))]
        modules = {name: unwrap(checkpointed(net)) for name, net in (nets or {}).items()}  # views too
        bad += [f'{name} weights' for name, net in modules.items() if isinstance(net, nn.Module)
                and not all(torch.isfinite(p).all() for p in net.parameters())]
        if bad:
            kept = (f'the last good checkpoint is {self.ckpt_path}' if os.path.exists(self.ckpt_path or '')
                    else 'no checkpoint was written yet')
            raise UserError(f'{", ".join(bad)} became NaN/inf by iteration {iteration + 1}; {kept}. '
                            f'Try a lower --lr, or run without --amp')

    def log(self, iteration, losses, metrics=None):
        """One log line and one metrics.csv row. Losses may be tensors (one per generator too)."""
        losses = {k: metric_value(v) for k, v in losses.items()}
        metrics = {k: metric_value(v) for k, v in (metrics or {}).items()}
        self.last_losses = losses
        done = iteration + 1
        now = time.time()
        speed = (done - self.tick_iteration) / max(now - self.tick, 1e-9)
        self.tick, self.tick_iteration = now, done
        figure = tracked_figure(metrics, self.args.fid_every)
        if figure and self.checkpoints.improves(figure[0], self.from_rank0(figure[1]), done):
            self.save_checkpoint(iteration, which='best')   # every rank: it may gather state
        if not self.is_main:
            self.check_finite(iteration)
            return
        row = {'iteration': done, 'epoch': iteration // self.per_epoch + 1,
               'wall_seconds': round(self.wall_seconds(), 3),
               'cpu_seconds': round(TRAINING_CLOCK.seconds(), 3)}
        for name, value in list(losses.items()) + list(metrics.items()):
            if isinstance(value, list):
                row.update({f'{name}_{i}': v for i, v in enumerate(value)})
            else:
                row[name] = value
        self.rows.append(row)
        self.write_rows()
        n_epochs = math.ceil(self.n_iters / self.per_epoch)
        parts = [f'[Epoch {iteration // self.per_epoch + 1}/{n_epochs}]',
                 f'[Batch {iteration % self.per_epoch + 1}/{self.per_epoch}]']
        for name, value in losses.items():
            values = value if isinstance(value, list) else [value]
            parts.append(f'[{name} loss: {" ".join(f"{v:.4f}" for v in values)}]')
        for name, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            parts.append(f'[{"FID" if name == "fid" else name}: {" ".join(f"{v:.4g}" for v in values)}]')
        parts.append(f'[{speed:.1f} it/s]')
        parts.append(f'[ETA {format_eta((self.n_iters - done) / max(speed, 1e-9))}]')
        print(' '.join(parts), flush=True)
        self.flush_events()
        self.check_finite(iteration)

    def save_samples(self, iteration, samples, data=None):
        """A sample grid: samples (K, B, C, H, W), one row per generator (or per class), or a
        scatter plot over the real modes for 2-D samples (K, B, 2), one colour per generator."""
        if not self.is_main:
            return
        path = os.path.join(self.out_dir, 'samples', f'iter_{iteration + 1:06d}.png')
        save_sample_grid(path, samples, data)
        return path

    def finish(self, iteration, metrics=None):
        """summary.json, metrics.png and the closing line; tears DDP down."""
        summary = {'iterations': iteration + 1, 'wall_seconds': round(self.wall_seconds(), 2),
                   'cpu_seconds': round(TRAINING_CLOCK.seconds(), 2)}
        summary.update({f'final_{k}': v for k, v in self.last_losses.items()})
        summary.update({k: metric_value(v) for k, v in (metrics or {}).items()})
        if self.checkpoints.best:   # the state kept in ckpt_best.pt
            summary.update({f'best_{self.checkpoints.best["metric"]}': self.checkpoints.best['value'],
                            'best_iteration': self.checkpoints.best['iteration']})
        if self.is_main:
            self.flush_events()
            with open(os.path.join(self.out_dir, 'summary.json'), 'w') as f:
                json.dump(summary, f, indent=2)
            plot_metrics(os.path.join(self.out_dir, 'metrics.csv'), os.path.join(self.out_dir, 'metrics.png'))
            print(f'done: {self.out_dir} ' + ' '.join(f'{k}={fmt(v)}' for k, v in summary.items()), flush=True)
        self.close()
        return summary


def fmt(value):
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, list):
        return ','.join(fmt(v) for v in value)
    return str(value)


@contextlib.contextmanager
def sampling(model):
    """Sample from a net in train mode (batch-norm statistics of the batch, as in training)
    without side effects: no autograd, and batch-norm running statistics restored after."""
    saved = [b.clone() for b in model.buffers()]
    try:
        with torch.no_grad():
            yield model
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def save_sample_grid(path, samples, data=None):
    samples = samples.detach().float().cpu()
    if samples.shape[-1] == 2 and samples.dim() == 3:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 5))
        for k, pts in enumerate(samples):
            ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.5, label=f'G{k}' if len(samples) > 1 else 'G')
        if data is not None and data.centres is not None:
            c = data.centres.cpu()
            ax.scatter(c[:, 0], c[:, 1], marker='x', c='k', s=40, label='modes')
        ax.set_aspect('equal')
        if len(samples) <= 10:
            ax.legend(loc='upper right', fontsize=7, markerscale=3)
        fig.savefig(path, dpi=100, bbox_inches='tight')
        plt.close(fig)
        return
    from torchvision.utils import save_image
    per_row = samples.shape[1]
    if samples.shape[-1] < 32:  # small images: enlarge (nearest) so the grid can be seen
        samples = samples.repeat_interleave(32 // samples.shape[-1], -1).repeat_interleave(32 // samples.shape[-1], -2)
    save_image(samples.flatten(0, 1), path, nrow=per_row, normalize=True, value_range=(-1, 1), pad_value=1)


CLOCK_COLUMNS = ('iteration', 'epoch', 'wall_seconds', 'cpu_seconds')   # metrics.csv's columns that are no figure


def plot_metrics(csv_paths, png_path, labels=None):
    """Plot every column of one or more metrics.csv files against iteration, one panel each."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    csv_paths = [csv_paths] if isinstance(csv_paths, str) else list(csv_paths)
    tables = []
    for path in csv_paths:
        if os.path.exists(path):
            with open(path) as f:
                tables.append(list(csv.DictReader(f)))
    columns = []
    for rows in tables:
        for row in rows:
            columns += [c for c in row if c not in columns and c not in CLOCK_COLUMNS]
    if not columns:
        return
    groups = {}  # G_0, G_1, ... share a panel
    for c in columns:
        groups.setdefault(c.rsplit('_', 1)[0] if c.rsplit('_', 1)[-1].isdigit() else c, []).append(c)
    n = len(groups)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.5 * cols, 3 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, (group, members) in zip(axes.flat, groups.items()):
        for t, rows in enumerate(tables):
            for c in members:
                pts = [(float(r['iteration']), float(r[c])) for r in rows if r.get(c) not in (None, '')]
                if pts:
                    label = (labels[t] + ' ' if labels else '') + (c if len(members) > 1 else '')
                    ax.plot(*zip(*pts), label=label.strip() or None, lw=1, marker='o' if len(pts) < 3 else None)
        ax.set_title(group)
        ax.set_xlabel('iteration')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------
# 5. Metrics
# ----------------------------------------------------------------------------

def mode_counts_2d(samples, centres, std):
    """High-quality samples per mode (a sample is high quality within 3 std of its nearest centre,
    and counts for that centre) and the high-quality fraction."""
    samples, centres = samples.float().cpu(), centres.float().cpu()
    dist_, nearest = torch.cdist(samples, centres).min(1)
    hq = dist_ < 3 * std
    return torch.bincount(nearest[hq], minlength=len(centres)).double(), float(hq.float().mean())


def coverage_figures(counts):
    """modes_covered (modes with at least one sample) and KL(histogram over modes || uniform)."""
    n_modes = len(counts)
    if counts.sum() == 0:
        kl = math.log(n_modes)
    else:
        p = counts / counts.sum()
        kl = float((p[p > 0] * (p[p > 0] * n_modes).log()).sum())
    return {'modes_covered': int((counts > 0).sum()), 'kl_uniform': kl}


def mode_coverage_2d(samples, centres, std):
    """A sample is high quality within 3 std of its nearest centre; a mode is covered when some
    high-quality sample is nearest to it; KL(histogram of HQ samples over modes || uniform)."""
    counts, hq_fraction = mode_counts_2d(samples, centres, std)
    return {**coverage_figures(counts), 'hq_fraction': hq_fraction}


def overlap_figures(covered):
    """For each pair of generators, the fraction of the modes covered by either that both cover
    (intersection over union of their covered sets, 0 when neither covers any): the mean and the
    maximum over pairs. 1: the generators cover the same modes; 0: they split them."""
    covered = torch.stack([c.bool() for c in covered])
    pairs = [(i, j) for i in range(len(covered)) for j in range(i + 1, len(covered))]
    ious = [float((covered[i] & covered[j]).sum() / max(int((covered[i] | covered[j]).sum()), 1))
            for i, j in pairs]
    return {'overlap_mean': float(np.mean(ious)), 'overlap_max': max(ious)}


class DigitClassifier(nn.Module):
    """Small CNN on 16x16 grey digits; its 128-d penultimate layer gives fd_digits features."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    @staticmethod
    def prepare(images):
        """Float images in [-1, 1], (N, 1, H, W) of any size -> 16x16."""
        return F.interpolate(images.float(), size=(16, 16), mode='bilinear', antialias=True, align_corners=False)

    def features(self, images):
        return self.body(self.prepare(images))

    def forward(self, images):
        return self.head(self.features(images))


def digit_classifier(base, data_root, device, epochs=30, verbose=True):
    """The classifier for `base` ('digits' or 'mnist'), trained once on its labels and cached
    as <data_root>/digit_classifier_<base>.pt (under DDP by rank 0; the others then load it).
    Leaves the global RNG as it found it."""
    with rank_zero_first(), torch.random.fork_rng():
        return train_or_load_digit_classifier(base, data_root, device, epochs, verbose)


def train_or_load_digit_classifier(base, data_root, device, epochs, verbose):
    path = os.path.join(data_root, f'digit_classifier_{base}.pt')
    torch.manual_seed(0)
    net = DigitClassifier()
    if os.path.exists(path):
        net.load_state_dict(torch.load(path, map_location='cpu'))
        return net.to(device).eval()
    images, labels = load_digits() if base == 'digits' else load_torchvision('mnist', data_root)
    x = images.float().div(127.5).sub(1)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    n_test = len(x) // 10
    test, train = order[:n_test], order[n_test:]
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs if base == 'digits' else 2):
        for idx in train[torch.randperm(len(train), generator=g)].split(128):
            batch = DigitClassifier.prepare(x[idx])
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # small shifts: robustness
            batch = torch.roll(batch, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net.head(net.body(batch)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[test]).argmax(1) == labels[test]).float().mean().item()
    if verbose:
        print(f'trained the {base} digit classifier: held-out accuracy {accuracy:.3f}; cached in {path}')
    os.makedirs(data_root, exist_ok=True)
    torch.save(net.state_dict(), path + '.tmp')
    os.replace(path + '.tmp', path)
    return net.to(device)


def feature_statistics(features):
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def gaussian_frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, for fd_digits. The trace of the root
    is the sum of the roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD: eigh, no
    sqrtm). Kept here so that a script copied with common.py alone runs; fid.py has the same
    distance with pytorch-fid's edge-case rules, for FID."""
    w, v = np.linalg.eigh(np.asarray(sigma1, np.float64))
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    inner = np.linalg.eigvalsh(root @ np.asarray(sigma2, np.float64) @ root).clip(min=0)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(inner).sum())


class Evaluator:
    """The offline quality figures of a data set, computed from a sampler.

    `evaluate(sample_fn)`: sample_fn(n) gives n samples in [-1, 1] (or 2-D points), or for a
    class-conditional generator (samples, the classes they were asked to show).
    2-D: modes_covered, hq_fraction, kl_uniform. digits: fd_digits (+ class_accuracy).
    stacked sets: modes_covered (of 1000), kl_uniform. Other image sets: nothing offline.
    """

    def __init__(self, data, args, device, n_gen=1):
        self.data, self.device, self.n, self.seed = data, device, args.eval_samples, args.seed
        self.n_gen = n_gen   # generators behind the sample_each of due(): their figures come apart too
        self.eval_interval, self.fid_every = args.eval_interval, args.fid_every
        self.classifier, self.fid_tracker = None, None
        if args.generate:   # --generate computes no metrics: no classifier to train, no FID statistics
            return
        if args.fid_every:
            self.fid_tracker = make_fid_tracker(data, args, device)
        base = {'digits': 'digits', 'stacked-digits': 'digits', 'stacked-mnist': 'mnist'}.get(data.name)
        if base and not data.is_2d:
            self.classifier = digit_classifier(base, args.data_root, device)
        if data.name == 'digits':
            with torch.no_grad():
                real = data.batch(slice(None), augment=False)[0]
                self.real_features = self.classifier.features(self.grey(real))
                self.real_stats = feature_statistics(self.real_features)

    @staticmethod
    def grey(images):
        return images.mean(1, keepdim=True) if images.shape[1] == 3 else images

    def sample_count(self):
        if self.n:
            return self.n
        return 2500 if self.data.is_2d else 2000 if self.data.name == 'digits' else 26000

    def fixed_rng(self):
        """Every evaluation draws the same noise, and the training RNG does not move. Under DDP
        each rank draws different noise (rank 0 the same as one process), so FID's shards are
        different samples, not copies."""
        devices = [self.device.index or 0] if self.device.type == 'cuda' else []
        stack = contextlib.ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=devices))
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        torch.manual_seed(self.seed + 4242 + 7919 * rank)
        return stack

    def fid(self, sample_fn):
        """{'fid': ...} every --fid_every iterations; {} when FID is off. Under DDP fid.py keeps
        each rank's draws as that rank's share: sample_fn must give each rank different samples."""
        if self.fid_tracker is None:
            return {}
        with self.fixed_rng():
            return self.fid_tracker.scores(sample_fn)   # fid, and the four of --prdc

    def due(self, iteration, n_iters, sample_fn=None, fid_sample_fn=None, sample_each=None):
        """The metrics due after `iteration`: the offline ones every --eval_interval, FID every
        --fid_every (from fid_sample_fn when given, else the mixture), both at the last iteration;
        {} when none is due. Multi-generator scripts pass sample_each(n) -> (K, n, ...), n samples of
        every generator: the mixture's figures come with each generator's and their overlap."""
        if sample_fn is None:
            sample_fn = lambda n: mixture(sample_each(-(-n // self.n_gen)), n)
        done, last = iteration + 1, iteration + 1 == n_iters
        out = {}
        with TRAINING_CLOCK.evaluating():   # not counted in the run's cpu_seconds
            if last or (self.eval_interval and done % self.eval_interval == 0):
                out.update(self.evaluate(sample_fn, sample_each))
            if self.fid_tracker is not None and (last or done % self.fid_every == 0):
                out.update(self.fid(fid_sample_fn or sample_fn))
        return out

    def evaluate(self, sample_fn, sample_each=None):
        with self.fixed_rng():
            if sample_each is None:
                return self.offline_metrics(sample_fn)
            return self.per_generator_metrics(sample_each)

    def offline_metrics(self, sample_fn):
        """sample_fn(n) returns n samples, or (samples, the classes they were asked to show)."""
        if self.classifier is None and not self.data.is_2d:
            return {}
        samples = sample_fn(self.sample_count())
        samples, labels = samples if isinstance(samples, tuple) else (samples, None)
        return self.figures(samples, labels)[0]

    def per_generator_metrics(self, sample_each):
        """The figures of the mixture (n samples pooled from the K generators, n / K each), of each
        generator (<figure>_<k>, on its n / K) and the overlap of the generators' modes."""
        if self.classifier is None and not self.data.is_2d:
            return {}
        n, k = self.sample_count(), self.n_gen
        each = sample_each(-(-n // k))
        out, _ = self.figures(mixture(each, n))
        covered = []
        for member in range(k):
            figures, modes = self.figures(each[member])
            out.update({f'{name}_{member}': value for name, value in figures.items()})
            covered.append(modes)
        if k > 1:
            out.update(overlap_figures(covered))
        return out

    def figures(self, samples, labels=None):
        """(quality figures, the modes the samples cover) for one set of samples. Modes: the 2-D
        set's Gaussians, the stacked triples, the digit classes (a class counts when it holds at
        least 5% of the samples)."""
        if self.data.is_2d:
            counts, hq_fraction = mode_counts_2d(samples, self.data.centres, self.data.std)
            out = {**coverage_figures(counts), 'hq_fraction': hq_fraction}
            out.update(self.prdc(self.real_points(), samples.float(), '2d'))
            return out, counts > 0
        with torch.no_grad():
            if self.data.name == 'digits':
                feats = torch.cat([self.classifier.features(self.grey(b)) for b in samples.split(500)])
                out = {'fd_digits': gaussian_frechet_distance(*self.real_stats, *feature_statistics(feats))}
                predicted = self.classifier.head(feats.to(self.device)).argmax(1).cpu()
                if labels is not None:
                    out['class_accuracy'] = float((predicted == labels.cpu()).float().mean())
                out.update(self.prdc(self.real_features, feats, 'digits'))
                return out, torch.bincount(predicted, minlength=10) >= 0.05 * len(predicted)
            digits = torch.stack([torch.cat([self.classifier(b[:, c:c + 1]).argmax(1) for b in samples.split(500)])
                                  for c in range(3)], 1)
        counts = stacked_mode_counts(digits)
        return coverage_figures(counts), counts > 0

    def real_points(self):
        """As many real 2-D points as the evaluation draws fakes, the same ones every time."""
        return self.data.x[:self.sample_count()].float()

    def prdc(self, real, fake, suffix):
        """precision_<suffix>, recall_, density_, coverage_ (fid.prdc, k = 5) of fake against real
        features; {} without fid.py (a copied script) or with too few samples."""
        fid = optional_fid()
        if fid is None or len(fake) <= PRDC_K or len(real) <= PRDC_K:
            return {}
        figures = fid.prdc(real, fake, nearest_k=PRDC_K, distributed=False)
        return {f'{name}_{suffix}': value for name, value in figures.items()}


PRDC_K = 5   # nearest neighbours for precision, recall, density and coverage (Naeem et al., 2020)


def mixture(each, n):
    """n samples of the uniform mixture from (K, m, ...) draws of K generators: interleaved, equal
    shares (the first n of g0[0], g1[0], ..., g0[1], ...)."""
    return each.transpose(0, 1).flatten(0, 1)[:n]


def optional_fid():
    """fid.py when it sits beside the script, else None (noted once): the sample-based metrics
    (precision, recall, density, coverage) need it, a script copied with common.py alone runs without."""
    global FID_MISSING_NOTED
    try:
        import fid
        return fid
    except ImportError:
        if not FID_MISSING_NOTED:
            print('note: precision/recall/density/coverage need fid.py beside this script; skipped', flush=True)
            FID_MISSING_NOTED = True
        return None


FID_MISSING_NOTED = False


def import_fid():
    try:
        import fid
    except ImportError:
        raise UserError('--fid_every needs fid.py: copy it from the project next to this script') from None
    return fid


def make_fid_tracker(data, args, device):
    """fid.py's tracker against cached real statistics; fails at start-up when weights are missing."""
    if data.is_2d:
        raise UserError(f'--fid_every needs an image data set; {data.name} is 2-D')
    fid = import_fid()
    key = f'{data.name}{f"-first{args.subset}" if args.subset else ""}-{data.shape[-1]}px-{data.shape[0]}ch'
    try:
        return fid.FIDTracker(data.x, key=key, device=device,   # uint8: never flipped, converted per batch
                              n_samples=args.fid_samples, batch_size=max(args.batch_size, 50),
                              cache_dir=args.data_root, weights=args.fid_weights, prdc=args.prdc)
    except fid.FIDError as e:  # fid.py's CLI flag is --weights; the scripts' is --fid_weights
        raise UserError(str(e).replace('--weights', '--fid_weights'))


def sample_generators(generators, n, latent_dim, batch_size, device):
    """n samples from the uniform mixture of K ensemble generators (K, B, latent) -> (K, B, ...)."""
    each = ensemble_sampler(generators, latent_dim, batch_size, device)(-(-n // generators.n_gen))
    return mixture(each, n)


def stacked_mode_counts(digit_triples):
    """Samples per stacked mode (of 1000) from (N, 3) classified digits."""
    modes = digit_triples[:, 0] * 100 + digit_triples[:, 1] * 10 + digit_triples[:, 2]
    return torch.bincount(modes.cpu(), minlength=1000).double()


def stacked_modes(digit_triples):
    """Distinct modes (of 1000) and KL(mode histogram || uniform) from (N, 3) classified digits."""
    return coverage_figures(stacked_mode_counts(digit_triples))
