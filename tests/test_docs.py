"""The documentation is checked like code: every command line in README.md and docs/*.md parses with
its script's own argument parser (a renamed or removed flag fails here), every relative link and
image points to a file that exists, no file refers to documents outside the repository, the
README stays short, and the README's main command runs."""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess

import pytest
import torch

from conftest import REPO, load_script, run_script

SCRIPTS = ('racing_wgan', 'racing_dcgan', 'pmgan', 'auction_gan', 'g_advantage_dcgan', 'biggan_sn', 'fid')
DOCS = ['README.md'] + sorted(os.path.join('docs', f) for f in os.listdir(os.path.join(REPO, 'docs'))
                              if f.endswith('.md'))
SHELL_OPERATORS = {'&&', '||', ';', '|', '&', '>', '>>', '<', '2>', '2>&1'}
README_MAX_LINES = 320


def read(path):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
        return f.read()


def code_texts(markdown):
    """The text of every fenced code block (continuation lines joined, one command per line) and
    every inline code span."""
    texts, rest = [], []
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith('```'):
            in_fence = not in_fence
            rest.append('')
            continue
        (texts if in_fence else rest).append(line)
    fenced = '\n'.join(texts).replace('\\\n', ' ')
    inline = re.findall(r'`([^`]+)`', '\n'.join(rest))
    return fenced.splitlines() + [' '.join(span.split()) for span in inline]


def commands(path):
    """(text, program, argv) for every `python X.py ...` or `torchrun ... X.py ...` in a file:
    program is the .py path as written, argv the arguments up to the next shell operator.
    Environment prefixes (OMP_NUM_THREADS=1), `time`, torchrun's own options and shell comments
    are dropped; `python -m <module>` (pytest, pytorch_fid) is not a script command."""
    found = []
    for text in code_texts(read(path)):
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError:            # not shell (an unbalanced quote in prose)
            continue
        segment = []
        for t in tokens + [';']:
            if t not in SHELL_OPERATORS:
                segment.append(t)
                continue
            launch = [i for i, w in enumerate(segment) if os.path.basename(w) in ('python', 'python3', 'torchrun')]
            if launch:
                after = segment[launch[0] + 1:]
                module = after[:1] == ['-m'] and after[1:2] != ['torch.distributed.run']
                scripts = [i for i, w in enumerate(after) if w.endswith('.py')]
                if scripts and not module:
                    found.append((text, after[scripts[0]], after[scripts[0] + 1:]))
            segment = []
    return found


ALL_COMMANDS = [(path, text, program, argv) for path in DOCS for text, program, argv in commands(path)]


@pytest.fixture(scope='module')
def parsers():
    out = {}
    for name in SCRIPTS:
        module = load_script(name)
        parser = module._parser() if name == 'fid' else module.parser
        parser.allow_abbrev = False   # a flag written in the docs must be spelled out in full
        out[name] = parser
    return out


def test_the_docs_have_commands_for_every_script():
    named = {os.path.basename(program)[:-3] for _, _, program, _ in ALL_COMMANDS}
    assert set(SCRIPTS) <= named, f'no command for {set(SCRIPTS) - named}'


@pytest.mark.parametrize('path, text, program, argv', ALL_COMMANDS,
                         ids=[f'{p}:{t[:60]}' for p, t, _, _ in ALL_COMMANDS])
def test_every_command_parses_with_its_own_parser(parsers, path, text, program, argv):
    name = os.path.basename(program)[:-3]
    if name not in SCRIPTS:   # bench/ and tools/ commands: the file must exist
        assert os.path.isfile(os.path.join(REPO, program)), f'{path}: {program} does not exist ({text})'
        return
    assert os.path.normpath(program) == f'{name}.py', f'{path}: run {name}.py from the repository root ({text})'
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsers[name].parse_args(argv)
    except SystemExit as e:
        pytest.fail(f'{path}: `{text}` does not parse (exit {e.code}): {stderr.getvalue().strip()}')


def test_a_renamed_flag_would_fail(parsers):
    """The check above has teeth: a flag the parser does not know is refused."""
    for argv in (['--n_generators', '2'], ['--n_ge', '2']):   # unknown, and abbreviated
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            parsers['racing_wgan'].parse_args(argv)


# ---- links ---------------------------------------------------------------------------------

def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r'`|\*\*?|<[^>]+>', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path):
    seen, out = {}, set()
    in_fence = False
    for line in read(path).splitlines():
        if line.lstrip().startswith('```'):
            in_fence = not in_fence
        if in_fence or not re.match(r'#{1,6} ', line):
            continue
        base = slug(line.lstrip('#'))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f'{base}-{n}')
    return out


def links(path):
    text = re.sub(r'```.*?```', '', read(path), flags=re.S)   # code blocks hold no links
    text = re.sub(r'`[^`]*`', '', text)
    return re.findall(r'\]\(([^)\s]+)\)', text) + re.findall(r'<img[^>]*\ssrc="([^"]+)"', text)


RESULTS = sorted(os.path.join('bench', 'results', f) for f in os.listdir(os.path.join(REPO, 'bench', 'results'))
                 if f.endswith('.md'))
ALL_LINKS = [(path, target) for path in DOCS + RESULTS for target in links(path)
             if not re.match(r'[a-z]+:', target)]    # http(s):, mailto:


def test_the_docs_link_somewhere():
    assert len(ALL_LINKS) > 50


@pytest.mark.parametrize('path, target', ALL_LINKS, ids=[f'{p}->{t}' for p, t in ALL_LINKS])
def test_every_relative_link_and_image_exists(path, target):
    file, _, fragment = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
    assert os.path.exists(os.path.join(REPO, resolved)), f'{path}: {target} -> {resolved} does not exist'
    if fragment and resolved.endswith('.md'):
        assert fragment in anchors(resolved), f'{path}: no heading #{fragment} in {resolved}'


def test_external_links_are_arxiv_abstracts_only():
    """Only links known to be stable: arXiv abstract pages."""
    for path in DOCS:
        for target in links(path):
            if re.match(r'[a-z]+:', target):
                assert re.fullmatch(r'https://arxiv\.org/abs/\d{4}\.\d{5}', target), f'{path}: {target}'


# ---- no references to documents outside the repository --------------------------------------

# Built so that this file does not match itself: the parent folder's shared notes, the design
# notes, the seed papers by number, and their folder.
OUTSIDE = re.compile('|'.join([r'\.\./' + 'shared', 'DESIG' + 'N', '(?i:seed 00' + '[0-4])', 'seed' + 's/']))


def repository_files():
    try:
        listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):   # not a git checkout: walk it
        listed = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if not d.startswith('.') or d == '.ci']
            dirs[:] = [d for d in dirs if d not in ('runs', '__pycache__', 'data')]
            listed += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
    venvs = {f.split(os.sep)[0] for f in listed if os.path.basename(f) == 'pyvenv.cfg'}   # a local virtualenv
    return [f for f in listed if (f.endswith(('.py', '.md', '.sh')) or f == os.path.join('.ci', 'run'))
            and f.split(os.sep)[0] not in venvs and 'site-packages' not in f]


def test_no_file_refers_to_documents_outside_the_repository():
    files = repository_files()
    assert 'README.md' in files and os.path.join('tests', 'test_docs.py') in files
    hits = []
    for path in files:
        full = os.path.join(REPO, path)
        if not os.path.isfile(full):   # listed but deleted in the work tree
            continue
        with open(full, encoding='utf-8', errors='replace') as f:
            for number, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    hits.append(f'{path}:{number}: {line.strip()[:100]}')
    assert not hits, 'references to documents outside the repository:\n' + '\n'.join(hits)


def test_the_outside_pattern_catches_what_it_should():
    for text in ('see ' + '../' + 'shared/x.md', 'DESIG' + 'N section 4', '(seed ' + '003)', 'the seed' + 's/ folder'):
        assert OUTSIDE.search(text), text
    for text in ('--seed 0', 'seeds 0, 1, 2', '3 seeds each', 'seed 0;', 'design choices'):
        assert not OUTSIDE.search(text), text


# ---- the README itself -----------------------------------------------------------------------

def test_readme_is_short():
    lines = read('README.md').count('\n')
    assert lines <= README_MAX_LINES, f'README.md has {lines} lines; move detail to docs/'


def test_readme_states_the_two_commands_and_the_gpu_caveat():
    readme = read('README.md')
    assert 'python racing_wgan.py --n_gen 2' in readme
    assert 'pip install -r requirements-dev.txt && python -m pytest -q tests' in readme
    assert 'have not been run on a GPU' in ' '.join(readme.split())


def test_the_readme_main_command_runs(tmp_path):
    """`python racing_wgan.py --n_gen 2`, cut to a few iterations, on the embedded digits: it trains,
    writes its run folder and summary. An untrained digit classifier stands in for the cached one
    (training it takes half a minute; its quality does not matter here)."""
    import common
    main = next(argv for path, _, program, argv in ALL_COMMANDS
                if path == 'README.md' and program == 'racing_wgan.py' and argv == ['--n_gen', '2'])
    data_root = tmp_path / 'data'
    data_root.mkdir()
    torch.manual_seed(0)
    torch.save(common.DigitClassifier().state_dict(), data_root / 'digit_classifier_digits.pt')
    out = tmp_path / 'run'
    result = run_script('racing_wgan', main + ['--n_iters', 5, '--eval_samples', 200, '--out_dir', out,
                                               '--data_root', data_root], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '[ETA ' in result.stdout
    for name in ('args.json', 'metrics.csv', 'ckpt.pt', 'ckpt_best.pt', 'summary.json', 'metrics.png'):
        assert (out / name).exists(), name
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['iterations'] == 5 and 'fd_digits' in summary and summary['best_iteration'] == 5


def test_the_readme_leaderboard_is_the_results_files():
    """The README's leaderboard table is copied from bench/results/leaderboard.md, not retyped."""
    readme = read('README.md').split('## Leaderboard', 1)[1].split('\n## ', 1)[0]
    table = [line for line in readme.splitlines() if line.startswith('|')]
    results = read(os.path.join('bench', 'results', 'leaderboard.md')).splitlines()
    assert len(table) >= 4 and all(line in results for line in table)
