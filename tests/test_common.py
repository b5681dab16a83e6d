"""common.py: data sets, batching, K-member nets, checkpoints, metrics, copying a script alone."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import REPO, assert_one_line_error, load_script, run_main, run_script


# ---- data -------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [8, 16, 32])
def test_digits_shape_dtype_range_labels(size):
    data = common.load_data('digits', img_size=size)
    assert data.x.shape == (1797, 1, size, size) and data.x.dtype == torch.uint8
    x, y = data.batch(torch.arange(100))
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() > 0.9           # background black, strokes near white
    assert y.dtype == torch.int64 and set(data.y.tolist()) == set(range(10)) and data.n_classes == 10
    assert torch.equal(data.y[:10], torch.arange(10))  # the UCI file starts 0, 1, ..., 9


def test_digits_colour_and_subset():
    data = common.load_data('digits', img_size=16, channels=3, subset=192)
    assert data.x.shape == (192, 3, 16, 16)
    assert torch.equal(data.x[:, 0], data.x[:, 2])


def test_stacked_digits_channels_are_digits_with_triple_labels():
    digits = common.load_data('digits', img_size=16)
    data = common.load_data('stacked-digits', img_size=16)
    assert data.x.shape == (20000, 3, 16, 16) and data.n_classes == 1000
    assert data.y.min() >= 0 and data.y.max() < 1000 and len(data.y.unique()) > 900
    for i in range(5):  # every channel is some digit image whose label is that channel's digit
        for c, digit in enumerate((data.y[i] // 100, data.y[i] // 10 % 10, data.y[i] % 10)):
            match = (digits.x[:, 0] == data.x[i, c]).flatten(1).all(1)
            assert match.any() and (digits.y[match] == digit).all()
    with pytest.raises(common.UserError, match='3 channels'):  # grey would lose the three digits
        common.load_data('stacked-digits', img_size=16, channels=1)


@pytest.mark.parametrize('name,n_modes,radius', [('ring8', 8, 2.0), ('grid25', 25, 4 * math.sqrt(2))])
def test_toy_sets(name, n_modes, radius):
    data = common.load_data(name)
    assert data.is_2d and data.shape == (2,) and len(data.centres) == n_modes
    assert data.centres.norm(dim=1).max() == pytest.approx(radius, rel=1e-6)
    x, y = data.batch(torch.arange(1000))
    assert x.dtype == torch.float32
    assert ((x - data.centres[y]).norm(dim=1) < 5 * data.std).all()   # each point near its mode
    assert len(y.unique()) == n_modes


def test_torchvision_set_absent_offline_names_the_files(tmp_path):
    with pytest.raises(common.UserError, match='train-images-idx3-ubyte'):
        common.load_data('mnist', data_root=str(tmp_path))


def write_png(path, size, colour=True):
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0], 3) if colour else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def test_folder_reads_odd_sizes_recursively(tmp_path):
    (tmp_path / 'sub').mkdir()
    write_png(tmp_path / 'a.png', (40, 30))
    write_png(tmp_path / 'sub' / 'b.jpg', (17, 50), colour=False)
    (tmp_path / 'notes.txt').write_text('not an image')
    data = common.load_data('folder', data_root=str(tmp_path), img_size=16)
    assert data.x.shape == (2, 3, 16, 16) and data.y is None
    grey = common.load_data('folder', data_root=str(tmp_path), img_size=16, channels=1)
    assert grey.x.shape == (2, 1, 16, 16)


def test_folder_subset_decodes_only_what_it_keeps_and_honours_exif(tmp_path):
    from PIL import Image
    img = Image.new('L', (20, 10))
    img.paste(255, (0, 0, 10, 10))                      # left half white: wide, not tall
    exif = img.getexif()
    exif[0x0112] = 6                                    # orientation: rotate 90 degrees to view
    img.save(tmp_path / 'a_camera.jpg', exif=exif, quality=95)
    (tmp_path / 'z_broken.png').write_bytes(b'not an image')   # after the subset: never opened
    data = common.load_data('folder', data_root=str(tmp_path), img_size=8, channels=1, subset=1)
    assert data.x.shape == (1, 1, 8, 8)
    top, bottom = data.x[0, 0, :3].float().mean(), data.x[0, 0, -3:].float().mean()
    assert top > 200 and bottom < 50                    # upright: the white half is on top


def test_folder_names_a_corrupt_image(tmp_path):
    write_png(tmp_path / 'good.png', (20, 20))
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG not really')
    with pytest.raises(common.UserError, match='broken.png'):
        common.load_data('folder', data_root=str(tmp_path), img_size=16)


def test_folder_without_images(tmp_path):
    (tmp_path / 'readme.txt').write_text('x')
    with pytest.raises(common.UserError, match='no images'):
        common.load_data('folder', data_root=str(tmp_path), img_size=16)


def test_batches_cover_an_epoch_and_shard_across_ranks():
    data = common.load_data('digits', img_size=8)
    data.x = torch.arange(len(data)).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)  # sample i holds value i
    data.x = data.x.to(torch.int64)
    seen = []
    shards = [common.Batches(data, 100, seed=3, rank=r, world_size=2) for r in range(2)]
    assert shards[0].per_epoch == 1797 // 200
    for it in range(shards[0].per_epoch):
        for s in shards:
            seen.append(s.get(it)[0][:, 0, 0, 0])
    seen = torch.cat(seen)
    assert len(seen.unique()) == len(seen)                   # no sample twice in an epoch
    again = common.Batches(data, 100, seed=3, rank=1, world_size=2)
    assert torch.equal(again.get(5)[0], shards[1].get(5)[0])  # a pure function of the iteration


# ---- networks -----------------------------------------------------------------------------

def test_mlp_generators_are_independent_members():
    torch.manual_seed(0)
    gens = common.MLPGenerators(3, 8, (1, 4, 4), hidden=(16, 32))
    z = torch.randn(5, 8)
    out = gens(z)
    assert out.shape == (3, 5, 1, 4, 4)
    out[0].sum().backward()
    for p in gens.parameters():
        if p.dim() == 3:  # stacked (K, in, out) weights and (K, 1, out) biases
            assert p.grad[0].abs().sum() > 0 and p.grad[1:].abs().sum() == 0
    single = common.MLPGenerators(1, 8, (1, 4, 4), hidden=(16, 32))
    with torch.no_grad():
        for (name, p), q in zip(gens.named_parameters(), single.parameters()):
            q.copy_(p[1:2] if p.dim() == 3 else p.view(3, -1)[1])
    assert torch.allclose(single(z)[0], out[1], atol=1e-6)  # member 1 == a lone generator


def test_dcgan_generators_grouped_members_match_single_nets():
    torch.manual_seed(0)
    gens = common.DCGANGenerators(2, 8, 16, 3, ngf=4)
    single = common.DCGANGenerators(1, 8, 16, 3, ngf=4)
    z = torch.randn(2, 6, 8)
    with torch.no_grad():
        for p, q in zip(gens.parameters(), single.parameters()):
            q.copy_(p.view(2, -1, *p.shape[1:])[1].reshape(q.shape) if p.dim() > 1 else p.view(2, -1)[1])
        assert torch.allclose(gens(z)[1], single(z[1:2])[0], atol=1e-5)
    assert gens(z).shape == (2, 6, 3, 16, 16)


def test_dcgan_image_size_must_be_power_of_two():
    with pytest.raises(common.UserError, match='power of two'):
        common.DCGANGenerators(1, 8, 24, 1)
    with pytest.raises(common.UserError, match='power of two'):
        common.DCGANDiscriminator(8, 1)


def test_sampling_restores_batch_norm_statistics():
    gens = common.MLPGenerators(2, 4, (2,), hidden=(8, 8))
    before = [b.clone() for b in gens.buffers()]
    with common.sampling(gens):
        out = gens(torch.randn(16, 4))
    assert not out.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, gens.buffers()))


# ---- checkpoints ----------------------------------------------------------------------------

def make_args(tmp_path, **kw):
    args = common.base_parser('t').parse_args(['--out_dir', str(tmp_path / 'run')])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_checkpoint_killed_while_writing_keeps_the_previous_one(tmp_path, monkeypatch):
    run = common.Run(make_args(tmp_path), 'test')
    net = torch.nn.Linear(3, 3)
    run.save_checkpoint(9, net=net)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1)

    def killed(obj, path):  # the process dies half-way through writing
        with open(path, 'wb') as f:
            f.write(b'half a checkpoint')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', killed)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(19, net=net)
    state = torch.load(run.ckpt_path, weights_only=False)
    assert state['iteration'] == 10 and torch.equal(state['net']['weight'], first['weight'])


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = common.Run(make_args(tmp_path), 'test')
    net = torch.nn.Linear(3, 3)
    run.save_checkpoint(4, net=net)
    with torch.no_grad():
        net.weight[0, 0] = float('nan')   # diverged between two log lines: the weights tell
    with pytest.raises(common.UserError, match=r'net weights became NaN/inf by iteration 10; the last good'):
        run.save_checkpoint(9, net=net)
    assert torch.load(run.ckpt_path, weights_only=False)['iteration'] == 5
    run.n_iters, run.per_epoch = 100, 10
    with pytest.raises(common.UserError, match=r'D loss became NaN/inf by iteration 12'):
        run.log(11, {'D': torch.tensor(float('inf')), 'G': torch.tensor(0.5)})


def test_new_run_folders_are_numbered_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = common.new_run_folder('script', 'digits')
    b = common.new_run_folder('script', 'digits')
    assert a.endswith('digits-001') and b.endswith('digits-002')
    for name in ('digits-999', 'digits-1000', 'digits-002'):   # --resume last: the highest number
        (tmp_path / 'runs' / 'script' / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / 'runs' / 'script' / name / 'ckpt.pt').write_bytes(b'')
    assert common.last_run_folder('script', 'digits').endswith('digits-1000')


def test_fp16_keeps_one_grad_scaler_per_optimizer_and_checkpoints_them(tmp_path):
    """fp16 (GPUs without bf16): a net with rank-local gradients must not move the scale of a net
    whose gradients DDP averages, so each optimizer has its own scaler; resume restores each."""
    run = common.Run(make_args(tmp_path), 'test')
    run.fp16_scaling = True                       # as on a GPU without bf16 (the CPU would use bf16)
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), 0.1), torch.optim.SGD(b.parameters(), 0.1)
    run.step(a(torch.ones(1, 2)).sum(), opt_a)
    run.step(b(torch.ones(1, 2)).sum() * float('inf'), opt_b)   # overflow: only b's scale halves
    assert run.scaler_for(opt_a).get_scale() == 65536.0 and run.scaler_for(opt_b).get_scale() == 32768.0
    class View:   # a checkpoint view of an optimizer, as pmgan's PerGenerator (.obj)
        def __init__(self, obj):
            self.obj = obj

        def state_dict(self):
            return self.obj.state_dict()

        def load_state_dict(self, state):
            self.obj.load_state_dict(state)
    run.save_checkpoint(0, a=a, b=b, opt_a=opt_a, opt_b=View(opt_b))
    assert set(torch.load(run.ckpt_path, weights_only=False)['scalers']) == {'opt_a', 'opt_b'}
    args = make_args(tmp_path, resume=str(tmp_path / 'run'))
    again = common.Run(args, 'test')
    again.fp16_scaling, again.n_iters = True, 5
    fresh_a, fresh_b = torch.optim.SGD(a.parameters(), 0.1), torch.optim.SGD(b.parameters(), 0.1)
    assert again.resume(a=a, b=b, opt_a=fresh_a, opt_b=View(fresh_b)) == 1
    assert again.scaler_for(fresh_b).get_scale() == 32768.0 and again.scaler_for(fresh_a).get_scale() == 65536.0


# ---- metrics -------------------------------------------------------------------------------

def test_mode_coverage_2d_hand_made():
    centres, std = common.toy_centres('ring8')
    samples = torch.cat([centres[0].repeat(6, 1), centres[3].repeat(3, 1),  # two modes hit
                         centres[5].repeat(3, 1) + 2.9 * std,                 # 4.1 std away: not HQ
                         torch.tensor([[0.0, 0.0]] * 4)])                     # far from every mode
    out = common.mode_coverage_2d(samples, centres, std)
    assert out['modes_covered'] == 2
    assert out['hq_fraction'] == pytest.approx(9 / 16)
    p = torch.tensor([6 / 9, 3 / 9])
    assert out['kl_uniform'] == pytest.approx(float((p * (p * 8).log()).sum()), rel=1e-6)
    uniform = common.mode_coverage_2d(centres.repeat(5, 1), centres, std)
    assert uniform == {'modes_covered': 8, 'hq_fraction': 1.0, 'kl_uniform': pytest.approx(0.0, abs=1e-9)}


def test_stacked_modes_hand_made():
    triples = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0], [9, 9, 9]])
    out = common.stacked_modes(triples)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert out['modes_covered'] == 3
    assert out['kl_uniform'] == pytest.approx(float((p * (p * 1000).log()).sum()), rel=1e-6)


def test_digit_classifier_is_accurate_and_cached(data_root):
    net = common.digit_classifier('digits', data_root, 'cpu', verbose=False)
    data = common.load_data('digits', img_size=32)
    x, y = data.batch(slice(None))
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95
    assert os.path.exists(os.path.join(data_root, 'digit_classifier_digits.pt'))


# ---- copying a script, --ddp, bad input after the run folder ---------------------------------

def test_a_script_copied_with_common_alone_runs(tmp_path, data_root):
    """A script copied beside common.py runs (digits: with data/digits.npz); fid.py is
    needed only for --fid_every, and its absence is a one-line error."""
    for name in ('racing_wgan.py', 'common.py', 'data/digits.npz'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    # the session's trained digit classifier (training it again is 25 s of the same code)
    shutil.copy(os.path.join(data_root, 'digit_classifier_digits.pt'), tmp_path / 'data')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH='')
    args = ['--n_iters', '3', '--img_size', '8', '--eval_samples', '100', '--data_root', str(tmp_path / 'data')]
    result = subprocess.run([sys.executable, 'racing_wgan.py'] + args, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'fd_digits' in json.loads(next((tmp_path / 'runs').rglob('summary.json')).read_text())
    result = subprocess.run([sys.executable, 'racing_wgan.py', '--fid_every', '1'] + args, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, '--fid_every needs fid.py')


def test_ddp_flag_alone_runs_a_one_process_group(tmp_path, monkeypatch, data_root):
    calls = []
    real_init = common.dist.init_process_group
    monkeypatch.setattr(common.dist, 'init_process_group', lambda *a, **k: calls.append(k) or real_init(*a, **k))
    racing_wgan = load_script('racing_wgan')
    run_main(racing_wgan, ['--ddp', '--n_iters', '2', '--img_size', '8', '--eval_samples', '100',
                           '--data_root', data_root, '--out_dir', tmp_path / 'r'], monkeypatch)
    assert calls and calls[0]['world_size'] == 1 and not common.dist.is_initialized()   # torn down at the end
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['iterations'] == 2


def test_bad_data_after_the_run_folder_leaves_no_empty_folder(tmp_path):
    (tmp_path / 'empty').mkdir()
    result = run_script('g_advantage_dcgan', ['--dataset', 'folder', '--data_root', tmp_path / 'empty'], cwd=tmp_path)
    assert_one_line_error(result, 'no images')
    assert not (tmp_path / 'runs').exists() or not list((tmp_path / 'runs').rglob('args.json'))


def test_fd_digits_distance_equals_fid_py():
    """common's Frechet distance (kept so a script runs without fid.py) against fid.py's."""
    import fid
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ours = common.gaussian_frechet_distance(*stats[0], *stats[1])
    assert ours == pytest.approx(fid.frechet_distance(*stats[0], *stats[1]), rel=1e-9)
    assert common.gaussian_frechet_distance(np.zeros(3), np.diag([1.0, 4.0, 9.0]), np.ones(3),
                                            np.diag([4.0, 1.0, 9.0])) == pytest.approx(3 + 1 + 1 + 0)


def burn_cpu(seconds):
    began = time.process_time()
    while time.process_time() - began < seconds:
        sum(i * i for i in range(1000))


def test_training_clock_counts_cpu_time_and_leaves_evaluation_out():
    clock = common.TrainingClock()
    clock.start(seconds_before=5.0)     # a resumed run: the checkpoint's training seconds
    burn_cpu(0.2)
    with clock.evaluating():
        burn_cpu(0.3)
    burn_cpu(0.1)
    assert 5.3 <= clock.seconds() < 5.38
