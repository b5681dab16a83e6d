"""Tests for fid.prdc (precision, recall, density, coverage), its CLI flags and
fid.py's progress bar. The reference is the `prdc` package (installed), and a
brute-force formula written here from the definitions (Naeem et al. 2020)."""
import contextlib
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402
from conftest import run_fid_cli as run_cli  # noqa: E402

pytestmark = [pytest.mark.filterwarnings('ignore::UserWarning'),
              pytest.mark.filterwarnings('ignore::DeprecationWarning')]

KEYS = ('precision', 'recall', 'density', 'coverage')


def reference(real, fake, k):
    """prdc.compute_prdc (clovaai), its 'Num real' print silenced."""
    import prdc
    with contextlib.redirect_stdout(io.StringIO()):
        out = prdc.compute_prdc(real, fake, k)
    return {key: float(out[key]) for key in KEYS}


def brute_force(real, fake, k):
    """The definitions, all pairs at once: exact squared distances (float64
    from the differences), rounded like sklearn's (float32 d^2 and sqrt for
    float32 features, float64 otherwise); radius = k-th neighbour with the
    point itself (0) in its sorted row."""
    f32 = real.dtype == fake.dtype == np.float32

    def dist(a, b):
        d2 = ((a.astype(np.float64)[:, None] - b.astype(np.float64)[None]) ** 2).sum(-1)
        return np.sqrt(d2.astype(np.float32)) if f32 else np.sqrt(d2)

    r_real = np.sort(dist(real, real), 1)[:, k]
    r_fake = np.sort(dist(fake, fake), 1)[:, k]
    d = dist(real, fake)
    inside = d < r_real[:, None]
    return dict(precision=float(inside.any(0).mean()),
                recall=float((d < r_fake[None]).any(1).mean()),
                density=float((1.0 / k) * inside.sum(0).mean()),
                coverage=float((d.min(1) < r_real).mean()))


def assert_same(a, b, what=''):
    for key in KEYS:
        assert abs(a[key] - b[key]) <= 1e-12, (what, key, a, b)


# --- the same numbers as the reference ----------------------------------------

@pytest.mark.parametrize('seed', range(4))
def test_random_features_match_reference(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(8, 400, 2)
    d, k = int(rng.choice([2, 16, 100])), int(rng.integers(1, 7))
    real = rng.standard_normal((n, d)).astype(np.float32)
    fake = (1.1 * rng.standard_normal((m, d)) + 0.1).astype(np.float32)
    ours = fid.prdc(real, fake, k)
    assert_same(ours, reference(real, fake, k), 'reference')
    assert_same(ours, brute_force(real, fake, k), 'brute force')


@pytest.mark.parametrize('seed', range(3))
def test_ties_and_duplicates_match_reference(seed):
    """Features on a coarse grid: many exactly equal distances (points on a
    ball's edge, where < must be strict), duplicates within and across the
    sets. The values are exact in float64, so the reference has no rounding
    noise here either."""
    rng = np.random.default_rng(10 + seed)
    d = int(rng.choice([1, 3, 8]))
    real = (rng.integers(-3, 4, (150, d)) / 4).astype(np.float32)
    fake = (rng.integers(-3, 4, (120, d)) / 4).astype(np.float32)
    fake[:30] = real[:30]
    real[40:60] = real[60:80]
    for k in (1, 3, 5):
        ours = fid.prdc(real, fake, k, chunk_size=64)
        assert_same(ours, reference(real, fake, k), ('reference', k))
        assert_same(ours, brute_force(real, fake, k), ('brute force', k))


def test_edge_cases_of_rounding_match_reference():
    """Points placed at a float32 ulp from a ball's edge: a distance that
    rounds to the radius (not inside) and one just below (inside)."""
    rng = np.random.default_rng(5)
    real = rng.standard_normal((60, 32)).astype(np.float32)
    fake = rng.standard_normal((60, 32)).astype(np.float32)
    r = brute_force_radii(real, 3)
    for i in range(10):
        direction = rng.standard_normal(32)
        direction /= np.linalg.norm(direction)
        for t, scale in enumerate((1 - 3e-7, 1 - 3e-8, 1.0, 1 + 3e-8)):
            fake[20 + 4 * i + t] = real[i] + direction * r[i] * scale
    ours = fid.prdc(real, fake, 3)
    assert_same(ours, reference(real, fake, 3), 'reference')
    assert_same(ours, brute_force(real, fake, 3), 'brute force')


def brute_force_radii(x, k):
    d2 = ((x.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1)
    return np.sort(np.sqrt(d2.astype(np.float32)), 1)[:, k]


def near_ties(rng, centres=40, satellites=8, d=16):
    """Points whose nearest neighbours are near-ties: each centre has
    satellites at distances 0.1 (1 + t 1e-5), closer to each other than the
    float32 matmul's error bound but distinct exactly; shuffled so that a
    centre and its satellites fall in different blocks."""
    c = rng.standard_normal((centres, d))
    u = rng.standard_normal((centres, satellites, d))
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    scale = 0.1 * (1 + 1e-5 * rng.permuted(np.tile(np.arange(satellites), (centres, 1)), axis=1))
    x = np.concatenate([c, (c[:, None] + u * scale[..., None]).reshape(-1, d)]).astype(np.float32)
    return x[rng.permutation(len(x))]


def test_near_ties_across_blocks_exact_radii():
    """The k-th neighbour among near-ties met in different blocks: the radii
    (not only the four figures) are the brute-force ones, bit for bit."""
    rng = np.random.default_rng(12)
    x = near_ties(rng)
    for k in (3, 5, 7):
        for chunk in (64, 1024):
            p = fid._Points(torch.from_numpy(x), torch.zeros(16), 'real', workers=2)
            got = fid._radii(p, k, chunk)
            assert np.array_equal(got, brute_force_radii(x, k)), (k, chunk)
    fake = near_ties(rng)
    assert_same(fid.prdc(x, fake, 5, chunk_size=64), brute_force(x, fake, 5), 'near ties')


def test_float64_and_tensor_inputs():
    """float64 features are compared in float64 (as sklearn does); tensors and
    arrays give the same numbers; N may differ between the sets."""
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((90, 12)), rng.standard_normal((70, 12)) + 0.2
    ours = fid.prdc(real, fake, 4)
    assert_same(ours, reference(real, fake, 4), 'reference')
    assert_same(ours, brute_force(real, fake, 4), 'brute force')
    assert_same(fid.prdc(torch.from_numpy(real), torch.from_numpy(fake), 4), ours, 'tensors')
    assert all(type(v) is float for v in ours.values())


def test_dense_fallback_for_clusters(monkeypatch):
    """More exact duplicates and near-duplicates than candidates kept per row
    go through _radii_dense; still the brute-force numbers."""
    calls = []
    dense = fid._radii_dense
    monkeypatch.setattr(fid, '_radii_dense', lambda *a: calls.append(len(a[1])) or dense(*a))
    rng = np.random.default_rng(7)
    real = rng.standard_normal((200, 16)).astype(np.float32)
    fake = rng.standard_normal((150, 16)).astype(np.float32)
    fake[:40] = fake[0]                                        # a collapsed mode
    fake[40:80] = fake[1] + 1e-4 * rng.standard_normal((40, 16)).astype(np.float32)
    ours = fid.prdc(real, fake, 5, chunk_size=64)
    assert calls and sum(calls) >= 60
    assert_same(ours, brute_force(real, fake, 5), 'brute force')


def test_reduced_precision_matmul_settings_do_not_leak_in():
    """torch.set_float32_matmul_precision('medium') lets oneDNN run float32
    matmuls in bf16 on a CPU (errors far beyond the bound prdc relies on):
    prdc turns that off for its own matmuls and restores it."""
    mk = torch.backends.mkldnn.matmul
    saved = mk.fp32_precision
    rng = np.random.default_rng(6)
    real = rng.standard_normal((150, 64)).astype(np.float32)
    fake = rng.standard_normal((140, 64)).astype(np.float32)
    try:
        mk.fp32_precision = 'bf16'
        assert_same(fid.prdc(real, fake, 3), brute_force(real, fake, 3), 'bf16 setting')
        assert mk.fp32_precision == 'bf16'
    finally:
        mk.fp32_precision = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_equals_cpu():
    rng = np.random.default_rng(9)
    real = rng.standard_normal((3000, 256)).astype(np.float32)
    fake = rng.standard_normal((2500, 256)).astype(np.float32)
    fake[:50] = fake[0]
    cpu = fid.prdc(real, fake, 5)
    assert_same(fid.prdc(torch.from_numpy(real).cuda(), torch.from_numpy(fake).cuda(), 5), cpu, 'cuda')


def test_worker_threads_equal_one_thread():
    """Blocks spread over 3 worker threads (torch's thread count decides how
    many) give the one-thread numbers, here with many small blocks."""
    rng = np.random.default_rng(13)
    real = rng.standard_normal((700, 32)).astype(np.float32)
    fake = rng.standard_normal((650, 32)).astype(np.float32)
    fake[:30] = fake[0]
    with fid._threads(1):
        one = fid.prdc(real, fake, 4, chunk_size=64)
    with fid._threads(3):
        three = fid.prdc(real, fake, 4, chunk_size=64)
    assert_same(three, one, 'threads')
    assert_same(one, brute_force(real, fake, 4), 'brute force')


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((333, 24)).astype(np.float32)
    fake = rng.standard_normal((271, 24)).astype(np.float32) * 1.2
    one = fid.prdc(real, fake, 5, chunk_size=4096)
    assert_same(fid.prdc(real, fake, 5, chunk_size=64), one, 'chunk 64')
    assert_same(fid.prdc(real, fake, 5, chunk_size=100), one, 'chunk 100 (-> 128)')
    assert_same(one, brute_force(real, fake, 5), 'brute force')


# --- known answers ------------------------------------------------------------

def clusters(rng, modes, n, d=2, spread=0.1):
    """n points from well-separated Gaussian modes (10 centres 10 apart in
    scale), drawn uniformly from `modes`; also returns each point's mode."""
    centres = np.random.default_rng(99).standard_normal((10, d)) * 10
    which = rng.choice(modes, n)
    return (centres[which] + spread * rng.standard_normal((n, d))).astype(np.float32), which


def test_known_answers():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 8)).astype(np.float32)
    same = fid.prdc(real, real.copy(), 5)
    assert same['precision'] == same['recall'] == same['coverage'] == 1.0

    real, which = clusters(rng, np.arange(10), 1000)
    half = fid.prdc(real, clusters(rng, np.arange(5), 1000)[0], 5)
    covered = (which < 5).mean()                       # about half of the reals
    assert 0.4 < covered < 0.6 and half['precision'] > 0.95 and half['density'] > 0.8
    assert abs(half['recall'] - covered) < 0.03 and abs(half['coverage'] - covered) < 0.03

    far = fid.prdc(real, real + 100, 5)
    assert far == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)

    a, b = rng.standard_normal((2, 2000, 4)).astype(np.float32)
    one = fid.prdc(a, b, 5)
    assert 0.95 <= one['density'] <= 1.05 and one['precision'] > 0.95 and one['coverage'] > 0.95


def test_bad_input_one_line():
    x = np.zeros((10, 4), np.float32) + np.arange(10)[:, None]
    cases = [
        ((x[:5], x, 5), 'at least 6 real samples, got 5'),
        ((x, x[:3], 5), 'at least 6 fake samples, got 3'),
        ((x, x[:, :3], 2), 'different dimensions: 4 vs 3'),
        ((np.where(x == 3, np.nan, x), x, 2), 'real features contain NaN or inf'),
        ((x, np.where(x == 3, np.inf, x), 2), 'fake features contain NaN or inf'),
        ((x, x, 0), 'nearest_k must be an integer >= 1'),
        ((x, x, 2.5), 'nearest_k must be an integer >= 1'),
        ((x[0], x, 2), 'must be a 2-D (N, D) array'),
    ]
    for args, msg in cases:
        with pytest.raises(fid.FIDError) as e:
            fid.prdc(*args)
        assert msg in str(e.value) and '\n' not in str(e.value), (msg, str(e.value))


# --- torchrun -----------------------------------------------------------------

DRIVER = '''
import json, sys, numpy as np, torch.distributed as dist
sys.path.insert(0, {root!r})
import fid
dist.init_process_group('gloo')
f = np.load(sys.argv[1])
out = fid.prdc(f['real'], f['fake'], 3, chunk_size=64)
dist.barrier()
if dist.get_rank() == 1:
    json.dump(out, open(sys.argv[2], 'w'))     # rank 1: every rank has the result
fid.main([sys.argv[3], sys.argv[4], '--dims', '64', '--prdc', '--prdc-k', '2'])   # rank 0 prints
dist.destroy_process_group()
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(tmp_path, torch_home, folders, capsys):
    """The API and the CLI under a 2-process torchrun (gloo): the blocks and
    the feature extraction are sharded, the numbers are one process's."""
    rng = np.random.default_rng(8)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    fake = (rng.standard_normal((250, 16)) * 1.1).astype(np.float32)
    fake[:20] = fake[0]                                   # exercises the dense path too
    np.savez(tmp_path / 'f.npz', real=real, fake=fake)
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(root=str(ROOT)))
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                        '--master_port', str(free_port()), str(driver), str(tmp_path / 'f.npz'),
                        str(tmp_path / 'out.json'), *folders], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads((tmp_path / 'out.json').read_text())
    one = fid.prdc(real, fake, 3)
    assert_same(got, one, 'torchrun')
    assert_same(one, brute_force(real, fake, 3), 'brute force')
    rc, out, _ = run_cli(capsys, *folders, '--dims', 64, '--prdc', '--prdc-k', 2)
    lines = p.stdout.strip().splitlines()                            # rank 0 alone printed
    assert rc == 0 and lines[:4] == out[:4] and len(lines) == len(out) == 5
    assert float(lines[4].split()[1]) == pytest.approx(float(out[4].split()[1]), rel=1e-9)


# --- CLI and progress bar -----------------------------------------------------

@pytest.fixture
def torch_home(fid_torch_home, monkeypatch):
    """TORCH_HOME holding random Inception weights under the real file's name (conftest)."""
    monkeypatch.setenv('TORCH_HOME', fid_torch_home)
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    return pathlib.Path(fid_torch_home)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Two folders of 8 small noisy PNGs (B brighter than A)."""
    root = tmp_path_factory.mktemp('prdc_images')
    out = []
    for name, shift in (('A', 0), ('B', 60)):
        rng = np.random.default_rng(len(name) + shift)
        (root / name).mkdir()
        for i in range(8):
            img = np.clip(rng.normal(100 + shift, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f'{i}.png')
        out.append(str(root / name))
    return out


def test_cli_prdc_equals_api(torch_home, folders, capsys):
    rc, out, err = run_cli(capsys, *folders, '--dims', 64, '--prdc', '--prdc-k', 2, '--kid')
    assert rc == 0 and not err, err
    assert [l.split(':')[0] for l in out] == ['KID', *KEYS, 'FID']      # FID stays last
    model = fid.load_inception(dims=64)
    feats = [fid.extract_folder(f, model, features=True)['features'] for f in folders]
    api = fid.prdc(feats[0], feats[1], 2)
    assert {l.split(': ')[0]: float(l.split(': ')[1]) for l in out[1:5]} == api
    assert api == reference(feats[0], feats[1], 2)


def test_cli_prdc_errors_one_line(torch_home, folders, tmp_path, capsys):
    np.savez(tmp_path / 's.npz', mu=np.zeros(64), sigma=np.eye(64))
    few = tmp_path / 'few'
    few.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(few / f'{i}.png')
    cases = [
        ([tmp_path / 's.npz', folders[1], '--dims', 64, '--prdc'], '--prdc needs two image folders'),
        ([folders[0], few, '--prdc'], '3 images; --prdc with --prdc-k 5 needs at least 6'),
        ([folders[0], folders[1], '--prdc', '--prdc-k', 0], '--prdc-k must be at least 1'),
        ([folders[0], tmp_path / 'o.npz', '--prdc', '--save-stats'], 'does not go with --save-stats'),
    ]
    for argv, msg in cases:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and len(err) == 1 and err[0].startswith('error: ') and msg in err[0], (msg, err)


def test_progress_bar_on_a_terminal_only(torch_home, folders, capsys, monkeypatch):
    argv = [*folders, '--dims', 64]
    rc, out, err = run_cli(capsys, *argv)                 # pytest's stderr: not a terminal
    assert rc == 0 and err == []
    monkeypatch.setattr(fid, '_stderr_is_tty', lambda: True)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0 and out[-1].startswith('FID:')
    assert any('8/8' in line and 'img' in line for line in err), err      # one bar per folder
    rc, out, err = run_cli(capsys, *argv, '--quiet')
    assert rc == 0 and err == []
    model = fid.load_inception(dims=64)
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    fid.extract_images(x, model, batch_size=2)
    assert '5/5' in capsys.readouterr().err
    fid.extract_images(x, model, batch_size=2, progress=False)
    fid.extract_generator(lambda n: torch.rand(n, 3, 8, 8) * 2 - 1, 4, model, progress=False)
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(fid, 'PROGRESS', False)
    fid.extract_generator(lambda n: torch.rand(n, 3, 8, 8) * 2 - 1, 4, model)
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(fid, 'PROGRESS', True)
    monkeypatch.setattr(fid, '_stderr_is_tty', lambda: False)
    fid.extract_generator(lambda n: torch.rand(n, 3, 8, 8) * 2 - 1, 4, model)
    assert '4/4' in capsys.readouterr().err
