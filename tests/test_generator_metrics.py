"""Quality figures per generator and their overlap; precision/recall/density/coverage in training."""
import json
from types import SimpleNamespace

import pytest
import torch

import common
import fid
from conftest import load_script, run_main


def evaluator(name, n_gen, data_root='unused', n=400):
    args = SimpleNamespace(eval_samples=n, seed=0, eval_interval=0, fid_every=0, generate=None, data_root=data_root)
    return common.Evaluator(common.load_data(name, img_size=16), args, torch.device('cpu'), n_gen=n_gen)


def ring8_sampler(modes_of_each):
    """A hand-made sampler: generator k puts its points on the ring8 modes modes_of_each[k], in turn."""
    centres, std = common.toy_centres('ring8')

    def sample_each(n, classes=None):
        out = []
        for modes in modes_of_each:
            pick = torch.tensor(modes)[torch.arange(n) % len(modes)]
            out.append(centres[pick] + 0.1 * std * torch.randn(n, 2))
        return torch.stack(out)
    return sample_each


def test_overlap_is_one_for_the_same_modes_and_zero_for_disjoint_ones():
    ev = evaluator('ring8', 2)
    same = ev.per_generator_metrics(ring8_sampler([[0, 1, 2], [0, 1, 2]]))
    split = ev.per_generator_metrics(ring8_sampler([[0, 1, 2, 3], [4, 5, 6, 7]]))
    assert same['overlap_mean'] == same['overlap_max'] == 1.0
    assert split['overlap_mean'] == split['overlap_max'] == 0.0
    assert (same['modes_covered'], same['modes_covered_0'], same['modes_covered_1']) == (3, 3, 3)
    assert (split['modes_covered'], split['modes_covered_0'], split['modes_covered_1']) == (8, 4, 4)
    half = ev.per_generator_metrics(ring8_sampler([[0, 1], [1, 2]]))   # one shared of three covered
    assert half['overlap_mean'] == pytest.approx(1 / 3)
    # every generator's precision/recall/density/coverage on the points, beside the mixture's
    assert {'precision_2d', 'recall_2d', 'density_2d', 'coverage_2d', 'coverage_2d_0', 'precision_2d_1'} <= set(split)
    assert split['coverage_2d'] > 2 * max(split['coverage_2d_0'], split['coverage_2d_1']) * 0.9   # halves


def test_the_mixtures_figures_are_those_of_the_pooled_samples():
    ev = evaluator('ring8', 3)
    sample_each = ring8_sampler([[0], [1, 2], [3, 4, 5]])
    out = ev.evaluate(None, sample_each)   # under the evaluation's fixed noise
    with ev.fixed_rng():
        each = sample_each(-(-ev.sample_count() // 3))
    pooled = ev.figures(common.mixture(each, ev.sample_count()))[0]
    assert pooled['modes_covered'] == out['modes_covered'] == 6
    assert pooled['hq_fraction'] == pytest.approx(out['hq_fraction'])
    assert pooled['coverage_2d'] == pytest.approx(out['coverage_2d'])
    # and the mixture interleaves equal shares
    assert torch.equal(common.mixture(torch.arange(6).view(3, 2), 5), torch.tensor([0, 2, 4, 1, 3]))


def test_digits_classes_count_as_covered_from_five_percent(data_root):
    ev = evaluator('digits', 2, data_root, n=200)
    real, labels = ev.data.batch(slice(None), augment=False)
    zeros, others = real[labels == 0], real[labels != 0]

    def sample_each(n, classes=None):   # G0: only zeros; G1: zeros and 3% of other digits
        g1 = torch.cat([zeros[:n - n * 3 // 100], others[:n * 3 // 100]])
        return torch.stack([zeros[:n], g1])
    out = ev.per_generator_metrics(sample_each)
    assert out['overlap_mean'] == 1.0   # G1's other classes hold under 5% each: not covered
    assert {'fd_digits_0', 'fd_digits_1', 'precision_digits', 'coverage_digits_1'} <= set(out)
    assert out['coverage_digits_0'] < 0.3 and out['precision_digits_0'] > 0.8   # one class: precise, little coverage


def test_training_runs_report_prdc_on_digits_and_per_generator(tmp_path, monkeypatch, data_root):
    racing_dcgan = load_script('racing_dcgan')
    run_main(racing_dcgan, ['--n_iters', 2, '--img_size', 16, '--batch_size', 8, '--latent_dim', 8, '--ngf', 4,
                            '--ndf', 4, '--eval_samples', 100, '--log_interval', 1, '--sample_interval', 0,
                            '--data_root', data_root, '--out_dir', tmp_path / 'run'], monkeypatch)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    for name in ('fd_digits', 'precision_digits', 'recall_digits', 'density_digits', 'coverage_digits'):
        assert name in summary and f'{name}_0' in summary and f'{name}_1' in summary
    assert 0 <= summary['overlap_mean'] <= summary['overlap_max'] <= 1
    header = (tmp_path / 'run' / 'metrics.csv').read_text().splitlines()[0]
    assert 'coverage_digits_1' in header and 'overlap_max' in header


def test_prdc_is_skipped_with_a_note_when_fid_py_is_absent(monkeypatch, capsys):
    ev = evaluator('ring8', 1)
    monkeypatch.setattr(common, 'FID_MISSING_NOTED', False)
    monkeypatch.setitem(__import__('sys').modules, 'fid', None)   # import fid -> ImportError
    out = ev.figures(ring8_sampler([[0, 1]])(50)[0])[0]
    assert 'precision_2d' not in out and 'modes_covered' in out
    assert 'need fid.py' in capsys.readouterr().out
    assert fid.prdc   # the real module is untouched
