"""A single self-contained ``report.html``: every figure embedded as base64, no external
file, script or style sheet, so the page can be mailed or moved on its own.

The page is a list of sections, each a ``(title, html)`` pair, in this order:
data summary, training settings, figures, top-genes table, then any ``extra_sections``
given to :func:`build_report`. Another part of ldvae (or a user) adds a section by
passing more pairs, e.g. ``extra_sections=[("Deviance explained", table.to_html())]``;
the html of a section is inserted as given, so it must be escaped by its author
(:func:`table_html` and :func:`figure_html` do that for tables and figures).
"""

from __future__ import annotations

import base64
import datetime
import html
import os
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f4f4f4; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: .9em; color: #555; }
nav a { margin-right: 1em; } .note { font-size: .85em; color: #666; }
"""


def figure_html(path: str | os.PathLike, caption: str) -> str:
    """An ``<figure>`` with the image at ``path`` embedded as a base64 data URI."""
    p = Path(path)
    mime = _MIME.get(p.suffix.lower())
    if mime is None:
        raise ValueError(f"Cannot embed {p.name!r} in the report: only {sorted(_MIME)} images are supported.")
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table_html(frame: pd.DataFrame, *, float_format: str = "{:.3g}", index: bool = False) -> str:
    """A DataFrame as an escaped HTML table; a missing value shows as a dash."""
    return frame.to_html(index=index, escape=True, border=0, float_format=float_format.format, na_rep="–")


def note_html(text: str) -> str:
    """A short explanatory paragraph (escaped), styled as a note."""
    return f'<p class="note">{html.escape(text)}</p>'


def dict_html(items: Mapping[str, object]) -> str:
    """A two-column table of names and values (floats to six significant digits)."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(f'{v:.6g}' if isinstance(v, float) else str(v))}</td></tr>"
        for k, v in items.items()
    )
    return f"<table>{rows}</table>"


def top_genes_wide(table: pd.DataFrame, stability: pd.DataFrame | None = None) -> pd.DataFrame:
    """The long top-genes table (see :func:`ldvae.workflow.plotting.top_genes`) as one row per factor:
    ``negative`` and ``positive`` genes with loadings, largest magnitude first. With
    ``stability`` (the ``factors`` table of :func:`ldvae.factors.stability.factor_stability`, indexed
    by factor), also its ``stability`` and ``stable across seeds`` ("yes"/"no") per factor."""
    rows = []
    for factor, group in table.groupby("factor", sort=False):
        cells = {"factor": factor}
        for direction in ("negative", "positive"):
            part = group[group["direction"] == direction].sort_values("rank")
            cells[direction] = ", ".join(f"{g} ({v:+.2f})" for g, v in zip(part["gene"], part["loading"]))
        rows.append(cells)
    wide = pd.DataFrame(rows, columns=["factor", "negative", "positive"])
    if stability is not None:
        wide["stability"] = wide["factor"].map(stability["stability"])
        wide["stable across seeds"] = wide["factor"].map(stability["stable"]).map({True: "yes", False: "no"})
    return wide


def build_report(
    *,
    title: str,
    data_summary: Mapping[str, object],
    settings: Mapping[str, object],
    figures: Sequence[tuple[str, str | os.PathLike]],
    top_genes: pd.DataFrame | None = None,
    factor_stability: pd.DataFrame | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
    footer: str = "",
    summary: str = "",
) -> str:
    """The report page as one HTML string.

    Parameters
    ----------
    title
        Page title.
    data_summary, settings
        Name → value pairs shown as tables.
    figures
        ``(caption, path)`` pairs; each image is read and embedded (PNG, SVG or JPEG).
    top_genes
        The long top-genes table of :func:`ldvae.workflow.plotting.top_genes`.
    factor_stability
        Per-factor stability (``StabilityResult.factors``): adds ``stability`` and
        ``stable across seeds`` columns to the top-genes table.
    extra_sections
        More ``(title, html)`` sections appended after the standard ones; the html is
        inserted verbatim.
    footer
        Plain text at the bottom (e.g. the data attribution); escaped.
    summary
        HTML of a first section, "Summary", where a reader starts (none when empty).
    """
    sections: list[tuple[str, str]] = [("Summary", summary)] if summary else []
    sections += [
        ("Data", dict_html(data_summary)),
        ("Training settings", dict_html(settings)),
        ("Figures", "".join(figure_html(path, caption) for caption, path in figures)),
    ]
    if top_genes is not None:
        wide = top_genes_wide(top_genes, factor_stability)
        note = ""
        if factor_stability is not None:
            f = factor_stability
            note = note_html(
                f"stable across seeds: the model's own factor came back with stability >= {f.attrs.get('threshold')} "
                f"(median matched |correlation| of loadings) in {f.attrs.get('n_runs')} fits with different seeds; "
                "see Factor stability across seeds."
            )
        sections.append(("Top loadings by magnitude", note + table_html(wide, float_format="{:.2f}")))
    sections.extend(extra_sections)
    anchors = [f"s{i}" for i in range(len(sections))]
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, (t, _) in zip(anchors, sections))
    body = "".join(
        f'<section id="{a}"><h2>{html.escape(t)}</h2>{content}</section>' for a, (t, content) in zip(anchors, sections)
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"note\">Written {stamp} by ldvae.</p><nav>{nav}</nav>{body}"
        f"<p class=\"note\">{html.escape(footer)}</p></body></html>\n"
    )
