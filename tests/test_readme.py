"""The documentation's Python examples run as shown: the README's and every guide's in docs/,
each file's blocks in order in one namespace (as a reader pastes them into one session), and
every relative link in them points to a file that exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


# Guides whose examples need an optional extra (pip install -e ".[hf,lightning]").
NEEDS = {"trainers.md": ("transformers", "accelerate", "lightning")}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path, capsys):
    for module in NEEDS.get(path.name, ()):
        pytest.importorskip(module)
    namespace: dict = {}
    for i, block in enumerate(_python_blocks(path)):
        exec(compile(block, f"{path.name} python block {i}", "exec"), namespace)


def test_the_examples_are_there():
    """The README shows the two-step and closure usage; the guides carry the rest."""
    assert len(_python_blocks(ROOT / "README.md")) >= 2
    assert sum(len(_python_blocks(p)) for p in DOCS) >= 15


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
