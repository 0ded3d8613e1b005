"""The docs site builds with `mkdocs build --strict` (no broken link, no missing API reference), and
in a real headless browser its front page carries the README's sections and its API page lists every
public verb of PatronusPipeline."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from patronus.pipeline import PatronusPipeline
from tests.browser import dump_dom
from tests.conftest import REPO


def readme_sections() -> list[str]:
    """The README's second-level headings, outside code blocks."""
    text = re.sub(r"```.*?```", "", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return re.findall(r"^## (.+?)\s*$", text, flags=re.MULTILINE)


def pipeline_verbs() -> list[str]:
    """Every public member PatronusPipeline defines itself (not what it inherits from diffusers)."""
    return [
        name
        for name, value in vars(PatronusPipeline).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, (property, classmethod, staticmethod)))
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once into a temporary folder with the venv's mkdocs, strict."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers") if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {missing} not installed; .ci/run installs the docs extra")
        pytest.skip(f'{missing} not installed: pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    return out


def test_docs_build_strict_with_every_page_and_the_api_reference(site: Path):
    nav = re.findall(r":\s*([\w-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), flags=re.MULTILINE)
    for page in nav:
        built = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert built.is_file(), f"{page} is in the nav but {built} was not built"
    api = (site / "api" / "index.html").read_text()
    for verb in pipeline_verbs():
        assert f'id="patronus.pipeline.PatronusPipeline.{verb}"' in api, f"PatronusPipeline.{verb} is missing from the API page"


def test_docs_render_in_a_headless_browser(site: Path, tmp_path: Path):
    index = dump_dom(site / "index.html", tmp_path / "profile")
    assert "<h1" in index and "patronus" in index
    for section in readme_sections():
        assert re.search(rf'<h2 id="{re.escape(slugify(section, "-"))}"', index), f"README section {section!r} is not on the docs' index"
    assert 'src="images/samples.png"' in index and 'href="api/"' in index
    api = dump_dom(site / "api" / "index.html", tmp_path / "profile")
    verbs = pipeline_verbs()
    assert {"sample", "encode", "invert", "edit", "reconstruct", "generate"} <= set(verbs)
    for verb in verbs:
        assert f'id="patronus.pipeline.PatronusPipeline.{verb}"' in api, f"PatronusPipeline.{verb} is not rendered on the API page"
    assert 'id="patronus.edits.Edit"' in api and 'id="patronus.models.patronus.PatronusModel"' in api
