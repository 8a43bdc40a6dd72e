"""The README and the documentation site are what runs: their commands,
their code, their tables.

The README's first two commands (the demo and the tests) and `.ci/run`;
every Python block of the README and of the site's pages (unless marked not
executed); the `LayoutMap` lines and the error table (error_cases.py) of the
guides; the performance tables (benchmarks/*.json); the site's strict build.
"""

import ast
import contextlib
import glob
import io
import os
import re
import subprocess
import sys
import tokenize
from html import unescape

import pytest

from error_cases import CASES
from helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", readme(), re.S)


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("keras-relattn-demo")
    assert "python tests/run_all_backends.py" in tests
    assert "torch==2.13.0" in tests.split(".[test]")[0]  # pinned torch first


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert readme_commands()[1] in ci


DOCUMENTS = ["README.md"] + sorted(
    os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                      recursive=True)
)


def text_of(document):
    with open(os.path.join(ROOT, document)) as f:
        return f.read()


def python_blocks():
    """`(document, index, code, backend)` of every Python block to run.

    A block marked `<!-- not executed ... -->` is not run (say why, and where
    it is tested); one marked `<!-- backend: NAME -->` (the serving guide's
    exports) runs in that backend's run only: its page says which backend it
    is for."""
    blocks = []
    for document in DOCUMENTS:
        pattern = r"(<!--[^>]*-->\n)?```python\n(.*?)\n```"
        for index, match in enumerate(re.finditer(pattern, text_of(document), re.S)):
            comment = match.group(1) or ""
            if "not executed" in comment:
                continue
            backend = re.search(r"backend: (\w+)", comment)
            blocks.append((document, index, match.group(2), backend and backend.group(1)))
    return blocks


BLOCKS = python_blocks()


def stated_prints(code):
    """What each top-level `print(...)` of a block says it prints: the comment
    ending the statement's last line, or alone on the line after it (every
    print must state it)."""
    comments = {
        token.start[0]: token.string[1:].strip()
        for token in tokenize.generate_tokens(io.StringIO(code).readline)
        if token.type == tokenize.COMMENT
    }
    stated = []
    for node in ast.parse(code).body:
        call = getattr(node, "value", None)
        if isinstance(node, ast.Expr) and isinstance(call, ast.Call) and \
                getattr(call.func, "id", None) == "print":
            line = node.end_lineno if node.end_lineno in comments else node.end_lineno + 1
            assert line in comments, (
                f"line {node.end_lineno}: a print must state what it prints in a comment")
            stated.append(comments[line])
    return stated


@pytest.mark.parametrize("document, index, code, backend", BLOCKS,
                         ids=[f"{document}-{index}" for document, index, _, _ in BLOCKS])
def test_python_block_runs_and_prints_what_it_states(document, index, code, backend):
    if backend and backend != BACKEND:
        pytest.skip(f"the page's code for the {backend} backend (this run: {BACKEND})")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{document} block {index}", "exec"), {})
    assert printed.getvalue().splitlines() == stated_prints(code)


def test_blocks_marked_for_a_backend_name_one():
    """A typo in `<!-- backend: ... -->` would skip its block on every run."""
    marked = [(document, backend) for document, _, _, backend in BLOCKS if backend]
    assert marked
    assert {backend for _, backend in marked} <= {"tensorflow", "jax", "torch"}, marked
    serving = {backend for document, backend in marked if document.endswith("serving.md")}
    assert serving == {"tensorflow", "jax", "torch"}, serving


def test_stated_prints_are_read_from_the_comments():
    code = "x = 1  # not a print\nprint(x,\n      x + 1)  # 1 2\nprint('#')  # #\nprint(x)\n# 1\n"
    assert stated_prints(code) == ["1 2", "#", "1"]
    with pytest.raises(AssertionError, match="must state"):
        stated_prints("print(1)\n")


def test_the_guides_layout_map_is_the_one_tested():
    with open(os.path.join(ROOT, "tests", "distribution_check.py")) as f:
        check = f.read()
    lines = re.findall(r'^layouts\["[^\n]*', text_of("docs/guides/keras.md"), re.M)
    assert lines
    for line in lines:
        assert line.strip() in check.replace("    layouts", "layouts"), line


def test_the_errors_guide_has_the_error_table():
    text = text_of("docs/guides/errors.md")
    for case in CASES:
        assert f"| {case.situation} | `{case.error.__name__}` |" in text


def test_readme_is_a_short_path():
    assert len(readme().splitlines()) <= 150


def prose_of(markdown):
    """A page's text outside code blocks and code spans."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


def test_prose_writes_no_power_markdown_would_bold():
    """`2**23` outside code renders "2" + bold "23"... (Markdown's `**`)."""
    for document in DOCUMENTS:
        found = re.findall(r"\w\*\*\w", prose_of(text_of(document)))
        assert not found, (document, found)


# The characters of code a line of the site's text column holds at 1280 px
# (docs/stylesheets/extra.css), as keras.io's: longer lines would scroll.
CODE_COLUMNS = 85


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the site is built from the sources "
                    "(mkdocstrings reads them without importing): once, in the TensorFlow run")
def test_the_site_builds_strictly_and_reads_right(tmp_path):
    """`mkdocs build --strict` (a broken reference, link or docstring fails),
    then what a reader meets: install and a quick start on the home page,
    `RelativeAttention.call` in the reference, a type on every parameter and
    return row, no private names, guides with sections."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "api/relative_attention/index.html", "guides/keras/index.html",
                 "guides/deberta/index.html"):
        assert (tmp_path / page).exists(), page
    def read(page):  # the text a reader sees, code highlighting's tags dropped
        return re.sub(r"<[^>]+>", "", (tmp_path / page).read_text())

    home = read("index.html")
    assert "pip install" in home and "sequence_positions" in home
    assert "pip install torch" in read("install/index.html")
    reference = (tmp_path / "api" / "relative_attention" / "index.html").read_text()
    assert 'id="keras_relattn.RelativeAttention.call"' in reference
    assert "query_positions" in reference and "position_embedding_shape" in reference
    untyped = []
    for page in sorted((tmp_path / "api").glob("*/index.html")):
        html = page.read_text()
        assert "Bases:" not in html, page
        items = re.findall(r'<li class="doc-section-item[^"]*">(.*?)</li>', html, re.S)
        assert items, page
        for item in items:
            # "name (type) – text" for an argument, "type – text" for a return
            head = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", item.split("–")[0])).strip()
            named = re.match(r"^(\*{0,2}\w+)( \(.+\))?$", head)
            if not head or (named and not named.group(2) and "<b>" in item.split("–")[0]
                            and not named.group(1).startswith("*")):
                untyped.append((page.parent.name, head or item[:80]))
    assert not untyped, untyped
    import inspect

    from keras_relattn import config, deberta, positions

    for module in (config, deberta, positions):  # their pages list members by name
        page = (tmp_path / "api" / module.__name__.split(".")[-1] / "index.html").read_text()
        public = [name for name, value in vars(module).items()
                  if name in getattr(module, "__all__", [name]) and not name.startswith("_")
                  and (inspect.isclass(value) or inspect.isfunction(value))
                  and value.__module__ == module.__name__]
        assert public, module
        for name in public:
            assert f'id="{module.__name__}.{name}"' in page, f"{module.__name__}.{name}"
    for page in sorted((tmp_path / "api").glob("*/index.html")):
        text = unescape(re.sub(r"<[^>]+>", "", page.read_text()))
        private = re.findall(r"(?<![\w.*])_[a-z]\w*", text)  # `_bucket_edges`, ...
        assert not private, (page.parent.name, private)
        # `2**23` in a docstring's prose renders "2", then "23..." in bold
        bold = re.findall(r"\w<strong>", page.read_text())
        assert not bold, (page.parent.name, bold)
    wide = []
    for page in sorted(tmp_path.glob("**/index.html")):
        for block in re.findall(r'<div class="([^"]*)highlight[^"]*"><pre[^>]*>(.*?)</pre>',
                                page.read_text(), re.S):
            if "wrap" in block[0].split():  # wraps its long lines (CSS)
                continue
            text = unescape(re.sub(r"<[^>]+>", "", block[1]))
            wide += [(str(page.relative_to(tmp_path)), line) for line in text.splitlines()
                     if len(line) > CODE_COLUMNS]
    assert not wide, wide
    performance = (tmp_path / "performance" / "index.html").read_text()
    assert not re.search(r"\b_(kernels|blockwise|backend)\b", performance)
    for guide in sorted((tmp_path / "guides").glob("*/index.html")):
        assert len(re.findall(r"<h2 ", guide.read_text())) >= 2, guide  # sections


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the demo is the README's first command, "
                    "on the default backend (TensorFlow); the layer runs on every backend in "
                    "the other modules")
def test_demo_prints_its_own_lines_only():
    """`keras-relattn-demo` (the module behind it): no TensorFlow start-up
    notices around them."""
    done = subprocess.run(
        [sys.executable, "-m", "keras_relattn_demo"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, KERAS_BACKEND=BACKEND), timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert lines[0].startswith("keras ") and lines[-1] == "ok", lines
    assert not [line for line in lines if "oneDNN" in line or "absl" in line], lines


def test_readme_performance_tables_are_the_benchmark_runs():
    """The README's numbers are the JSON runs in benchmarks/, not hand-copied."""
    import runpy

    script = runpy.run_path(os.path.join(ROOT, "benchmarks", "readme_tables.py"))
    for key, text in script["tables"]().items():  # each in the document it belongs to
        document = script["DOCUMENTS"][key]
        with open(os.path.join(ROOT, document)) as f:
            assert f"<!-- {key} -->\n{text}\n" in f.read(), f"{document}: table {key} is stale"
