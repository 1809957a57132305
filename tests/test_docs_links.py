"""Every relative link of the user-facing markdown (README, docs/results.md, docs/lvlm.md, the bench index and its
RESULTS files) points at a file or folder that exists in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/results.md", "docs/lvlm.md", "bench/README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*/RESULTS.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Targets of markdown links and images that are paths in this repository (not URLs or in-page anchors)."""
    targets = (m.group(1).split("#", 1)[0] for m in LINK.finditer(text))
    return [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_link_pattern_finds_links_and_images_but_not_urls():
    text = "see [a](docs/a.md#x), ![p](b.png), [web](https://example.org) and [here](#top)"
    assert relative_links(text) == ["docs/a.md", "b.png"]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_point_at_existing_files(document):
    path = ROOT / document
    missing = [t for t in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / t).exists()]
    assert not missing, f"{document} links to missing files: {missing}"
