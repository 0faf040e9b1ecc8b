"""Figures of a fitted LDVAE, read back from the AnnData its results were written into.

Every function returns a :class:`matplotlib.figure.Figure` and never saves or shows
it (the workflow saves them). They read ``obs["Z_i"]`` / ``obsm["X_<key>"]``,
``varm["<key>_loadings"]``, ``obsm["X_umap"]`` and the training history, so they work
on a ``results.h5ad`` read back from disk as well as on a live AnnData.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..data.results import result_keys
from ..util.checks import positive_int

# Figures are built with the object API (Figure, not pyplot), so no backend or global
# state is touched: the workflow runs headless and in threads.


def plain_text(fig: Figure) -> Figure:
    """Show every string of ``fig`` as written, never as mathtext or LaTeX: gene names,
    categories, column names and titles may hold ``$`` (``$\\alpha$``, ``a$b``), which
    matplotlib would otherwise typeset or fail to draw. Numeric tick labels keep the
    default, as their formatters may write mathtext (``10^{2}`` on a log axis)."""
    import matplotlib as mpl
    from matplotlib.text import Text
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    numeric = (ScalarFormatter, LogFormatter)
    for text in fig.findobj(Text):
        text.set_parse_math(False)
        text.set_usetex(False)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for which in ("major", "minor"):
                formatter = axis.get_major_formatter() if which == "major" else axis.get_minor_formatter()
                if isinstance(formatter, numeric):
                    for text in axis.get_ticklabels(which=which):
                        text.set_parse_math(mpl.rcParams["text.parse_math"])
            axis.get_offset_text().set_parse_math(mpl.rcParams["text.parse_math"])
    return fig


def _plain(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """A figure function whose figure shows its strings as written (:func:`plain_text`)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> Figure:
        return plain_text(draw(*args, **kwargs))

    return wrapper


def loadings_frame(adata, key_added: str = "ldvae") -> pd.DataFrame:
    """The loadings stored in ``varm["<key>_loadings"]`` as genes × ``Z_i``, modelled genes only."""
    keys = result_keys(key_added)
    if keys["varm"] not in adata.varm:
        raise KeyError(
            f"Did not find adata.varm[{keys['varm']!r}]. Run model.write_results(adata, key_added={key_added!r}) first."
        )
    values = np.asarray(adata.varm[keys["varm"]], dtype=float)
    k = values.shape[1]
    columns = list(adata.uns.get(keys["uns"], {}).get("loadings_columns", [f"Z_{i}" for i in range(k)]))
    frame = pd.DataFrame(values, index=adata.var_names.astype(str), columns=columns)
    return frame[np.isfinite(values).all(axis=1)]


def top_genes(loadings: pd.DataFrame, n_genes: int = 5) -> pd.DataFrame:
    """The ``n_genes`` most negative and most positive genes of each factor.

    Returns
    -------
    A long table with columns ``factor``, ``direction`` (``"negative"``/``"positive"``),
    ``rank`` (1 = largest magnitude), ``gene`` and ``loading``.
    """
    positive_int("n_genes", n_genes)
    rows = []
    for factor in loadings.columns:
        col = loadings[factor].sort_values()
        n = min(n_genes, len(col))
        for rank, (gene, value) in enumerate(col.head(n).items(), start=1):
            rows.append((factor, "negative", rank, gene, float(value)))
        for rank, (gene, value) in enumerate(col.tail(n)[::-1].items(), start=1):
            rows.append((factor, "positive", rank, gene, float(value)))
    return pd.DataFrame(rows, columns=["factor", "direction", "rank", "gene", "loading"])


def latent_columns(adata, key_added: str = "ldvae") -> pd.DataFrame:
    """Latent means per cell as a DataFrame with columns ``Z_0 …`` (from obs columns, else obsm)."""
    keys = result_keys(key_added)
    if keys["obsm"] not in adata.obsm:
        raise KeyError(f"Did not find adata.obsm[{keys['obsm']!r}]. Run model.write_results(adata) first.")
    z = np.asarray(adata.obsm[keys["obsm"]])
    return pd.DataFrame(z, index=adata.obs_names, columns=[f"Z_{i}" for i in range(z.shape[1])])


def _grid(n_panels: int, ncols: int, panel: tuple[float, float]) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _point_size(n_cells: int) -> float:
    return float(np.clip(30_000 / max(n_cells, 1), 0.5, 12.0))


def _scatter(
    fig: Figure, ax, xy: np.ndarray, values: pd.Series | None, title: str, size: float, *, legend: bool = True
) -> None:
    """One scatter panel coloured by a categorical (legend) or numeric (colour bar) column."""
    if values is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#4c72b0", linewidths=0, rasterized=True)
    elif _is_categorical(values):
        cats = values.astype("category")
        names = list(cats.cat.categories)
        colors = np.asarray(_category_colors(len(names)))
        codes = cats.cat.codes.to_numpy()
        missing = codes < 0  # no label: light grey, under the labelled cells
        if missing.any():
            ax.scatter(xy[missing, 0], xy[missing, 1], s=size, c=MISSING_COLOR, linewidths=0, rasterized=True)
        # one draw in a fixed random order, so no category hides the others under it
        order = np.random.default_rng(0).permutation(np.flatnonzero(~missing))
        ax.scatter(xy[order, 0], xy[order, 1], s=size, c=colors[codes[order]], linewidths=0, rasterized=True)
        if legend:
            handles = [Line2D([], [], ls="", marker="o", ms=5, color=colors[i], label=str(n)) for i, n in enumerate(names)]
            if missing.any():
                handles.append(Line2D([], [], ls="", marker="o", ms=5, color=MISSING_COLOR,
                                      label=f"no label ({int(missing.sum())})"))
            ax.legend(handles=handles, fontsize=7, frameon=False,
                      loc="center left", bbox_to_anchor=(1.0, 0.5), ncols=1 if len(names) <= 14 else 2)
    else:
        v = values.to_numpy(dtype=float)
        lim = float(np.nanpercentile(np.abs(v), 99)) or 1.0
        order = np.argsort(np.abs(v))  # strongest cells on top
        art = ax.scatter(xy[order, 0], xy[order, 1], c=v[order], s=size, cmap="RdBu_r", vmin=-lim, vmax=lim,
                         linewidths=0, rasterized=True)
        if legend:
            fig.colorbar(art, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)


MISSING_COLOR = "#d3d3d3"


def category_palette(values: pd.Series) -> list[str] | None:
    """The colours the figures give the categories of ``values``, in category order, as hex:
    scanpy's ``uns[f"{key}_colors"]``, so that its plots of the results match the report's
    (None for a column drawn on a colour scale)."""
    from matplotlib.colors import to_hex

    if not _is_categorical(values):
        return None
    return [to_hex(c) for c in _category_colors(len(values.astype("category").cat.categories))]


def _category_colors(n: int) -> list:
    from matplotlib import colormaps

    base = colormaps["tab10" if n <= 10 else "tab20"].colors
    return [base[i % len(base)] for i in range(n)]


@_plain
def training_curves(history, *, skip_first: int = 1) -> Figure:
    """Training and validation ELBO (per cell) by epoch.

    Parameters
    ----------
    history
        ``model.history``, or a results AnnData (read with :func:`history_from_adata`).
    skip_first
        Epochs left out at the start (the first epoch's ELBO dwarfs the rest), as the tutorial.
    """
    if hasattr(history, "uns"):
        history = history_from_adata(history)
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for key, style in (("elbo_train", dict(lw=1.5)), ("elbo_validation", dict(marker="o", ms=4, lw=1.0))):
        frame = history.get(key)
        if frame is None or not len(frame):
            continue
        series = frame.iloc[:, 0]
        if key == "elbo_train" and len(series) > skip_first + 1:
            series = series.iloc[skip_first:]
        ax.plot(series.index.to_numpy() + 1, series.to_numpy(), label=key, **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell")
    ax.set_title("Training curves")
    if ax.lines:
        ax.legend(frameon=False)
    return fig


def history_from_adata(adata, key: str = "ldvae_workflow") -> dict[str, pd.DataFrame]:
    """The training history the workflow stored in ``uns[key]["history"]``, as ``model.history``."""
    stored = adata.uns.get(key, {}).get("history")
    if stored is None:
        raise KeyError(f"Did not find adata.uns[{key!r}]['history']. It is written by ldvae.run_workflow.")
    return {
        name: pd.DataFrame({name: np.asarray(v["value"], dtype=float)},
                           index=pd.Index(np.asarray(v["epoch"], dtype=int), name="epoch"))
        for name, v in stored.items()
    }


@_plain
def latent_pairs(adata, *, key_added: str = "ldvae", color: str | None = None, ncols: int = 3) -> Figure:
    """Scatter panels of latent dimension pairs Z_0/Z_1, Z_2/Z_3, … (the tutorial's figure).

    With an odd number of factors the last one is paired with Z_0. ``color`` names an
    obs column to colour cells by.
    """
    z = latent_columns(adata, key_added)
    k = z.shape[1]
    if k < 2:
        raise ValueError(f"latent_pairs needs at least 2 latent dimensions, the model has {k}.")
    pairs = [(i, i + 1) for i in range(0, k - 1, 2)] + ([(k - 1, 0)] if k % 2 else [])
    values = None if color is None else adata.obs[color]
    fig, axes = _grid(len(pairs), ncols, (3.6 if color is None else 4.4, 3.4))
    size = _point_size(adata.n_obs)
    for ax, (i, j) in zip(axes, pairs):
        xy = z.iloc[:, [i, j]].to_numpy()
        _scatter(fig, ax, xy, values, f"Z_{i} vs Z_{j}", size,
                 legend=ax is axes[-1] and values is not None and not _is_categorical(values))
        ax.set_xlabel(f"Z_{i}")
        ax.set_ylabel(f"Z_{j}")
    if values is not None and _is_categorical(values):
        names = list(values.astype("category").cat.categories)
        colors = _category_colors(len(names))
        handles = [Line2D([], [], ls="", marker="o", ms=5, color=colors[i], label=str(n)) for i, n in enumerate(names)]
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8, title=color)
    return fig


def _is_categorical(values: pd.Series) -> bool:
    return isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values)


@_plain
def loadings_heatmap(adata, *, key_added: str = "ldvae", n_genes: int = 5) -> Figure:
    """Heatmap of the loadings of each factor's ``n_genes`` most negative and positive genes."""
    loadings = loadings_frame(adata, key_added)
    table = top_genes(loadings, n_genes)
    genes = list(dict.fromkeys(table["gene"]))
    matrix = loadings.loc[genes].to_numpy()
    lim = float(np.abs(matrix).max()) or 1.0
    fig = Figure(figsize=(1.2 + 0.45 * loadings.shape[1] + 1.2, 1.2 + 0.14 * len(genes)), layout="constrained")
    ax = fig.subplots()
    art = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xticks(range(loadings.shape[1]), loadings.columns, rotation=90, fontsize=8)
    ax.set_yticks(range(len(genes)), genes, fontsize=6)
    ax.set_title(f"Top {n_genes} genes per factor", fontsize=10)
    fig.colorbar(art, ax=ax, shrink=0.5, label="loading")
    return fig


@_plain
def top_genes_bars(adata, *, key_added: str = "ldvae", n_genes: int = 5, ncols: int = 5) -> Figure:
    """One bar chart per factor: its ``n_genes`` most negative and most positive genes."""
    loadings = loadings_frame(adata, key_added)
    table = top_genes(loadings, n_genes)
    factors = list(loadings.columns)
    fig, axes = _grid(len(factors), ncols, (2.6, 0.35 + 0.2 * 2 * n_genes))
    for ax, factor in zip(axes, factors):
        rows = table[table["factor"] == factor].sort_values("loading")
        ax.barh(range(len(rows)), rows["loading"], color=np.where(rows["loading"] < 0, "#3b6fb6", "#c0392b"))
        ax.set_yticks(range(len(rows)), rows["gene"], fontsize=7)
        ax.axvline(0.0, color="black", lw=0.6)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(factor, fontsize=9)
    return fig


@_plain
def umap(adata, *, color: str | Sequence[str], ncols: int = 4, titles: Mapping[str, str] | None = None) -> Figure:
    """UMAP panels (``obsm["X_umap"]``), one per obs column in ``color`` (a name or names;
    categorical or numeric), each titled by its column's name or its entry in ``titles``."""
    color = [color] if isinstance(color, str) else list(color)
    if "X_umap" not in adata.obsm:
        raise KeyError("Did not find adata.obsm['X_umap']. Run sc.pp.neighbors and sc.tl.umap first.")
    missing = [c for c in color if c not in adata.obs.columns]
    if missing:
        raise KeyError(f"umap: color={missing[0]!r} is not a column of adata.obs.")
    xy = np.asarray(adata.obsm["X_umap"])[:, :2]
    fig, axes = _grid(len(color), ncols, (4.2, 3.4))
    size = _point_size(adata.n_obs)
    for ax, key in zip(axes, color):
        _scatter(fig, ax, xy, adata.obs[key], (titles or {}).get(key, key), size)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1", fontsize=8)
        ax.set_ylabel("UMAP2", fontsize=8)
    return fig
