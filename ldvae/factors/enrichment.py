"""Gene-set enrichment of factors: which known programmes does a factor's loading follow?

For each factor and gene set, the loadings of the set's genes are compared with those
of every other modelled gene by a one-sided Mann-Whitney U test (the asymptotic test of
``scipy.stats.mannwhitneyu``, vectorized over sets): ``positive`` asks whether the set's
genes load higher, ``negative`` lower. The effect size is the AUC, U / (n_set n_rest):
the probability that a set gene has a higher loading than another gene (0.5: no
enrichment). P-values are Benjamini-Hochberg adjusted
(``scipy.stats.false_discovery_control``) over all sets and both directions of a factor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, norm, rankdata, tiecorrect

from ..util.checks import positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file: one set per line, ``name<TAB>description<TAB>gene<TAB>gene...``.

    Blank lines are skipped; empty gene fields are dropped; a gene listed twice in a set
    counts once.

    Returns
    -------
    dict
        Set name -> genes, in file order.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"Gene-set file {p} is a directory. Pass the path of a GMT file.")
    if not p.is_file():
        raise FileNotFoundError(f"Gene-set file {p} does not exist. Pass the path of a GMT file.")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not part of the first name
    except UnicodeDecodeError as err:
        raise ValueError(f"Gene-set file {p} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    sets: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        genes = [g.strip() for g in fields[2:] if g.strip()]
        if len(fields) < 3 or not fields[0].strip() or not genes:
            raise ValueError(
                f"Line {number} of {p} is not a GMT record (got {len(fields)} tab-separated field(s) "
                f"starting {line[:60]!r}). Each line needs name<TAB>description<TAB>gene[<TAB>gene...]."
            )
        name = fields[0].strip()
        if name in sets:
            raise ValueError(f"Gene set {name!r} appears twice in {p} (again at line {number}). Rename one.")
        sets[name] = list(dict.fromkeys(genes))
    if not sets:
        raise ValueError(f"{p} holds no gene sets; a GMT file has one set per line.")
    return sets


def _mann_whitney(values: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-sided Mann-Whitney U tests of set genes vs the rest, for every set and factor.

    ``values`` (G, K) loadings, ``member`` (n_sets, G) 0/1. Returns the AUC and the p-values
    of "set loads higher" and "set loads lower", each (n_sets, K). These are the numbers of
    ``scipy.stats.mannwhitneyu(..., method="asymptotic")`` (normal approximation with tie
    and continuity correction), computed from one ranking per factor instead of one call
    per set, factor and direction; a test pins the equality.
    """
    n = values.shape[0]
    ranks = rankdata(values, axis=0)  # (G, K), ties averaged
    n1 = member.sum(axis=1, keepdims=True)  # (n_sets, 1)
    n2 = n - n1
    u1 = member @ ranks - n1 * (n1 + 1) / 2  # (n_sets, K)
    ties = np.array([tiecorrect(ranks[:, k]) for k in range(values.shape[1])])[None, :]  # (1, K)
    sd = np.sqrt(n1 * n2 / 12 * (n + 1) * ties)
    mean = n1 * n2 / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        p_pos = norm.sf((u1 - mean - 0.5) / sd)
        p_neg = norm.cdf((u1 - mean + 0.5) / sd)
    return u1 / (n1 * n2), np.nan_to_num(p_pos, nan=1.0), np.nan_to_num(p_neg, nan=1.0)


def _as_loadings(model_or_loadings) -> pd.DataFrame:
    if isinstance(model_or_loadings, pd.DataFrame):
        return model_or_loadings
    if hasattr(model_or_loadings, "get_loadings"):
        return model_or_loadings.get_loadings()
    raise TypeError(
        "factor_enrichment takes a trained LinearSCVI or a loadings DataFrame (genes x factors), got "
        f"{type(model_or_loadings).__name__}."
    )


def factor_enrichment(
    model_or_loadings,
    gene_sets: str | os.PathLike | Mapping[str, list[str]],
    *,
    min_size: int = 5,
    max_size: int = 500,
    ignore_case: bool = False,
) -> pd.DataFrame:
    """Test every factor's positive and negative loadings for enrichment of each gene set.

    Parameters
    ----------
    model_or_loadings
        A trained :class:`ldvae.LinearSCVI`, or a loadings DataFrame (genes x factors), e.g.
        :func:`ldvae.factors.interpret.ordered_loadings` or consensus loadings of
        :func:`ldvae.factors.stability.factor_stability`.
    gene_sets
        A GMT file path, or a mapping of set name -> genes.
    min_size, max_size
        Sets with fewer or more genes among the modelled genes are skipped.
    ignore_case
        Match gene names case-insensitively (e.g. human symbols against mouse genes).

    Returns
    -------
    pd.DataFrame
        One row per factor, direction and gene set: ``factor``, ``direction``
        (``"positive"``/``"negative"``), ``gene_set``, ``n_genes`` (set genes modelled),
        ``auc`` (P(set gene loads higher than another gene)), ``p_value``, ``p_adj`` (BH
        within the factor) and ``rank`` (1 = smallest p-value within factor and direction),
        sorted by factor (in the loadings' column order), direction and rank. ``attrs``
        records the sets tested and skipped.
    """
    positive_int("min_size", min_size)
    positive_int("max_size", max_size)
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) must not exceed max_size ({max_size}).")
    loadings = _as_loadings(model_or_loadings)
    sets = read_gmt(gene_sets) if isinstance(gene_sets, (str, os.PathLike)) else dict(gene_sets)
    single = next((name for name, members in sets.items() if isinstance(members, str)), None)
    if single is not None:
        raise TypeError(f"gene set {single!r} is a string; give each set as a list of genes, e.g. "
                        f"{{{single!r}: [{sets[single]!r}]}}.")
    values = loadings.to_numpy(dtype=float)  # (G, K)
    keep = ~np.isnan(values).any(axis=1)  # unmodelled genes (NaN rows) take no part
    values = values[keep]
    genes = pd.Index(loadings.index[keep].astype(str))
    lookup = genes.str.upper() if ignore_case else genes
    position = pd.Series(np.arange(len(genes)), index=lookup)
    position = position[~position.index.duplicated()]

    tested, skipped, whole = [], [], 0
    for name, members in sets.items():
        keys = pd.Index([str(g).upper() if ignore_case else str(g) for g in members]).unique()
        idx = position.reindex(keys).dropna().to_numpy(dtype=int)
        if min_size <= idx.size <= max_size and idx.size < len(genes):
            tested.append((name, idx))
        else:
            skipped.append(name)
            whole += idx.size == len(genes)
    if not tested and whole:
        raise ValueError(f"{whole} gene set(s) hold all {len(genes)} modelled genes, which leaves no gene outside "
                         "to compare with; test sets smaller than the model's genes.")
    if not tested:
        example = next(iter(sets.values()))[:3] if sets else []
        raise ValueError(
            f"No gene set has between {min_size} and {max_size} genes among the {len(genes)} modelled genes "
            f"({len(sets)} sets read; e.g. set genes {example}, model genes {list(genes[:3])}). Check that both "
            "use the same identifiers (symbols vs Ensembl IDs), or lower min_size / pass ignore_case=True."
        )
    member = np.zeros((len(tested), len(genes)))  # (n_sets, G) membership
    for i, (_, idx) in enumerate(tested):
        member[i, idx] = 1.0
    auc, p_pos, p_neg = _mann_whitney(values, member)  # each (n_sets, K)
    names = [name for name, _ in tested]
    sizes = member.sum(axis=1).astype(int)
    rows = []
    for k, factor in enumerate(loadings.columns):
        for direction, p in (("positive", p_pos), ("negative", p_neg)):
            rows += zip([factor] * len(names), [direction] * len(names), names, sizes, auc[:, k], p[:, k])
    table = pd.DataFrame(rows, columns=["factor", "direction", "gene_set", "n_genes", "auc", "p_value"])
    table["p_adj"] = table.groupby("factor", sort=False)["p_value"].transform(
        lambda p: false_discovery_control(p.to_numpy(), method="bh")
    )
    table["factor"] = pd.Categorical(table["factor"], categories=list(loadings.columns), ordered=True)
    table = table.sort_values(["factor", "direction", "p_value", "gene_set"], kind="stable")
    table["rank"] = table.groupby(["factor", "direction"], observed=True).cumcount() + 1
    table["factor"] = table["factor"].astype(str)
    table = table.reset_index(drop=True)
    table.attrs.update(n_sets_tested=len(tested), n_sets_skipped=len(skipped), n_genes_modelled=len(genes))
    logger.info(
        "Tested %d gene sets (%d skipped for size) against %d factors.", len(tested), len(skipped), loadings.shape[1]
    )
    return table


def top_sets(
    enrichment: pd.DataFrame,
    n: int = 5,
    *,
    direction: Literal["both", "positive", "negative"] = "both",
    max_p_adj: float = 1.0,
) -> pd.DataFrame:
    """The ``n`` best sets per factor and direction from :func:`factor_enrichment`,
    optionally only those with ``p_adj <= max_p_adj``."""
    if direction not in ("both", "positive", "negative"):
        raise ValueError(f"direction must be 'both', 'positive' or 'negative', got {direction!r}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    t = enrichment[(enrichment["rank"] <= n) & (enrichment["p_adj"] <= max_p_adj)]
    if direction != "both":
        t = t[t["direction"] == direction]
    return t.reset_index(drop=True)


def plot_enrichment(enrichment: pd.DataFrame, n: int = 3, max_p_adj: float = 0.05) -> Figure:
    """Per factor, the ``n`` best positive (right, blue) and negative (left, red) sets with
    ``p_adj <= max_p_adj``, as signed -log10 adjusted p-value bars. Returns the figure."""
    from matplotlib.figure import Figure

    best = top_sets(enrichment, n, max_p_adj=max_p_adj)
    factors = list(dict.fromkeys(enrichment["factor"]))
    n_cols = min(3, max(len(factors), 1))
    n_rows = int(np.ceil(len(factors) / n_cols)) or 1
    fig = Figure(figsize=(4.2 * n_cols, (0.35 * 2 * n + 0.9) * n_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax, factor in zip(axes, factors):
        t = best[best["factor"] == factor]
        signed = -np.log10(t["p_adj"].clip(lower=1e-300)) * np.where(t["direction"] == "positive", 1, -1)
        y = np.arange(len(t))
        ax.barh(y, signed, color=np.where(t["direction"] == "positive", "#4C72B0", "#C44E52"))
        ax.set_yticks(y, [s[:40] for s in t["gene_set"]], fontsize=7)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_title(str(factor), fontsize=9)
        ax.set_xlabel("signed -log10 p_adj", fontsize=8)
        if not len(t):
            ax.text(0.5, 0.5, f"no set with p_adj <= {max_p_adj}", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(factors) :]:
        ax.axis("off")
    return fig
