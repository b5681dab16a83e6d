"""Image folders decoded once into a memory-mapped cache (common.folder_cache): the same pixels
as decoding in memory, rebuilt when the folder changes, opened without decoding, batches
gathered from the map equal to the in-memory ones (resume, torchrun), one-line errors, no
half-written cache, and fid.py reading the cache when it holds what fid.py would decode."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import REPO, assert_one_line_error, load_script, run_main, run_script, run_torchrun_dumping_ranks
import common

pytestmark = pytest.mark.filterwarnings('ignore:.*samples for 64-d features')   # fid.py on 6 images


def write_folder(root, n=24, seed=0):
    """JPEG and PNG images of varied sizes, colour and grey, one palette PNG, one camera JPEG
    with an EXIF rotation, some in a subfolder, and a file that is not an image."""
    rng = np.random.default_rng(seed)
    (root / 'sub').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(9, 48, 2))
        grey = i % 4 == 1
        pixels = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
        path = root / ('sub' if i % 3 == 0 else '') / f'img{i:03d}.{"png" if i % 2 else "jpg"}'
        if i == 5:
            img = img.convert('P')
        if i == 6:
            exif = img.getexif()
            exif[0x0112] = 6
            img.save(path, exif=exif, quality=90)
            continue
        img.save(path, quality=90)
    (root / 'notes.txt').write_text('not an image')
    return root


def todays_decoding(root, img_size, channels, subset=0):
    """load_folder before the cache: every image decoded in this process into one tensor."""
    paths = sorted(p for p in glob.glob(os.path.join(root, '**', '*'), recursive=True)
                   if p.lower().endswith(common.IMAGE_EXTENSIONS))
    paths = paths[:subset] if subset else paths
    mode = 'L' if channels == 1 else 'RGB'
    images = []
    for path in paths:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert(mode)
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            im = im.resize((img_size, img_size), Image.Resampling.BICUBIC)
            images.append(np.asarray(im, dtype=np.uint8).reshape(img_size, img_size, -1))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def cache_files(root):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, '.decoded', '*')))


def count_decodes(monkeypatch):
    """The paths decode_image is called with, from here on (decoding in this process)."""
    monkeypatch.setenv(common.DECODE_WORKERS_ENV, '1')
    calls = []
    decode = common.decode_image

    def counting(path, *args):
        calls.append(path)
        return decode(path, *args)
    monkeypatch.setattr(common, 'decode_image', counting)
    return calls


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / 'images')


@pytest.fixture(autouse=True)
def default_limits(monkeypatch):
    for name in (common.IN_MEMORY_ENV, common.CACHE_DIR_ENV, common.DECODE_WORKERS_ENV):
        monkeypatch.delenv(name, raising=False)


# ---- the cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize('channels, workers', [(None, 2), (1, 1), (3, 2)])
def test_cache_equals_todays_decoding_bit_for_bit(folder, channels, workers):
    data = common.load_data('folder', data_root=str(folder), img_size=16, channels=channels,
                            decode_workers=workers)
    want = todays_decoding(folder, 16, channels)
    assert data.mapped and data.x.dtype == torch.uint8 and data.x.shape == want.shape
    assert torch.equal(data.x, want)
    assert torch.equal(data.to('cpu').x, want)                           # copied into memory
    subset = common.load_data('folder', data_root=str(folder), img_size=16, channels=channels, subset=7)
    assert torch.equal(subset.x, want[:7])                               # the cache's first rows
    mode = 'grey' if channels == 1 else 'rgb'
    meta = json.loads((folder / '.decoded' / f'16px-{mode}.json').read_text())
    assert meta['shape'] == list(want.shape) and meta['files'][0] == 'img001.png'
    assert len(meta['files']) == len(meta['bytes']) == len(meta['mtime_ns']) == 24
    assert not meta['as_is']                                              # resized: not what fid.py reads


def test_second_load_opens_the_map_without_decoding(folder, monkeypatch):
    first = common.load_data('folder', data_root=str(folder), img_size=16, decode_workers=2)

    def no_decoding(*args):
        raise AssertionError('decoded again')
    monkeypatch.setattr(common, 'decode_image', no_decoding)
    t = time.perf_counter()
    again = common.load_data('folder', data_root=str(folder), img_size=16)
    assert time.perf_counter() - t < 1.0
    subset = common.load_data('folder', data_root=str(folder), img_size=16, subset=5)  # no -first5 cache
    assert torch.equal(again.x, first.x) and torch.equal(subset.x, first.x[:5])
    array = json.loads((folder / '.decoded' / '16px-rgb.json').read_text())['array']
    assert cache_files(folder) == ['16px-rgb.json', array]
    with open('/proc/self/maps') as f:                                     # x lies in a map of the file
        maps = [line.split() for line in f if line.rstrip().endswith(array)]
    ptr = again.x.data_ptr()
    assert any(int(m[0].split('-')[0], 16) <= ptr < int(m[0].split('-')[1], 16) for m in maps)


def test_a_changed_folder_is_decoded_again(folder, monkeypatch):
    common.load_data('folder', data_root=str(folder), img_size=16)
    calls = count_decodes(monkeypatch)
    Image.new('RGB', (20, 30), (200, 10, 10)).save(folder / 'sub' / 'added.png')   # a file added
    data = common.load_data('folder', data_root=str(folder), img_size=16)
    assert len(calls) == 25 and len(data) == 25
    assert torch.equal(data.x, todays_decoding(folder, 16, None))
    assert len([f for f in cache_files(folder) if f.endswith('.npy')]) == 1   # the old array is gone

    calls.clear()
    path = folder / 'img001.png'                                           # same bytes, newer mtime
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    common.load_data('folder', data_root=str(folder), img_size=16)
    assert len(calls) == 25

    calls.clear()
    Image.new('L', (12, 12), 7).save(folder / 'img001.png')                 # rewritten: another size
    data = common.load_data('folder', data_root=str(folder), img_size=16)
    assert len(calls) == 25 and torch.equal(data.x, todays_decoding(folder, 16, None))

    calls.clear()
    common.load_data('folder', data_root=str(folder), img_size=16)
    common.load_data('folder', data_root=str(folder), img_size=8)           # another size: its own cache
    assert len(calls) == 25 and '8px-rgb.json' in cache_files(folder)


def test_subset_of_an_uncached_folder_decodes_only_its_images(folder, monkeypatch):
    calls = count_decodes(monkeypatch)
    (folder / 'zz_broken.png').write_bytes(b'not an image')                # after the subset: never read
    data = common.load_data('folder', data_root=str(folder), img_size=16, subset=4)
    assert len(calls) == 4 and torch.equal(data.x, todays_decoding(folder, 16, None, subset=4))
    assert '16px-rgb-first4.json' in cache_files(folder)


def test_cache_dir_elsewhere(folder, tmp_path, monkeypatch):
    monkeypatch.setenv(common.CACHE_DIR_ENV, str(tmp_path / 'caches'))
    data = common.load_data('folder', data_root=str(folder), img_size=16)
    assert not (folder / '.decoded').exists()
    [cache] = os.listdir(tmp_path / 'caches')
    assert cache.startswith('images-') and os.path.exists(tmp_path / 'caches' / cache / '16px-rgb.json')
    assert torch.equal(data.x, todays_decoding(folder, 16, None))


# ---- batches from the memory map ---------------------------------------------------------------

def test_batches_from_the_map_equal_the_in_memory_ones(folder, monkeypatch):
    data = common.load_data('folder', data_root=str(folder), img_size=16)
    in_memory = data.to('cpu')
    monkeypatch.setenv(common.IN_MEMORY_ENV, '1K')
    mapped = data.to('cpu')
    assert not in_memory.streamed and not in_memory.mapped and mapped.streamed
    assert mapped.x.data_ptr() == data.x.data_ptr()                        # no copy of the set
    for flip in (False, True):
        in_memory.flip = mapped.flip = flip
        for rank in (0, 1):
            a, b = (common.Batches(d, 5, seed=3, rank=rank, world_size=2) for d in (in_memory, mapped))
            for it in (0, 1, 2, 5, 2, 9):                                  # across epochs, and back
                torch.manual_seed(it)
                x, _ = a.get(it)
                torch.manual_seed(it)
                y, _ = b.get(it)
                assert torch.equal(x, y) and x.dtype == torch.float32
    index = torch.randint(len(data), (7,))
    assert torch.equal(in_memory.batch(index, augment=False)[0], mapped.batch(index, augment=False)[0])
    monkeypatch.setenv(common.IN_MEMORY_ENV, '1G')
    assert not data.to('cpu').streamed
    assert common.in_memory_limit(torch.device('cpu'))[0] == 2**30
    monkeypatch.delenv(common.IN_MEMORY_ENV)
    limit, why = common.in_memory_limit(torch.device('cpu'))
    assert limit == common.host_memory() // 4 and 'quarter' in why


TINY = ['--dataset', 'folder', '--img_size', '16', '--ngf', '4', '--ndf', '4', '--latent_dim', '8',
        '--batch_size', '4', '--sample_interval', '0', '--log_interval', '1']


def same_checkpoints(a, b):
    a, b = (torch.load(p, weights_only=False) for p in (a, b))
    assert a['iteration'] == b['iteration']
    for net in ('generator', 'discriminator'):
        for key, value in a[net].items():
            assert torch.equal(value, b[net][key]), (net, key)


def test_resume_on_the_mapped_path_and_equal_to_in_memory(folder, tmp_path, monkeypatch):
    """g_advantage_dcgan with --flip: 24 images, 6 batches an epoch, resumed at 4 of 9."""
    script = load_script('g_advantage_dcgan')
    args = TINY + ['--data_root', folder, '--flip']
    run_main(script, args + ['--n_iters', '9', '--out_dir', tmp_path / 'in_memory'], monkeypatch)
    monkeypatch.setenv(common.IN_MEMORY_ENV, '0')
    run_main(script, args + ['--n_iters', '9', '--out_dir', tmp_path / 'straight'], monkeypatch)
    run_main(script, args + ['--n_iters', '4', '--out_dir', tmp_path / 'split'], monkeypatch)
    run_main(script, args + ['--n_iters', '9', '--resume', tmp_path / 'split'], monkeypatch)
    same_checkpoints(tmp_path / 'straight' / 'ckpt.pt', tmp_path / 'split' / 'ckpt.pt')
    same_checkpoints(tmp_path / 'straight' / 'ckpt.pt', tmp_path / 'in_memory' / 'ckpt.pt')


def test_torchrun_two_processes_on_the_mapped_path(folder, tmp_path, monkeypatch):
    """A fresh folder: rank 0 decodes, rank 1 waits and opens the map; the ranks stay identical."""
    monkeypatch.setenv(common.IN_MEMORY_ENV, '0')
    result, ranks = run_torchrun_dumping_ranks(
        'racing_dcgan', TINY + ['--data_root', folder, '--n_iters', '5', '--out_dir', tmp_path / 'run'], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('decoding 24 images') == 1, result.stdout
    assert result.stdout.count('gathered from the memory-mapped cache') == 1
    assert len(ranks) == 2
    for net in ('generators', 'discriminator'):
        for key, value in ranks[0][net].items():
            if 'running_' not in key and 'num_batches' not in key:
                assert torch.equal(value, ranks[1][net][key]), (net, key)


# ---- errors: one line, and no half-written cache -------------------------------------------------

def test_a_corrupt_image_is_one_line_and_leaves_no_cache(folder, tmp_path):
    (folder / 'sub' / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    result = run_script('racing_dcgan', TINY + ['--data_root', folder, '--n_iters', '1',
                                                '--out_dir', tmp_path / 'run'], tmp_path,
                        env={common.DECODE_WORKERS_ENV: '2'})
    assert_one_line_error(result, 'broken.jpg', 'remove or replace it')
    assert cache_files(folder) == []
    assert not (tmp_path / 'run').exists()


def test_an_unwritable_cache_folder_is_one_line(folder, tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = run_script('racing_dcgan', TINY + ['--data_root', folder, '--n_iters', '1'], tmp_path,
                        env={common.CACHE_DIR_ENV: str(tmp_path / 'a_file' / 'caches')})
    assert_one_line_error(result, 'cannot write', 'a_file', common.CACHE_DIR_ENV)
    if os.geteuid() != 0:   # root writes anywhere
        os.chmod(folder, 0o555)
        try:
            result = run_script('racing_dcgan', TINY + ['--data_root', folder, '--n_iters', '1'], tmp_path)
            assert_one_line_error(result, 'cannot write', '.decoded', 'Permission denied')
        finally:
            os.chmod(folder, 0o755)


def test_a_full_disk_leaves_no_cache(folder, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'posix_fallocate', full)
    with pytest.raises(common.UserError, match='not enough disk space .*No space left'):
        common.load_data('folder', data_root=str(folder), img_size=16)
    assert cache_files(folder) == []


def test_an_interrupted_build_leaves_no_cache(folder, monkeypatch):
    calls = count_decodes(monkeypatch)
    decode = common.decode_image

    def interrupted(path, *args):
        if len(calls) == 5:
            raise KeyboardInterrupt
        return decode(path, *args)
    monkeypatch.setattr(common, 'decode_image', interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.load_data('folder', data_root=str(folder), img_size=16, decode_workers=1)
    assert cache_files(folder) == []


KILLED_DRIVER = '''
import sys, time
sys.path.insert(0, {repo!r})
import common
decode = common.decode_image
def slow(*args):
    time.sleep(0.2)
    return decode(*args)
common.decode_image = slow
common.load_data('folder', data_root={root!r}, img_size=16, decode_workers=1)
'''


def test_a_build_killed_midway_leaves_no_cache_and_is_cleaned_up(folder, tmp_path):
    driver = tmp_path / 'driver.py'
    driver.write_text(KILLED_DRIVER.format(repo=REPO, root=str(folder)))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not glob.glob(str(folder / '.decoded' / '*.partial')) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = cache_files(folder)
    assert left and all(f.endswith('.partial') for f in left)               # nothing that looks whole
    data = common.load_data('folder', data_root=str(folder), img_size=16)   # decoded again, cleaned up
    assert torch.equal(data.x, todays_decoding(folder, 16, None))
    assert not any(f.endswith('.partial') for f in cache_files(folder))


# ---- fid.py reads the cache when it holds what fid.py would decode -------------------------------

@pytest.fixture(scope='module')
def fid_model(tmp_path_factory):
    import fid
    path = tmp_path_factory.mktemp('weights') / 'w.pth'
    torch.save(fid.random_weights(0), path)
    return fid.load_inception(str(path), dims=64)


def test_fid_reads_a_cache_of_training_size_images(tmp_path, fid_model, monkeypatch):
    import fid
    root = tmp_path / 'sixteen'
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):                                # already 16 x 16: the cache holds them as they are
        pixels = rng.integers(0, 256, (16, 16) if i == 2 else (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f'{i}.{"jpg" if i % 2 else "png"}', quality=90)
    decoded = fid.extract_folder(list(fid.list_images(str(root))), fid_model, batch_size=4, features=True)
    assert fid._decoded_cache(fid.list_images(str(root))) is None
    common.load_data('folder', data_root=str(root), img_size=16)
    common.load_data('folder', data_root=str(root), img_size=16, channels=1)   # grey: never for fid.py
    assert json.loads((root / '.decoded' / '16px-rgb.json').read_text())['as_is']
    assert fid._decoded_cache(fid.list_images(str(root))) is not None

    def no_decoding(self, i):
        raise AssertionError('decoded')
    monkeypatch.setattr(fid._ImageFiles, '__getitem__', no_decoding)
    cached = fid.extract_folder(str(root), fid_model, batch_size=4, features=True)
    assert np.array_equal(cached['features'], decoded['features'])
    assert np.array_equal(cached['mu'], decoded['mu']) and np.array_equal(cached['sigma'], decoded['sigma'])
    monkeypatch.undo()

    Image.new('RGB', (16, 16)).save(root / '9.png')                         # a new file: decoded again
    assert fid._decoded_cache(fid.list_images(str(root))) is None
    os.remove(root / '9.png')
    common.load_data('folder', data_root=str(root), img_size=8)             # another size: not for fid.py
    assert fid._decoded_cache(fid.list_images(str(root))) is not None
    os.remove(root / '.decoded' / '16px-rgb.json')
    assert fid._decoded_cache(fid.list_images(str(root))) is None           # only the 8px crops: decode


def test_fid_ignores_a_cache_of_resized_images(folder):
    import fid
    common.load_data('folder', data_root=str(folder), img_size=16)
    assert fid._decoded_cache(fid.list_images(str(folder))) is None          # resized crops, not the files
