"""Writes an HTML template for `dvc plots show --html-template` that carries Vega, Vega-Lite and
Vega-Embed inline, so that the page renders without internet (DVC's own page loads them from a CDN).

    python scripts/offline_plots_template.py NODE_MODULES > template.html
"""

from __future__ import annotations

import sys
from pathlib import Path

LIBRARIES = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")


def template(node_modules: Path) -> str:
    scripts = []
    for name in LIBRARIES:
        code = (node_modules / name).read_text(encoding="utf-8")
        if "</script" in code.lower():  # would end the inline <script> element early
            raise SystemExit(f"{name} contains '</script': it cannot be inlined")
        scripts.append(f"<script>\n{code}\n</script>")
    # DVC fills {plot_divs} (and {scripts}, its CDN tags, which this page leaves out on purpose).
    return "\n".join([
        "<!DOCTYPE html>", "<html>", "<head>", '<meta charset="utf-8">', "<title>DVC plots</title>", *scripts,
        "<style>table { border-spacing: 15px; }</style>", "</head>", "<body>", "{plot_divs}", "</body>", "</html>",
    ]) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.stdout.write(template(Path(sys.argv[1])))
