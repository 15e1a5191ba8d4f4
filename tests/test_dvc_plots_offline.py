"""`dvc plots show` draws with no network: the project's page inlines Vega instead of
loading it from a CDN (.dvc/offline-plots.html, written by tools/offline_plots_template.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from project_repo import ROOT, run


def test_the_plots_page_carries_vega_and_loads_nothing(tmp_path: Path):
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / "offline-plots.html", tmp_path / ".dvc" / "offline-plots.html")
    (tmp_path / "norm.json").write_text(json.dumps([{"step": 0, "norm": 1.0}, {"step": 1, "norm": 1.5}]))
    run(["dvc", "plots", "show", "norm.json", "-x", "step", "-y", "norm", "-o", "out"], tmp_path)
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"<script[^>]*\bsrc=", page) == []  # nothing fetched
    assert "cdn.jsdelivr.net" not in page
    assert "vegaEmbed(" in page and re.search(r'"norm": ?1\.5', page)  # the data, drawn by the inlined library


def test_the_page_inlines_the_versions_dvc_asks_its_cdn_for():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from offline_plots_template import cdn_versions

    page = (ROOT / ".dvc" / "offline-plots.html").read_text(encoding="utf-8")
    versions = cdn_versions()
    assert f"Vega {versions['vega']}, Vega-Lite {versions['vega-lite']}, vega-embed {versions['vega-embed']}" in page
