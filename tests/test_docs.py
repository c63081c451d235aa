"""The documentation cannot drift from the code: the Python blocks of the README and of
the docs pages run here, in order, one namespace per page.

Conventions a page can use (HTML comments: invisible on GitHub, PyPI and the site):

* ``<!-- test-code`` ... ``-->``: hidden Python run in document order with the visible
  blocks (a small model or data for the example to run on, or checks after it);
* ``<!-- test-requires: fedml, flwr -->``: the page runs only where these import;
* ``<!-- test-skip: reason -->``: the next Python block is not run.

``make docs`` builds the site in strict mode (broken links and references fail); this
file checks what a build cannot: that the examples run.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

CODE_PAGES = ["README.md", "docs/index.md", "docs/method.md", "docs/detection.md",
              "docs/diagnostics.md", "docs/settings.md", "docs/integrations/custom.md",
              "docs/integrations/flower.md", "docs/integrations/huggingface.md"]
"""Pages whose Python blocks run in the project's venv (fedml.md: see below)."""

FENCE = re.compile(
    r"^```python[^\n]*\n(?P<code>.*?)^```\s*$"
    r"|<!-- test-code\n(?P<hidden>.*?)-->"
    r"|<!-- test-skip: (?P<skip>[^\n]*?) -->"
    r"|<!-- test-requires: (?P<requires>[^\n]*?) -->",
    re.S | re.M,
)

FLOWER_NAMES = '''
import torch
from torch import nn
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

class _App:
    """Stands for the page's ``app``: a ClientApp in one block, a ServerApp in another."""
    def __init__(self):
        self.client, self.server = ClientApp(), ServerApp()
    def train(self, *args, **kwargs):
        return self.client.train(*args, **kwargs)
    def evaluate(self, *args, **kwargs):
        return self.client.evaluate(*args, **kwargs)
    def main(self, *args, **kwargs):
        return self.server.main(*args, **kwargs)

app = _App()
def Net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
'''

EXTRA_SETUP: Dict[str, str] = {"docs/integrations/flower.md": FLOWER_NAMES}
"""Names a page's blocks use but (being fragments of a larger app) do not define."""


@dataclass
class Piece:
    code: str
    line: int
    hidden: bool


def pieces(page: str) -> tuple:
    """(pieces to run, modules required) of one page."""
    text = (REPO / page).read_text()
    found: List[Piece] = []
    requires: List[str] = []
    skip_next = False
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match.group("requires") is not None:
            requires += [m.strip() for m in match.group("requires").split(",") if m.strip()]
        elif match.group("skip") is not None:
            assert match.group("skip").strip(), f"{page}:{line}: test-skip needs a reason"
            skip_next = True
        elif match.group("hidden") is not None:
            found.append(Piece(match.group("hidden"), line + 1, True))
        elif skip_next:
            skip_next = False
        else:
            found.append(Piece(match.group("code"), line + 1, False))
    return found, requires


def run_page(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a page's pieces; returns how many visible blocks ran."""
    found, requires = pieces(page)
    missing = [m for m in requires if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{page} needs {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    namespace: Dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    if page in EXTRA_SETUP:
        exec(compile(EXTRA_SETUP[page], f"<setup of {page}>", "exec"), namespace)
    for piece in found:
        label = f"{page}:{piece.line}" + (" (hidden)" if piece.hidden else "")
        code = compile(piece.code, label, "exec")
        try:
            exec(code, namespace)
        except Exception as error:  # name the block that broke
            raise AssertionError(f"the block at {label} failed: {error!r}") from error
    return sum(not p.hidden for p in found)


@pytest.mark.parametrize("page", CODE_PAGES)
def test_page_code_blocks(page, tmp_path, monkeypatch):
    if not (REPO / page).exists():
        pytest.skip(f"{page} does not exist yet")
    run_page(page, tmp_path, monkeypatch)


def test_quickstart_and_integration_pages_carry_runnable_blocks():
    """The pages that must carry runnable examples do carry them, none skipped, and no
    requirement outside the project's venv (so test_page_code_blocks runs them)."""
    for page in ("README.md", "docs/index.md", "docs/integrations/custom.md"):
        found, requires = pieces(page)
        assert sum(not p.hidden for p in found) >= 1 and not requires, page
    text = (REPO / "docs/index.md").read_text()
    assert "test-skip" not in text and "test-skip" not in (
        REPO / "docs/integrations/custom.md").read_text()


def test_fedml_page_code_blocks(tmp_path, monkeypatch):
    """Runs in .venv-fedml (``make pytest-fedml``); skipped where fedml is missing."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert run_page("docs/integrations/fedml.md", tmp_path, monkeypatch) >= 1


def test_fence_parser_reads_hidden_code_skips_and_requirements(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- test-requires: json, os -->\n"
        "<!-- test-code\nx = 1\n-->\n"
        "```python\ny = x + 1\n```\n"
        "<!-- test-skip: needs a GPU -->\n"
        "```python\nraise SystemExit\n```\n"
        "```bash\nls\n```\n"
        "```python\nassert y == 2\n```\n"
    )
    found, requires = pieces(str(page))
    assert requires == ["json", "os"]
    assert [(p.code, p.hidden) for p in found] == [
        ("x = 1\n", True), ("y = x + 1\n", False), ("assert y == 2\n", False)]


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
