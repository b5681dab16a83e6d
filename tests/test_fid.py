"""Tests for fid.py, with pytorch-fid (installed) as the reference.

Offline: the weights are random (fid.random_weights) saved under a temporary
TORCH_HOME with the real file's name, so pytorch-fid loads the same file.
"""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402
from conftest import run_fid_cli as run_cli  # noqa: E402

pytestmark = [pytest.mark.filterwarnings('ignore::UserWarning'),
              pytest.mark.filterwarnings('ignore::DeprecationWarning'),
              pytest.mark.filterwarnings('ignore:Matrix is singular')]


# --- fixtures -------------------------------------------------------------

@pytest.fixture(scope='session')
def torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp('torch_home')
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(fid.random_weights(0), home / 'hub' / 'checkpoints' / fid.WEIGHTS_FILE)
    return home


@pytest.fixture
def weights(torch_home, monkeypatch):
    """TORCH_HOME holds the random weights; returns the file's path."""
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    return str(torch_home / 'hub' / 'checkpoints' / fid.WEIGHTS_FILE)


@pytest.fixture(scope='session')
def models(torch_home):
    path = str(torch_home / 'hub' / 'checkpoints' / fid.WEIGHTS_FILE)
    return {d: fid.load_inception(path, dims=d) for d in (64, 192, 2048)}


def smooth_image(rng, h, w, grey):
    """Random smooth image (a few blobs), uint8."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for _ in range(4):
        c, s, col = rng.random(2), 0.1 + 0.3 * rng.random(), rng.random(3)
        img += col * np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / s ** 2)[..., None]
    img = np.clip(img / img.max() * 255 + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return img[..., 0] if grey else img


@pytest.fixture(scope='session')
def folders(tmp_path_factory):
    """Two folders of PNG and JPEG, grey and colour, of different sizes.
    FID is large (~100) since scipy's sqrtm in pytorch-fid has ~1e-5 absolute
    noise with N < 2048 (rank-deficient covariances)."""
    root = tmp_path_factory.mktemp('images')
    kinds = [('png', (32, 32), False), ('jpg', (40, 28), False), ('png', (24, 36), True),
             ('jpg', (32, 32), True), ('png', (32, 32), False)]
    out = []
    for name, seed in (('A', 1), ('B', 2)):
        rng = np.random.default_rng(seed)
        d = root / name
        d.mkdir()
        for i, (ext, (h, w), grey) in enumerate(kinds):
            img = smooth_image(rng, h, w, grey)
            img = 255 - img if name == 'B' else img      # B differs: FID far from 0
            Image.fromarray(img).save(d / f'{i}.{ext}', quality=90)
        out.append(str(d))
    return out


# --- the network and pytorch-fid ------------------------------------------

def test_matches_pytorch_fid(weights, folders, models):
    """Identical weights: the 2048-d features equal pytorch-fid's, and so do the 192-d features
    (pytorch-fid's --dims 192) and the FID on them. The distance is compared at 192 dims because
    pytorch-fid's scipy sqrtm of a 2048 x 2048 matrix alone takes 10-40 s on this CPU; the 2048-d
    FID of both tools on 1,000 images is bench/bench_fid.py's (bench/results/fid.md)."""
    from pytorch_fid import fid_score
    from pytorch_fid.inception import InceptionV3
    ref_stats, stats = [], []
    for dims, block in ((2048, 3), (192, 1)):
        ref_model = InceptionV3([block]).eval()          # loads the file in TORCH_HOME
        for folder in folders:
            files = fid.list_images(folder)
            assert len(files) == 5
            act = fid_score.get_activations(files, ref_model, batch_size=1, dims=dims,
                                            device='cpu', num_workers=0)
            assert act.std(0).mean() > 1e-2 and np.abs(act).max() < 1e3   # O(1), not degenerate
            mine = fid.extract_folder(folder, models[dims], batch_size=4, features=True)
            print(dims, 'max abs feature diff', np.abs(mine['features'] - act).max())
            assert np.abs(mine['features'] - act).max() <= 1e-4
            if dims == 192:
                ref_stats.append((act.mean(0), np.cov(act, rowvar=False)))
                stats.append((mine['mu'], mine['sigma']))
    ref_fid = fid_score.calculate_frechet_distance(*ref_stats[0], *ref_stats[1])
    mine = fid.frechet_distance(*stats[0], *stats[1])
    print('FID', mine, 'pytorch-fid', ref_fid, 'rel diff', abs(mine - ref_fid) / abs(ref_fid))
    assert abs(mine - ref_fid) <= 1e-5 * abs(ref_fid)


def test_model_keys_dims_and_eval(models):
    import torchvision
    tv = torchvision.models.inception_v3(num_classes=1008, aux_logits=False,
                                         weights=None, init_weights=False)
    assert {k: v.shape for k, v in models[64].state_dict().items()} == \
           {k: v.shape for k, v in tv.state_dict().items()}
    m = models[64]
    m.train()
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    x = torch.rand(2, 1, 20, 20) * 2 - 1
    assert m(x).shape == (2, 64) and m(x).dtype == torch.float32
    f, logits = m(x, return_logits=True)
    assert f.shape == (2, 64) and logits.shape == (2, 1008)


def test_exact_fp32_turns_tf32_and_autocast_off_and_restores():
    """On CUDA the network runs in true fp32: TF32 off (through the same allow_tf32 flags that
    common.py sets, since mixing them with torch's fp32_precision API raises) and autocast off;
    the caller's settings come back afterwards. The flags are global, so this runs on a CPU.
    They are saved and restored by hand: torch serves matmul.allow_tf32 through __getattr__, and
    pytest >= 9.2's monkeypatch deletes such an attribute on undo, which torch refuses."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = True
        with torch.autocast('cpu', dtype=torch.bfloat16):
            with fid._exact_fp32(torch.device('cuda')):
                assert not matmul.allow_tf32 and not cudnn.allow_tf32
                assert not torch.is_autocast_enabled('cuda')
            with fid._exact_fp32(torch.device('cpu')):
                assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_fused_equals_unfused(models, weights):
    plain = fid.load_inception(weights, dims=192, fast=False)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    a, b = plain(x), models[192](x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


# --- Frechet distance ---------------------------------------------------------

def scipy_fid(m1, f1, m2, f2):
    """Reference with scipy's sqrtm, from factors sigma = f f^T. For
    rank-deficient sigmas sqrtm(sigma1 sigma2) is singular and inaccurate
    (~1e-8), so sqrtm is taken of the full-rank k x k matrix f1^T sigma2 f1
    (or f2^T sigma1 f2), which has the same nonzero eigenvalues."""
    s1, s2 = f1 @ f1.T, f2 @ f2.T
    small = f1.T @ s2 @ f1 if f1.shape[1] <= f2.shape[1] else f2.T @ s1 @ f2
    tr = np.trace(np.real(scipy.linalg.sqrtm(small)))
    return (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * tr


@pytest.mark.parametrize('k1,k2', [(50, 50), (20, 50), (50, 10), (30, 35), ('n=30', 'n=40')])
def test_frechet_vs_sqrtm(k1, k2):
    rng = np.random.default_rng(7)
    d = 50
    if isinstance(k1, str):                          # sample covariances, N < d
        x = rng.normal(size=(30, d)) @ rng.normal(size=(d, d))
        y = rng.normal(size=(40, d)) * 2 + 0.1
        f1 = (x - x.mean(0)).T / math.sqrt(29)
        f2 = (y - y.mean(0)).T / math.sqrt(39)
        assert np.allclose(f1 @ f1.T, np.cov(x, rowvar=False))
    else:                                            # sigma = f f^T of rank k
        f1, f2 = rng.normal(size=(d, k1)), rng.normal(size=(d, k2)) * 1.5
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    ref = scipy_fid(m1, f1, m2, f2)
    assert abs(fid.frechet_distance(m1, f1 @ f1.T, m2, f2 @ f2.T) - ref) <= 1e-8 * abs(ref)
    a, _ = factor = fid.sqrt_factor(f1 @ f1.T)     # FIDTracker's cached real side: rank columns only
    assert a.shape == (d, min(d, 29 if isinstance(k1, str) else k1)) and np.allclose(a @ a.T, f1 @ f1.T)
    reused = fid.frechet_distance(m1, f1 @ f1.T, m2, f2 @ f2.T, sigma1_sqrt=factor)
    assert abs(reused - ref) <= 1e-8 * abs(ref)
    if k1 == k2 == 50:                               # full rank: sqrtm(sigma1 sigma2) itself
        s1, s2 = f1 @ f1.T, f2 @ f2.T
        direct = np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2))) + (m1 - m2) @ (m1 - m2)
        assert abs(direct - ref) <= 1e-8 * abs(ref)


def test_frechet_diagonal_exact():
    rng = np.random.default_rng(0)
    a, b = rng.random(20) * 3, rng.random(20)
    a[:5] = 0                                          # singular
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    exact = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    assert fid.frechet_distance(m1, np.diag(a), m1, np.diag(a)) == pytest.approx(0, abs=1e-12)


def test_frechet_eps_rule(monkeypatch):
    """pytorch-fid's rule: a non-finite result is retried with eps on the diagonals."""
    real, calls = fid._trace_sqrt_product, []
    def flaky(s1, s2, sigma1_sqrt=None):
        calls.append(s1[0, 0])
        return float('nan') if len(calls) == 1 else real(s1, s2, sigma1_sqrt)
    monkeypatch.setattr(fid, '_trace_sqrt_product', flaky)
    s = np.diag([1.0, 4.0])
    with pytest.warns(UserWarning, match='adding 0.001 to diagonal'):
        d = fid.frechet_distance(np.zeros(2), s, np.ones(2), s, eps=1e-3)
    # as in pytorch-fid, only the sqrt term sees the offset: 2 + 10 - 2 * 5.002
    assert calls == pytest.approx([1.0, 1.001], abs=1e-15) and d == pytest.approx(1.996)


def test_frechet_bad_input():
    with pytest.raises(fid.FIDError, match='dimensions'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(fid.FIDError, match='positive semi-definite'):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# --- IS and KID ----------------------------------------------------------------

def reference_is(p, splits):
    scores = []
    n = len(p)
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        py = [sum(row[c] for row in part) / len(part) for c in range(p.shape[1])]
        kl = [sum(row[c] * (math.log(row[c]) - math.log(py[c])) for c in range(p.shape[1]))
              for row in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


def test_inception_score():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(53, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = reference_is(p, 10)
    assert fid.inception_score(torch.tensor(logits), splits=10) == pytest.approx(ref, rel=1e-10)
    assert fid.inception_score(p, splits=10) == pytest.approx(ref, rel=1e-10)
    onehot = np.eye(7)[np.arange(70) % 7] * 50.0     # confident, uniform over classes
    assert fid.inception_score(onehot, splits=10)[0] == pytest.approx(7, rel=1e-6)


def reference_mmd(x, y):
    d, m = x.shape[1], len(x)
    k = lambda a, b: (float(a @ b) / d + 1) ** 3
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / m ** 2


def test_kid():
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 6)), rng.random((25, 6)) + 0.2
    # subsets as large as the sets: every subset gives the full-set value
    mean, std = fid.kernel_inception_distance(x[:25], y, n_subsets=3, subset_size=100)
    assert mean == pytest.approx(reference_mmd(x[:25], y), rel=1e-10) and std < 1e-12
    # subsets as documented: RandomState(seed).choice, set 1 then set 2
    mean, std = fid.kernel_inception_distance(x, y, n_subsets=4, subset_size=10, seed=3)
    rs = np.random.RandomState(3)
    vals = [reference_mmd(x[rs.choice(30, 10, replace=False)], y[rs.choice(25, 10, replace=False)])
            for _ in range(4)]
    assert (mean, std) == pytest.approx((np.mean(vals), np.std(vals)), rel=1e-10)
    same, _ = fid.kernel_inception_distance(x, x, n_subsets=2, subset_size=30)
    assert same == pytest.approx(reference_mmd(x, x), abs=1e-12)


# --- statistics: streaming, tensors, folders, generator, cache --------------

def test_streaming_equals_batch():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(103, 16)).astype(np.float32) + 3
    rs = fid.RunningStats()
    for i in range(0, 103, 17):
        rs.update(torch.from_numpy(f[i:i + 17]))
    mu, sigma = rs.mean_cov()
    f64 = f.astype(np.float64)
    assert np.allclose(mu, f64.mean(0), rtol=1e-12, atol=0)
    assert np.allclose(sigma, np.cov(f64, rowvar=False), rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match='samples for 16-d'):
        fid.RunningStats().update(f[:5]).mean_cov()


def test_tensor_folder_generator_agree(models, tmp_path):
    rng = np.random.default_rng(5)
    u8 = np.stack([smooth_image(rng, 32, 32, False) for _ in range(5)])
    for i, im in enumerate(u8):
        Image.fromarray(im).save(tmp_path / f'{i}.png')
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    m = models[192]
    mu_t, s_t = fid.statistics_from_images(x, m, batch_size=2)
    mu_u, s_u = fid.statistics_from_images(torch.from_numpy(u8).permute(0, 3, 1, 2), m, batch_size=2)
    assert np.allclose(mu_u, mu_t, rtol=1e-6, atol=1e-7) and np.allclose(s_u, s_t, rtol=1e-5, atol=1e-7)  # uint8
    res = fid.extract_folder(str(tmp_path), m, batch_size=3)
    assert np.allclose(mu_t, res['mu'], rtol=1e-5, atol=1e-6)
    assert np.abs(s_t - res['sigma']).max() <= 1e-5 * np.abs(s_t).max()
    it = iter(range(5))
    sample = lambda n: x[[next(it) for _ in range(n)]]
    mu_g, s_g = fid.statistics_from_generator(sample, 5, m, batch_size=2)
    assert np.allclose(mu_g, mu_t, rtol=1e-12) and np.allclose(s_g, s_t, rtol=1e-10, atol=1e-12)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(5))    # (image, label) items
    mu_d, _ = fid.statistics_from_images(ds, m, batch_size=2)
    assert np.allclose(mu_d, mu_t, rtol=1e-12)
    grey = x[:, :1]                                           # 1 channel = replicated
    assert torch.equal(m(grey), m(grey.expand(-1, 3, -1, -1)))


def test_reference_cache_and_tracker(weights, tmp_path, monkeypatch):
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    tr = fid.FIDTracker(x, 'rand16', 'cpu', n_samples=4, batch_size=3,
                        cache_dir=str(tmp_path), dims=64)
    files = list(tmp_path.glob('fid_stats_*.npz'))
    assert len(files) == 1 and 'rand16' in files[0].name
    calls = []
    monkeypatch.setattr(fid, 'statistics_from_images', lambda *a, **k: calls.append(1))
    tr2 = fid.FIDTracker(x, 'rand16', 'cpu', n_samples=4, cache_dir=str(tmp_path), dims=64)
    assert not calls and np.array_equal(tr2.sigma, tr.sigma)     # from the cache
    assert tr.score(lambda n: x[:n]) == pytest.approx(
        fid.frechet_distance(*fid.statistics_from_generator(lambda n: x[:n], 4, tr.model, 3),
                             tr.mu, tr.sigma), rel=1e-9)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))
    monkeypatch.setattr(fid, 'FID_WEIGHTS_URL', 'http://127.0.0.1:9/none.pth')
    with pytest.raises(fid.FIDError, match='download'):             # fails at start-up
        fid.FIDTracker(x, 'rand16', 'cpu', cache_dir=str(tmp_path))


# --- CLI: outputs and one-line errors -----------------------------------------

def test_cli_npz_is_kid(weights, folders, models, tmp_path, capsys):
    out_npz = tmp_path / 'a.npz'
    rc, out, _ = run_cli(capsys, folders[0], out_npz, '--save-stats', '--dims', 64)
    assert rc == 0 and out_npz.exists()
    rc, out, _ = run_cli(capsys, out_npz, folders[1], '--dims', 64, '--batch-size', 5)
    rc2, out2, _ = run_cli(capsys, folders[0], folders[1], '--dims', 64, '--kid')
    assert rc == rc2 == 0 and [l.split()[0] for l in out2] == ['KID:', 'FID:']
    assert float(out[-1].split()[1]) == pytest.approx(float(out2[-1].split()[1]), rel=1e-9)
    ten = tmp_path / 'ten'
    ten.mkdir()
    rng = np.random.default_rng(3)
    for i in range(10):
        Image.fromarray(smooth_image(rng, 16, 16, False)).save(ten / f'{i}.png')
    rc, out, _ = run_cli(capsys, ten, out_npz, '--dims', 64, '--is')
    logits = fid.extract_folder(str(ten), models[64], logits=True)['logits']
    mean, std = fid.inception_score(logits)
    assert rc == 0 and out[0].startswith('IS (') and out[-1].startswith('FID:  ')
    assert [float(v) for v in out[0].split()[-2:]] == pytest.approx([mean, std], rel=1e-9)


def bad_inputs(tmp, folders):
    (tmp / 'one').mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / 'one' / 'a.png')
    (tmp / 'bad').mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / 'bad' / f'{i}.png')
    (tmp / 'bad' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    np.savez(tmp / 'nomu.npz', mean=np.zeros(3))
    np.savez(tmp / 's64.npz', mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp / 's192.npz', mu=np.zeros(192), sigma=np.eye(192))
    (tmp / 'corrupt.pth').write_bytes(b'garbage')
    return {
        'fewer than 2': ([tmp / 'one', folders[0]], 'found 1 image'),
        'corrupt image': ([tmp / 'bad', folders[0], '--dims', 64], 'broken.png'),
        'npz without mu': ([tmp / 'nomu.npz', tmp / 's64.npz'], 'no mu/sigma'),
        'mismatched dims': ([tmp / 's64.npz', tmp / 's192.npz'], 'different dimensions'),
        'npz vs --dims': ([tmp / 's64.npz', folders[0]], '64-d statistics but --dims is 2048'),
        'missing path': ([tmp / 'nope', folders[0]], 'no such folder'),
        'corrupt weights': ([folders[0], folders[1], '--weights', tmp / 'corrupt.pth'],
                            'delete it and fetch it again'),
        'negative workers': ([folders[0], folders[1], '--num-workers', -1], '--num-workers must be 0'),
        'weights offline': ([folders[0], folders[1]], 'put it at'),
    }


def test_weights_resolution_order(weights, tmp_path, monkeypatch):
    """--weights, then $FID_WEIGHTS, then the torch hub cache file (the download comes last)."""
    env_file, flag_file = tmp_path / 'env.pth', tmp_path / 'flag.pth'
    env_file.write_bytes(b'x')
    flag_file.write_bytes(b'x')
    assert fid.resolve_weights() == weights                       # the hub cache
    monkeypatch.setenv('FID_WEIGHTS', str(env_file))
    assert fid.resolve_weights() == str(env_file)                 # $FID_WEIGHTS wins over the cache
    assert fid.resolve_weights(str(flag_file)) == str(flag_file)  # --weights wins over both
    monkeypatch.setenv('FID_WEIGHTS', str(tmp_path / 'gone.pth'))
    with pytest.raises(fid.FIDError, match=r'\$FID_WEIGHTS file not found'):
        fid.resolve_weights()
    with pytest.raises(fid.FIDError, match='corrupt'):
        fid.check_weights(str(env_file))


def test_cli_errors_one_line(weights, folders, tmp_path, capsys, monkeypatch):
    cases = bad_inputs(tmp_path, folders)
    for name, (argv, msg) in cases.items():
        if name == 'weights offline':
            monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_home'))
            monkeypatch.setattr(fid, 'FID_WEIGHTS_URL', 'http://127.0.0.1:9/none.pth')
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and len(err) == 1 and err[0].startswith('error: ') and msg in err[0], \
            (name, err)


def test_cli_subprocess_errors(folders, tmp_path):
    """The real process: exit code 2, one stderr line, no traceback."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path / 'empty_home'), OMP_NUM_THREADS='1')
    env.pop('FID_WEIGHTS', None)
    for argv, msg in (([folders[0], folders[1], '--weights', tmp_path / 'nope.pth'],
                       'weights file not found'),):
        p = subprocess.run([sys.executable, str(ROOT / 'fid.py'), *map(str, argv)],
                           capture_output=True, text=True, env=env, timeout=120)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and msg in err[0], p.stderr


# --- torchrun -----------------------------------------------------------------

DRIVER = '''
import sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import fid
a, b, out = sys.argv[1:4]
dist.init_process_group('gloo')
fid.main([a, b, '--dims', '64', '--kid', '--batch-size', '2'])   # rank 0 prints
model = fid.load_inception(dims=64)
res = fid.extract_folder(a, model, batch_size=2, features=True)
x = torch.linspace(-1, 1, 7 * 3 * 20 * 20).reshape(7, 3, 20, 20).sin()
shard, sizes = iter(list(x[dist.get_rank()::2]) + [x[0]]), []   # rank 1's extra draw is dropped
def sample_fn(n):
    sizes.append(n)
    return torch.stack([next(shard) for _ in range(n)])
gen = fid.statistics_from_generator(sample_fn, 7, model, batch_size=3)
all_sizes = [None, None]
dist.all_gather_object(all_sizes, sizes)
assert all_sizes == [[3, 1], [3, 1]], all_sizes   # same calls on every rank (a collective is safe)
img = fid.statistics_from_images(x, model, batch_size=3)
if dist.get_rank() == 0:
    np.savez(out, mu=res['mu'], sigma=res['sigma'], feats=res['features'],
             gmu=gen[0], gsigma=gen[1], imu=img[0], isigma=img[1])
dist.destroy_process_group()
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(weights, folders, models, tmp_path, capsys):
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                        '--master_port', str(free_port()), str(driver), *folders,
                        str(tmp_path / 'out.npz')], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert [l.split()[0] for l in lines] == ['KID:', 'FID:']        # rank 0 prints alone
    rc, out, _ = run_cli(capsys, *folders, '--dims', 64, '--kid', '--batch-size', 2)
    assert float(lines[-1].split()[1]) == pytest.approx(float(out[-1].split()[1]), rel=1e-9)
    assert float(lines[0].split()[1]) == pytest.approx(float(out[0].split()[1]), rel=1e-9)
    got = np.load(tmp_path / 'out.npz')
    one = fid.extract_folder(folders[0], models[64], batch_size=2, features=True)
    assert np.allclose(got['feats'], one['features'], rtol=1e-6, atol=1e-6)   # order kept
    assert np.allclose(got['mu'], one['mu'], rtol=1e-9)
    assert np.allclose(got['sigma'], one['sigma'], rtol=1e-9, atol=1e-12)
    x = torch.linspace(-1, 1, 7 * 3 * 20 * 20).reshape(7, 3, 20, 20).sin()
    mu, sigma = fid.statistics_from_images(x, models[64], batch_size=3)
    for k in ('g', 'i'):
        assert np.allclose(got[k + 'mu'], mu, rtol=1e-9)
        assert np.allclose(got[k + 'sigma'], sigma, rtol=1e-9, atol=1e-12)


def test_torchrun_broken_image_in_one_rank_stops_every_rank(weights, folders, tmp_path):
    """rank 1 alone reads the broken file: both ranks stop at once (no rank left waiting in a
    collective), and the error, naming the file, is printed once."""
    bad = tmp_path / 'bad'
    bad.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(bad / f'{i}.png')
    (bad / '1.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')   # files[1::2] is rank 1's shard
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                        '--master_port', str(free_port()), str(ROOT / 'fid.py'), str(bad), folders[0],
                        '--dims', '64'], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and '1.png' in errors[0], p.stderr[-2000:]
    assert '[rank0]: Traceback' not in p.stderr, p.stderr[-2000:]   # rank 0 stops cleanly too
