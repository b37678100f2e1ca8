"""One HTML page for a whole data set: the heatmap table of every example, shown a page at a time.

    write_paged_html(open_attributions("out/"), "out.html", per_page=50)

Each page of examples sits in a `<template>`, which the browser parses but does not lay out; a few
lines of script put the chosen page on screen. So a file of 10,000 examples opens as fast as one page.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Iterable

from instrument.files.saving import write_atomic
from instrument.views.html_tables import html_table
from instrument.views.prepare import prepared

SCRIPT = """<script>
(function () {
  const pages = document.querySelectorAll("template.page"), shown = document.getElementById("shown");
  const number = document.getElementById("number");
  let current = 0;
  if (!pages.length) return;
  function show(k) {
    current = Math.max(0, Math.min(pages.length - 1, k));
    shown.replaceChildren(pages[current].content.cloneNode(true));
    number.value = current + 1;
    location.hash = "page-" + (current + 1);
  }
  document.getElementById("previous").onclick = () => show(current - 1);
  document.getElementById("next").onclick = () => show(current + 1);
  number.onchange = () => show(parseInt(number.value, 10) - 1);
  const wanted = /^#page-(\\d+)$/.exec(location.hash);
  show(wanted ? parseInt(wanted[1], 10) - 1 : 0);
})();
</script>"""


def write_paged_html(
    examples: Iterable, path: str | os.PathLike, per_page: int = 50, title: str = "Attributions", ids=None
) -> Path:
    """Writes the examples (sequences, read one at a time) as one paged HTML file; returns the path.
    `ids`: labels of the examples (default 0, 1, ...)."""
    if not isinstance(per_page, int) or per_page < 1:
        raise ValueError(f"per_page must be a positive integer, got {per_page!r}")
    path = Path(path)
    ids = list(ids) if ids is not None else None

    def write(temporary: str) -> None:
        pages = 0
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(
                f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
                '<nav style="font-family:sans-serif;margin:8px 0"><button id="previous">&larr;</button> '
                'page <input id="number" type="number" min="1" style="width:5em"> of <span id="count"></span> '
                '<button id="next">&rarr;</button></nav>\n<div id="shown"></div>\n'
            )
            for i, seq in enumerate(examples):
                if i % per_page == 0:
                    if i:
                        handle.write("</template>\n")
                    handle.write(f'<template class="page" id="page-{pages + 1}">\n')
                    pages += 1
                label = ids[i] if ids is not None else i
                handle.write(html_table(prepared(seq, True)[0], f"Example {label}") + "\n")
            if pages:
                handle.write("</template>\n")
            handle.write(f'<script>document.getElementById("count").textContent = "{pages}";</script>\n')
            handle.write(SCRIPT + "\n</body>\n</html>\n")

    write_atomic(path, write, overwrite=True)
    return path
