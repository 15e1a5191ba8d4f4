"""Write .dvc/offline-plots.html: the page `dvc plots show` and `dvc plots diff` fill in,
with Vega, Vega-Lite and vega-embed inlined, so the data-series plots draw without a
network (DVC's own page loads them from a CDN, and shows nothing offline).

    python tools/offline_plots_template.py

It takes the exact versions DVC's renderer asks its CDN for (dvc_render.vega), packed by
npm, and needs npm only when the page is regenerated; .dvc/config points DVC at the page
(`plots.html_template`). The libraries are BSD-3-Clause (University of Washington
Interactive Data Lab); the page says so above the scripts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / ".dvc" / "offline-plots.html"
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- Vega {vega}, Vega-Lite {vega-lite}, vega-embed {vega-embed}, inlined by tools/offline_plots_template.py.
         Each: BSD-3-Clause, Copyright (c) 2015-2018, University of Washington Interactive Data Lab. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def cdn_versions() -> dict[str, str]:
    """The versions dvc_render's page loads: ``<script src=".../npm/vega@5.20.2">``."""
    from dvc_render import vega

    source = Path(vega.__file__).read_text(encoding="utf-8")
    return dict(re.findall(r"cdn\.jsdelivr\.net/npm/(vega(?:-lite|-embed)?)@([0-9.]+)", source))


def packed_script(name: str, version: str, folder: Path) -> str:
    subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=folder, check=True, capture_output=True)
    with tarfile.open(folder / f"{name}-{version}.tgz") as archive:
        member = archive.extractfile(f"package/{BUILDS[name]}")
        assert member is not None
        script = member.read().decode("utf-8")
    if "</script" in script or any(f"{{{p}}}" in script for p in ("scripts", "plot_divs", "refresh_tag")):
        sys.exit(f"{name}@{version} holds text the page cannot inline")
    return script


def main() -> None:
    versions = cdn_versions()
    with tempfile.TemporaryDirectory() as folder:
        scripts = "\n".join(f"    <script type=\"text/javascript\">\n{packed_script(name, versions[name], Path(folder))}\n    </script>"
                            for name in BUILDS)
    TEMPLATE.write_text(PAGE.format(scripts=scripts, **versions), encoding="utf-8")
    print(TEMPLATE)


if __name__ == "__main__":
    main()
