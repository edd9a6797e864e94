"""The README and docs/: the README stays short and keeps the set-up markers .ci/run reads, every
relative link resolves, no citation points at a file the repository does not have, and the Python
in the docs at least parses (the README's first two snippets also run)."""
from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_keeps_the_set_up_markers():
    text = _read(README)
    assert len(text.splitlines()) <= 210
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        after = text.split(marker, 1)[1].lstrip("\n")
        assert after.startswith("```bash\npip install torch==2.13.0 ninja"), marker
    assert "minutes on 2 cores" in text  # the build time a new user waits through
    assert ".[triton]" in text


def test_readme_links_every_docs_page():
    tracked = subprocess.run(["git", "ls-files", "docs/*.md"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    text = _read(README)
    for name in tracked.stdout.split():  # pages being written (untracked) are not required yet
        assert name in text, f"README.md does not link {name}"


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_and_images_resolve(path):
    text = _read(path)
    base = os.path.dirname(path)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert os.path.exists(os.path.join(base, target)), f"{os.path.relpath(path, ROOT)}: {target}"


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_python_in_the_docs_parses(path):
    for block in _python_blocks(_read(path)):
        ast.parse(block)


def test_no_citation_of_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    stale = re.compile(r"(?<![\w/])(METHOD\.md|DESIGN\.md|bench/RESULTS\.md)")
    hits = []
    for name in tracked.stdout.split():
        if not name.endswith((".py", ".md", ".sh", ".cpp", ".h", ".cu", ".toml")) or not os.path.exists(
                os.path.join(ROOT, name)):
            continue
        for number, line in enumerate(_read(os.path.join(ROOT, name)).splitlines(), 1):
            if stale.search(line) and name != "tests/test_docs.py" and "moved here from" not in line:
                hits.append(f"{name}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_method_doc_has_the_sections_the_code_cites():
    text = _read(os.path.join(ROOT, "docs", "method.md"))
    for section in ("## 1. ", "## 2. ", "## 3. ", "## 4. ", "## 5. ", "## 6. ", "## 7. ", "## 8. Recipes"):
        assert section in text, section
    assert "DISTINCT" in text  # the greedy rule


@pytest.mark.parametrize("index", [0, 1])
def test_the_readmes_first_snippets_run(index, tmp_path):
    block = _python_blocks(_read(README))[index]
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
