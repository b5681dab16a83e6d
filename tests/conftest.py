"""Shared test helpers: run a script in-process or as a subprocess, or under torchrun."""
import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(1)  # CI has 2 cores; tests run several processes at once


def load_script(name):
    """Import a top-level script (e.g. 'racing_wgan') as a module without running main()."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, args, monkeypatch):
    """Call module.main() with these command-line args (in the current process)."""
    monkeypatch.setattr(sys, 'argv', [module.__name__ + '.py'] + [str(a) for a in args])
    module.main()


def run_script(name, args, cwd, timeout=300, env=None):
    """Run `python name.py args` in a subprocess; returns the CompletedProcess (text)."""
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, f'{name}.py')] + [str(a) for a in args],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_in_process(module, args, cwd, monkeypatch, capsys):
    """run_script without starting an interpreter (3 s a time on CI): module.main() under
    common.run_main, with sys.argv and the working directory set; returns a CompletedProcess. For
    errors that need no real process; each script keeps real-process tests for the rest."""
    import common
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [module.__name__ + '.py'] + [str(a) for a in args])
    capsys.readouterr()
    code = 0
    try:
        common.run_main(module.main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, code, captured.out, captured.err)


def run_fid_cli(capsys, *argv):
    """fid.py's command line in this process: (exit code, stdout lines, non-empty stderr lines)."""
    import fid
    rc = fid.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), [line for line in cap.err.splitlines() if line]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_torchrun(name, args, cwd, nproc=2, timeout=300):
    """Run a repo script (or a .py path) under torchrun with `nproc` CPU processes (gloo)."""
    script = name if name.endswith('.py') else os.path.join(REPO, f'{name}.py')  # a path, or a repo script
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
           f'--master_port={free_port()}', script] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *words):
    """Non-zero exit, no traceback, one line on stderr that mentions each of `words`."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """A data root shared by the session, with the digits classifier trained once."""
    import common
    root = str(tmp_path_factory.mktemp('data_root'))
    common.digit_classifier('digits', root, 'cpu', verbose=False)
    return root


@pytest.fixture(scope='session')
def fid_torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random FID Inception weights under the real file's name
    (offline stand-in: real scores need the real weights)."""
    import fid
    home = tmp_path_factory.mktemp('torch_home')
    path = home / 'hub' / 'checkpoints' / fid.WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    torch.save(fid.random_weights(0), path)
    return str(home)


RANK_DUMP_DRIVER = '''
import sys, torch, common
sys.path.insert(0, {repo!r})
module = __import__({name!r})
save = common.Run.save_checkpoint
def save_and_dump(self, iteration, which='last', **objects):
    """Also write this rank's own copy of every checkpointed object to rank<R>.pt."""
    save(self, iteration, which, **objects)
    if which == 'last':
        states = {{k: common.unwrap(v).state_dict() for k, v in (objects or self.objects).items()}}
        torch.save(states, f'rank{{self.rank}}.pt')
common.Run.save_checkpoint = save_and_dump
common.run_main(module.main)
'''


def run_torchrun_dumping_ranks(name, args, cwd, nproc=2, timeout=300):
    """torchrun a repo script; each rank also dumps its checkpointed state dicts to cwd/rank<R>.pt
    (the last checkpoint wins), so tests can compare the ranks' parameters."""
    driver = os.path.join(str(cwd), f'_driver_{name}.py')
    with open(driver, 'w') as f:
        f.write(RANK_DUMP_DRIVER.format(repo=REPO, name=name))
    result = run_torchrun(driver, args, cwd, nproc=nproc, timeout=timeout)
    ranks = [torch.load(os.path.join(str(cwd), f'rank{r}.pt'), weights_only=False)
             for r in range(nproc) if os.path.exists(os.path.join(str(cwd), f'rank{r}.pt'))]
    return result, ranks
