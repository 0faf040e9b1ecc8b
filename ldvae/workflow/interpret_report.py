"""Report sections for the interpretation tools: ``(title, html)`` pairs, or callables
``(model, adata) -> (title, html)``, as :func:`ldvae.workflow.pipeline.run_workflow` takes them in
``report_sections`` and :func:`ldvae.workflow.report.build_report` in ``extra_sections``::

    from ldvae.workflow.interpret_report import interpretation_sections, stability_section
    run_workflow(path, out_dir="out", report_sections=interpretation_sections(gmt="h.gmt"))
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd

from .plotting import plain_text
from .report import figure_html, note_html, table_html

if TYPE_CHECKING:
    from ..model import LinearSCVI
    from ..factors.consensus import ConsensusFactors
    from ..factors.stability import StabilityResult

Section = tuple[str, str]


def _figure(fig, caption: str) -> str:
    plain_text(fig)  # gene names, gene-set names and levels may hold '$'
    with tempfile.TemporaryDirectory(prefix="ldvae-fig-") as tmp:
        path = Path(tmp) / "figure.png"
        fig.savefig(path, dpi=110)
        return figure_html(path, caption)




def deviance_section(model: LinearSCVI, adata=None) -> Section:
    """Deviance explained per factor (table and bar chart), on the model's training cells."""
    from ..factors.interpret import factor_deviance, plot_deviance

    table = factor_deviance(model)
    total = table.attrs["fraction_explained"]
    body = (
        note_html(
            f"The model explains {100 * total:.1f}% of the null (intercepts and covariates only) deviance "
            f"on {table.attrs['n_cells']} cells. fraction_of_model: share of that explained deviance lost when "
            "the factor is set to its mean; sign: the flip that makes its largest loading positive."
        )
        + table_html(table.reset_index(), float_format="{:.4g}")
        + _figure(plot_deviance(table), "Deviance explained per factor, ordered.")
    )
    return "Deviance explained per factor", body


def covariate_section(model: LinearSCVI, adata=None, n_genes: int = 10) -> Section:
    """Batch and covariate effects of the decoder: the largest per level, and a heatmap."""
    from ..factors.interpret import covariate_effects, plot_covariate_effects

    effects = covariate_effects(model)
    if effects.empty:
        return "Covariate effects", note_html("The model has no batch or covariates.")
    top = effects.groupby(["covariate", "level"], sort=False).head(5)
    body = (
        note_html("effect: log-rate effect of a level relative to the average level (per unit for continuous).")
        + table_html(top, float_format="{:.3g}")
        + _figure(plot_covariate_effects(effects, n_genes), f"Top {n_genes} genes by covariate effect.")
    )
    return "Covariate effects", body


def enrichment_section(gene_sets: str | os.PathLike, *, n: int = 3) -> Callable[[LinearSCVI, object], Section]:
    """A section builder testing the model's loadings against the gene sets of a GMT file."""
    from ..factors.enrichment import factor_enrichment, plot_enrichment, top_sets

    def build(model: LinearSCVI, adata=None) -> Section:
        table = factor_enrichment(model, gene_sets)
        best = top_sets(table, n)
        body = (
            note_html(
                f"Mann-Whitney U test of each set's loadings against the other genes, per factor and direction; "
                f"p_adj: Benjamini-Hochberg within a factor. {table.attrs['n_sets_tested']} sets tested from "
                f"{Path(gene_sets).name}."
            )
            + table_html(best, float_format="{:.3g}")
            + _figure(plot_enrichment(table, n), "Top enriched sets per factor (adjusted p <= 0.05).")
        )
        return "Gene-set enrichment of factors", body

    return build


def stability_section(result: StabilityResult, *, figure: str | os.PathLike | None = None) -> Section:
    """Per-factor stability across seeds (table and figure) from :func:`factor_stability`.

    ``figure``: a PNG of :func:`ldvae.factors.stability.plot_stability` already written (drawn here
    when omitted)."""
    from ..factors.stability import plot_stability

    f = result.factors
    table = pd.concat([f, result.matches.add_prefix("match_")], axis=1).reset_index()
    rotated = " after a varimax rotation of each run's loadings" if result.rotation == "varimax" else ""
    caption = "Matched |correlation| per factor across seeds."
    body = (
        note_html(
            f"{f.attrs['n_runs']} runs matched to run {result.reference} by loadings correlation{rotated} "
            f"(optimal assignment); stable: median matched |correlation| >= {f.attrs['threshold']}. "
            f"{int(f['stable'].sum())} of {len(f)} of these factors are stable across seeds (the consensus "
            "factors F_k, in 'Reproducible factors', are the ones a re-run of the analysis gives back)."
        )
        + table_html(table, float_format="{:.3f}")
        + (_figure(plot_stability(result), caption) if figure is None else figure_html(figure, caption))
    )
    return "Factor stability across seeds", body


def select_k_section(table: pd.DataFrame) -> Section:
    """Held-out ELBO and stability against K from :func:`ldvae.factors.stability.select_k`."""
    from ..factors.stability import plot_select_k

    nll = ""
    if "nll_validation" in table:
        nll = (
            f" nll_validation: held-out -log p(x) per cell by importance sampling "
            f"({table.attrs.get('n_mc_samples')} samples), lowest at K = {table.attrs.get('lowest_nll_k')}."
        )
    body = (
        note_html(
            f"Chosen K = {table.attrs.get('best_k')}: the smallest K whose held-out ELBO is within one standard "
            f"error of the lowest (K = {table.attrs.get('lowest_elbo_k')}).{nll}"
        )
        + table_html(table.reset_index(), float_format="{:.4g}")
        + _figure(plot_select_k(table), "Held-out ELBO, -log p(x) and stability against the number of factors.")
    )
    return "Choosing the number of factors", body


def interpretation_sections(*, gmt: str | os.PathLike | None = None) -> list:
    """The sections that need only the fitted model: deviance explained, covariate effects
    and, with ``gmt``, gene-set enrichment."""
    sections: list = [deviance_section, covariate_section]
    if gmt is not None:
        sections.append(enrichment_section(gmt))
    return sections


MARK_AUC = 0.8  # a factor marks a group it separates from the other cells at least this well


def factors_table(factors: ConsensusFactors, groups=None, *, n_genes: int = 5) -> pd.DataFrame:
    """One row per factor of :func:`ldvae.factors.consensus.consensus_factors`: its share of the
    model's deviance, reproducibility, the cell group it marks (with ``groups``, one label per
    cell: the group it separates best, by one-vs-rest AUC, or none below ``MARK_AUC``) and its top genes on each side by
    the robust score, with the top genes by raw loading beside."""
    from ..factors.consensus import marked_groups

    t = factors.table
    out = pd.DataFrame({"factor": t.index, "share": t["fraction_of_model"].to_numpy(),
                        "reproducibility": t["reproducibility"].to_numpy(),
                        "consensus reproducibility": t["consensus_reproducibility"].to_numpy(),
                        "reproducible": t["reproducible"].map({True: "yes", False: "no"}).to_numpy()
                        if factors.n_runs > 1 else "not assessed (one fit)"})
    if groups is not None:
        marks = marked_groups(factors, groups)
        name = getattr(groups, "name", None)
        numbered = bool(name) and marks["group"].str.fullmatch(r"\d+").all()  # Leiden's 0, 1, ...: say whose
        label = {g: f"{name} {g}" if numbered else g for g in marks["group"]}
        out["marks"] = [f"{label[m.group]} (AUC {m.auc:.2f})" if m.auc >= MARK_AUC
                        else f"none (best: {label[m.group]}, AUC {m.auc:.2f})" for m in marks.loc[t.index].itertuples()]
    for by, label in (("score", "top genes"), ("loading", "by loading")):
        genes = factors.top_genes(n_genes, by=by)
        for direction in ("+", "-") if by == "score" else ("+",):
            part = genes[genes["direction"] == direction]
            lists = part.groupby("factor", sort=False)["gene"].apply(", ".join)
            out[f"{label} ({direction})"] = [lists.get(f, "") for f in t.index]
    return out


def factor_titles(table: pd.DataFrame, n_genes: int = 3) -> dict[str, str]:
    """A figure panel's title per factor of :func:`factors_table`: the factor, the group it
    marks (where it marks one) and its first genes by score."""
    titles = {}
    for row in table.to_dict("records"):
        marks = str(row.get("marks", "none"))
        head = row["factor"] if marks.startswith("none") else f"{row['factor']}: {marks.split(' (AUC')[0]}"
        titles[row["factor"]] = f"{head}\n{', '.join(str(row['top genes (+)']).split(', ')[:n_genes])}"
    return titles


def factors_title(factors: ConsensusFactors) -> str:
    """The title of :func:`factors_section`, which :func:`summary_html` points to."""
    return "Reproducible factors" if factors.n_runs > 1 else "Factors, rotated (one fit)"


def summary_html(n_cells: int, n_genes: int, factors: ConsensusFactors, table: pd.DataFrame) -> str:
    """Where a reader starts: what was fitted, how many factors come back on a re-run, and per
    factor the group it marks and its top genes (``table``: :func:`factors_table`)."""
    t = factors.table
    found = (f"{int(t['reproducible'].sum())} of {len(t)} factors F_k are reproducible across re-runs "
             f"({factors.n_runs} fits)" if factors.n_runs > 1 else "reproducibility was not assessed (one fit)")
    note = note_html(f"{n_cells} cells, {n_genes} genes modelled, {len(t)} factors; {found}. Name the factors from "
                     f"'{factors_title(factors)}' below; the figures and 'Top loadings by magnitude' show the model's "
                     "own Z_k, as the tutorial does.")
    columns = [c for c in ("factor", "marks", "reproducible", "top genes (+)") if c in table.columns]
    return note + table_html(table[columns])


def factors_section(factors: ConsensusFactors, groups=None, *, group_name: str = "Leiden cluster",
                    figure: str | os.PathLike | None = None, n_genes: int = 5,
                    own_factors: str | None = "Top loadings by magnitude") -> Section:
    """The reproducible factors: how they were found, and per factor its share, reproducibility,
    the group it marks and its top genes (see :func:`factors_table`). ``own_factors``: the
    report's section of the model's own factors Z_k, which the note points to (None: none)."""
    t = factors.table
    n_runs = factors.n_runs
    simple = {"latent": "the latent (each factor high in few cells)",
              "loadings": "the loadings (each factor loading on few genes)"}[factors.criterion]
    if n_runs > 1:
        found = (f"{n_runs} fits that differ only by their seed, aligned by rotation (generalized Procrustes "
                 f"over cells), averaged and rotated to simple structure of {simple}. "
                 f"{int(t['reproducible'].sum())} of {len(t)} factors are reproducible: a re-run of the analysis "
                 f"with {n_runs} other seeds (the same cells held out, the same start from the principal "
                 f"components, as ldvae run has them) is expected to give the same factor with |correlation| "
                 f"over cells >= {t.attrs.get('threshold')} (consensus reproducibility: the consensus of each half of the "
                 f"fits against the other, stepped up to all fits by Spearman-Brown). One fit, rotated on its "
                 f"own, matches another with the median |correlation| in 'reproducibility'. ")
    else:
        found = (f"one fit, rotated to simple structure of {simple}; reproducibility needs more fits "
                 "(--stability-seeds). ")
    note = note_html(
        "Factors F_k in order of the deviance they explain (share: of the deviance the model explains, mean "
        "over the fits), signed so that their long tail is positive (over cells for the latent's simple "
        "structure, over genes for the loadings'). They are " + found
        + "A rotation leaves the model, its likelihood and its ELBO unchanged"
        + (f"; the model's own factors Z_k are in '{own_factors}'. " if own_factors else ". ")
        + "Top genes are ranked by score = loading x sqrt(Fisher information "
        "of the gene's log-rate): the change of expected count per unit factor in units of its noise, so "
        "weakly expressed genes with large loadings do not lead; 'by loading' ranks the raw "
        + ("consensus " if n_runs > 1 else "") + "loading. "
        + (f"marks: the {group_name} the factor separates best from the other cells (one-vs-rest AUC), "
           f"'none' below AUC {MARK_AUC}." if groups is not None else "")
    )
    body = note + table_html(factors_table(factors, groups, n_genes=n_genes), float_format="{:.2f}")
    if figure is not None:
        body += figure_html(figure, "UMAP coloured by each factor F_k.")
    return factors_title(factors), body
