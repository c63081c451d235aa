"""The documentation cannot drift from the code: every visible Python block of the
README and of the docs pages runs as pasted, alone, in a fresh interpreter.

What a reader sees is what runs. A page can use:

* a collapsible set-up block: a Python block inside ``??? example "Set-up ..."``
  (``pymdownx.details``, on the site) or ``<details><summary>Set-up ...</summary>``
  (the README, rendered by GitHub and PyPI). Every block below it on the page runs
  after the page's set-up blocks above it, as a reader pastes them;
* ``# continues the blocks above`` as a block's first line: it runs after the page's
  set-up and earlier blocks (a FedML trainer defined in one block, run in the next);
* a visible line ``*Not runnable as pasted: <why>*`` right before a block that needs a
  running server or another venv: that block is not run here;
* ``<!-- test-requires: fedml, flwr -->``: the page runs only where these import.

``make docs`` builds the site in strict mode; ``test_built_site`` checks the HTML.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
SETUP_TITLE = re.compile(r'^\s*(\?\?\?\+? \w+ "Set-up|<details><summary>Set-up)')
NOT_RUNNABLE = "*Not runnable as pasted:"
CONTINUES = "# continues the blocks above"
REQUIRES = re.compile(r"<!-- test-requires: (?P<modules>[^\n]*?) -->")
FEDML_PAGE = "docs/integrations/fedml.md"


@dataclass
class Block:
    page: str
    line: int
    code: str
    kind: str  # "setup", "run" or "not-runnable"
    note: str = ""  # the paragraph right above the block
    prelude: List[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        return "\n".join(self.prelude + [self.code])


def blocks(page: str) -> Tuple[List[Block], List[str]]:
    """(every Python block of ``page`` with what runs before it, modules required)."""
    text = (REPO / page).read_text(encoding="utf-8")
    requires = [m.strip() for found in REQUIRES.finditer(text)
                for m in found.group("modules").split(",") if m.strip()]
    lines = text.splitlines()
    found: List[Block] = []
    setups: List[str] = []
    runs: List[str] = []
    paragraph: List[str] = []
    i = 0
    while i < len(lines):
        opening = FENCE_OPEN.match(lines[i])
        if not opening:
            if lines[i].strip() and i and not lines[i - 1].strip():
                paragraph = []
            paragraph += [lines[i]] if lines[i].strip() else []
            i += 1
            continue
        indent = opening.group("indent")
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{page}:{i + 1}: unclosed code fence"
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:end]]
        code = "\n".join(body) + "\n"
        if opening.group("lang") in ("python", "py"):
            note = " ".join(line.strip() for line in paragraph)
            if paragraph and SETUP_TITLE.match(paragraph[-1]):
                kind = "setup"
            elif note.startswith(NOT_RUNNABLE):
                kind = "not-runnable"
            else:
                kind = "run"
            prelude = setups + (runs if code.startswith(CONTINUES) else [])
            found.append(Block(page, i + 2, code, kind, note, list(prelude)))
            (setups if kind == "setup" else runs if kind == "run" else []).append(code)
        paragraph, i = [], end + 1
    return found, requires


def pages() -> List[str]:
    return ["README.md"] + sorted(str(p.relative_to(REPO)) for p in DOCS.rglob("*.md"))


def runnable(page_filter) -> list:
    return [pytest.param(b, id=f"{b.page}:{b.line}")
            for page in pages() if page_filter(page)
            for b in blocks(page)[0] if b.kind == "run"]


def run_block(block: Block, tmp_path: Path) -> None:
    """Run one block (after its prelude) as a script in a fresh interpreter."""
    missing = [m for m in blocks(block.page)[1] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{block.page} needs {', '.join(missing)}")
    script = tmp_path / "block.py"
    script.write_text(block.script, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(REPO),
               HOME=str(tmp_path / "home"), WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"the block at {block.page}:{block.line} failed when run as pasted:\n"
        f"{done.stdout[-2000:]}{done.stderr[-4000:]}"
    )


@pytest.mark.parametrize("block", runnable(lambda page: page != FEDML_PAGE))
def test_code_block_runs_as_pasted(block, tmp_path):
    run_block(block, tmp_path)


@pytest.mark.parametrize("block", runnable(lambda page: page == FEDML_PAGE))
def test_fedml_page_code_blocks(block, tmp_path):
    """Runs in .venv-fedml (``make pytest-fedml``); skipped where fedml is missing."""
    run_block(block, tmp_path)


def test_no_hidden_code_and_every_skip_says_why():
    """No page hides code from its reader; a block left unrun says why, visibly."""
    for page in pages():
        text = (REPO / page).read_text(encoding="utf-8")
        assert "<!-- test-code" not in text and "<!-- test-skip" not in text, page
        for block in blocks(page)[0]:
            if block.kind == "not-runnable":
                assert re.search(r"server|SuperLink|venv", block.note), (
                    f"{page}:{block.line}: only blocks that need a running server or "
                    f"another venv may be left unrun, and the note says which: "
                    f"{block.note!r}")


def test_quickstart_and_integration_pages_carry_runnable_blocks():
    for page in ("README.md", "docs/index.md", "docs/integrations/custom.md",
                 "docs/integrations/flower.md", "docs/integrations/huggingface.md"):
        found, requires = blocks(page)
        assert any(b.kind == "run" for b in found), page
        assert not any(b.kind == "not-runnable" for b in found
                       if page in ("docs/index.md", "docs/integrations/custom.md")), page


def test_block_parser_reads_setups_continuations_and_notes(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- test-requires: json, os -->\n"
        '??? example "Set-up: a toy model"\n\n'
        "    ```python\n    x = 1\n    ```\n\n"
        "```python\ny = x + 1\n```\n"
        "*Not runnable as pasted: needs a running SuperLink.*\n\n"
        "```python\nraise SystemExit\n```\n"
        "```bash\nls\n```\n"
        "```python\n# continues the blocks above\nassert y == 2\n```\n"
    )
    found, requires = blocks(str(page))
    assert requires == ["json", "os"]
    assert found[2].note == "*Not runnable as pasted: needs a running SuperLink.*"
    assert [(b.kind, b.code, b.prelude) for b in found] == [
        ("setup", "x = 1\n", []),
        ("run", "y = x + 1\n", ["x = 1\n"]),
        ("not-runnable", "raise SystemExit\n", ["x = 1\n"]),
        ("run", "# continues the blocks above\nassert y == 2\n", ["x = 1\n", "y = x + 1\n"]),
    ]


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links into the docs"
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_settings_page_lists_every_config_field():
    import dataclasses

    from lips_wrap import LIPSConfig

    text = (DOCS / "settings.md").read_text()
    missing = [f.name for f in dataclasses.fields(LIPSConfig) if f"| `{f.name}`" not in text
               and f"`{f.name}`, " not in text]
    assert not missing, f"docs/settings.md does not list LIPSConfig fields {missing}"


def test_every_docs_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def entries(nav) -> List[str]:
        found = []
        for item in nav:
            for value in item.values():
                found += entries(value) if isinstance(value, list) else [value]
        return found

    listed = set(entries(config["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == listed, (sorted(pages - listed), sorted(listed - pages))


def test_diagnostics_page_states_the_current_threshold():
    from lips_wrap.diagnostics import INERTIA_THRESHOLD

    text = (DOCS / "diagnostics.md").read_text()
    assert f"`lips_wrap.diagnostics.INERTIA_THRESHOLD` (**{INERTIA_THRESHOLD}**)" in text, (
        "docs/diagnostics.md must state the threshold's value and where it comes from"
    )


ROLE = re.compile(r":(meth|class|func|data|attr|mod|exc|obj):(`|<code>)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The documentation site, built in strict mode."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _public_names(module_file: Path) -> List[str]:
    """``__all__`` of a module, read without importing it (its framework may be absent)."""
    import ast

    for node in ast.parse(module_file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def test_built_site_shows_no_raw_rest_markup(site):
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        label = page.relative_to(site)
        assert not ROLE.search(html), f"{label}: raw reST role {ROLE.search(html).group(0)}"
        assert "Example::" not in html and "Examples::" not in html, f"{label}: Example::"
        unresolved = re.search(r"\]\[[\w.]+\]", html)
        assert not unresolved, f"{label}: cross-reference left as text: {unresolved.group(0)}"


def test_api_reference_lists_every_integration_name_under_its_import_path(site):
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = []
    for module_file in sorted((REPO / "integrations").glob("[!_]*.py")):
        module = f"lips_wrap.integrations.{module_file.stem}"
        names = _public_names(module_file)
        missing += [f"{module}.{name}" for name in names
                    if f'id="{module}.{name}"' not in html]
    assert 'id="lips_wrap.integrations.hf.LIPSCallback"' in html
    assert not missing, f"docs/api.md does not render {missing}"


def test_api_reference_cross_references_are_links(site):
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert html.count("autorefs-internal") >= 20
    assert 'href="#lips_wrap.LIPSConfig"' in html


def test_site_embeds_figures_and_requests_no_web_fonts(site):
    for page in ("results", "diagnostics"):
        html = (site / page / "index.html").read_text(encoding="utf-8")
        images = re.findall(r'<img [^>]*src="([^"]+)"', html)
        assert images, f"the {page} page shows no figure"
        for src in images:
            assert (site / page / src).resolve().is_file(), f"{page}: missing image {src}"
    for page in site.rglob("*.html"):
        assert "fonts.googleapis" not in page.read_text(encoding="utf-8"), page


def test_docs_figures_match_the_benchmark_results():
    """docs/img holds copies of benchmark figures (the site cannot reach outside docs/);
    a figure regenerated in benchmarks/results must be copied again, not left stale."""
    stale = [p.name for p in sorted((DOCS / "img").glob("*.png"))
             if (REPO / "benchmarks" / "results" / p.name).is_file()
             and (REPO / "benchmarks" / "results" / p.name).read_bytes() != p.read_bytes()]
    assert not stale, ("docs/img is older than benchmarks/results for "
                       f"{stale}: cp benchmarks/results/<name> docs/img/")
