"""Factors that come back when the analysis is re-run: one set from several fits.

The prior N(0, I) and the likelihood of an LDVAE are unchanged by any rotation of the
latent space (``z -> z R``, ``W -> W R``), so fits that differ only by their seed agree
on the space their factors span far better than on its axes. :func:`consensus_factors`
turns several fits of the same model into one set of factors:

1. **Align.** Each run's latent means (cells x K, centred) are rotated onto a common
   frame by orthogonal Procrustes, iterated against their mean (generalized Procrustes).
2. **Rotate to simple structure.** The mean of the aligned runs is rotated by varimax,
   either of the latent (``criterion="latent"``: each factor high in few cells, so cell
   populations get one factor each) or of the loadings (``"loadings"``: each factor
   loading on few genes). ``"auto"`` rotates every run by its own rotation under each
   criterion and takes the loadings only where independent runs disagree at most half as
   much under them, else the latent.
3. **Name.** Factors ``F_0 … F_{K-1}`` in order of the deviance they explain (averaged over
   the runs, so that one run's noise does not swap close factors), signed so that the long
   tail is positive: of the factor's latent over cells (high in the cells it marks) for
   ``"latent"``, of its consensus loadings over genes for ``"loadings"`` (a third moment
   is steadier between re-runs than the sign of the single largest loading).

Each run's factors are exactly a rotation of its own model (``runs_rotations[s]``), so the
model, its ELBO and ``get_loadings()`` are untouched. A factor's ``reproducibility`` is the
median, over pairs of runs each rotated by its own rotation (no shared alignment), of the
correlation over cells between the factors matched to it: what a re-run of one fit would
give. The consensus of several runs is itself more reproducible than that: its
``consensus_reproducibility`` estimates the correlation with the factor of a re-run of the
whole analysis (as many fits, other seeds) by splitting the runs into halves, taking the
consensus of each half and stepping the halves' correlation up to all runs
(Spearman-Brown). A factor is ``reproducible`` when that estimate reaches the threshold.

Top genes are ranked by a ``score`` robust to weakly expressed genes: the loading times
the square root of the gene's Fisher information for its log-rate, averaged over cells
(mu theta / (mu + theta) for the negative binomial, mu for Poisson). It is the change of
the gene's expected count per unit of the factor, in units of the count's noise, so a
large weight on a gene seen in few cells no longer ranks first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .stability import STABLE_THRESHOLD, varimax

if TYPE_CHECKING:
    from ..model import LinearSCVI

logger = logging.getLogger(__name__)

CRITERIA = ("auto", "latent", "loadings")
ROTATION_CELLS = 20000  # cells (a fixed random subset) that the rotations are computed from
INFORMATION_CELLS = 5000  # cells used for each gene's Fisher information
SPLITS = 10  # random half-splits of the runs behind consensus_reproducibility
# "auto" takes the loadings when single fits rotated by them disagree at most this fraction
# as much as rotated by the latent: sparse gene programs there (0.07 against 0.005 on a
# simulation), while on PBMC data the two are close (0.16-0.23), where a nearer choice
# flipped between re-runs of the same analysis (bench/RESULTS.md 2026-12-07 (i)).
LOADINGS_DISAGREEMENT = 0.5


@dataclass(frozen=True)
class ConsensusFactors:
    """Factors of several runs, aligned, rotated to simple structure and averaged.

    Attributes
    ----------
    table
        One row per factor ``F_k`` (ordered by deviance explained): ``fraction_of_model``
        (share of the deviance the model explains, mean over the runs),
        ``reproducibility`` (one fit against another, median over pairs), ``min_correlation``
        (their minimum), ``consensus_reproducibility`` (this consensus against that of a re-run
        with as many fits, estimated) and ``reproducible`` (``consensus_reproducibility`` >=
        ``threshold``).
    latent
        Cells x factors: mean over runs of each run's rotated latent means.
    loadings
        Genes x factors: mean over runs of the rotated loadings (log-rate per unit factor).
    scores
        Genes x factors: ``loadings`` times the square root of each gene's Fisher
        information, the robust ranking of top genes.
    rotations
        Per run (read back from AnnData: the main run's only), the orthogonal K x K matrix R_s with run s's factors = ``z_s @ R_s``
        (columns in the order of ``table``), loadings ``W_s @ R_s``.
    criterion
        ``"latent"`` or ``"loadings"``: the simple structure used.
    agreement
        Per criterion tried, the mean matched correlation of independently rotated runs.
    """

    table: pd.DataFrame
    latent: pd.DataFrame
    loadings: pd.DataFrame
    scores: pd.DataFrame
    rotations: list
    criterion: str
    agreement: dict = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return int(self.table.attrs.get("n_runs", len(self.rotations)))

    def top_genes(self, n: int = 10, *, by: Literal["score", "loading"] = "score") -> pd.DataFrame:
        """Per factor the ``n`` top genes on the positive and the negative side, ranked by
        ``score`` (default) or by the raw consensus loading: columns ``factor``,
        ``direction`` (``+``/``-``), ``rank``, ``gene``, ``score``, ``loading``."""
        if by not in ("score", "loading"):
            raise ValueError(f"by must be 'score' or 'loading', got {by!r}.")
        rank_on = self.scores if by == "score" else self.loadings
        rows = []
        for f in self.table.index:
            values = rank_on[f].to_numpy()
            for direction, order in (("+", np.argsort(-values, kind="stable")), ("-", np.argsort(values, kind="stable"))):
                for r, g in enumerate(order[:n]):
                    if (values[g] > 0) != (direction == "+") or values[g] == 0:
                        break
                    gene = rank_on.index[g]
                    rows.append((f, direction, r + 1, gene, float(self.scores.at[gene, f]),
                                 float(self.loadings.at[gene, f])))
        return pd.DataFrame(rows, columns=["factor", "direction", "rank", "gene", "score", "loading"])


def _centred_latents(models, rows: np.ndarray) -> list[np.ndarray]:
    out = []
    for m in models:
        z = np.asarray(m.get_latent_representation(indices=rows), dtype=float)
        out.append(z - z.mean(axis=0))
    return out


def _procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The orthogonal R minimizing ||a R - b||."""
    u, _, vt = np.linalg.svd(a.T @ b)
    return u @ vt


def _align(latents: list[np.ndarray], iterations: int = 50, tol: float = 1e-10) -> list[np.ndarray]:
    """Generalized Procrustes: per run P_s such that latents[s] @ P_s agree best, with run 0's frame."""
    mean = latents[0]
    rotations = [np.eye(mean.shape[1]) for _ in latents]
    previous = np.inf
    for _ in range(iterations):
        rotations = [_procrustes(z, mean) for z in latents]
        mean = np.mean([z @ r for z, r in zip(latents, rotations)], axis=0)
        spread = sum(float(((z @ r - mean) ** 2).sum()) for z, r in zip(latents, rotations))
        if previous - spread <= tol * max(spread, 1e-300):
            break
        previous = spread
    return rotations


def _simple_rotation(criterion: str, latent: np.ndarray, loadings: np.ndarray) -> np.ndarray:
    return varimax(latent if criterion == "latent" else loadings)[1]


def _column_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    norm = np.linalg.norm(a, axis=0)[:, None] * np.linalg.norm(b, axis=0)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num((a.T @ b) / norm, nan=0.0)


def _matched(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column of ``other`` matched to each column of ``reference`` and the |correlation|."""
    c = np.abs(_column_correlations(reference, other))
    rows, cols = linear_sum_assignment(-c)
    match = np.empty(reference.shape[1], dtype=int)
    match[rows] = cols
    return match, c[rows, cols][np.argsort(rows)]


def _own_factors(criterion: str, latents, loadings) -> list[np.ndarray]:
    """Each run's latent rotated by its own simple-structure rotation (no shared alignment)."""
    return [z @ _simple_rotation(criterion, z, w) for z, w in zip(latents, loadings)]


def _agreement(factors: list[np.ndarray]) -> float:
    pairs = [(s, t) for s in range(len(factors)) for t in range(s + 1, len(factors))]
    return float(np.mean([_matched(factors[s], factors[t])[1].mean() for s, t in pairs]))


def _auto_criterion(agreement: dict[str, float]) -> str:
    """The latent (cell populations, one factor each), unless the fits agree clearly better
    under the loadings (sparse gene programs): a choice a re-run with other seeds keeps."""
    if "loadings" in agreement and 1.0 - agreement["loadings"] <= LOADINGS_DISAGREEMENT * (1.0 - agreement["latent"]):
        return "loadings"
    return "latent"


def _reproducibility(consensus: np.ndarray, factors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per consensus factor: median and minimum, over pairs of runs, of the correlation
    between the runs' own factors matched to it."""
    matches = [_matched(consensus, f)[0] for f in factors]
    k = consensus.shape[1]
    per_pair = []
    for s in range(len(factors)):
        for t in range(s + 1, len(factors)):
            c = np.abs(_column_correlations(factors[s], factors[t]))
            per_pair.append(c[matches[s], matches[t]])
    if not per_pair:
        return np.full(k, np.nan), np.full(k, np.nan)
    per_pair = np.array(per_pair)
    return np.median(per_pair, axis=0), per_pair.min(axis=0)


def _consensus_rotations(latents, weights, criterion: str) -> list[np.ndarray]:
    """Per run, the rotation onto the consensus: the runs aligned (generalized Procrustes),
    and their mean rotated to simple structure."""
    align = _align(latents)
    mean_latent = np.mean([z @ p for z, p in zip(latents, align)], axis=0)
    mean_weights = np.mean([w @ p for w, p in zip(weights, align)], axis=0)
    final = _simple_rotation(criterion, mean_latent, mean_weights)
    return [p @ final for p in align]


def _deviance_shares(models, rotations, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Per rotated factor, the share of its model's explained deviance that it explains
    (``fraction_of_model``; each run rotated by its own rotation, on the cells ``rows``),
    averaged over the runs; and the mean fraction of the null deviance the models explain."""
    from .interpret import factor_deviance

    shares, explained = [], []
    for model, rotation in zip(models, rotations):
        d = factor_deviance(model, rotation=rotation, indices=rows)
        share = np.empty(len(d))
        share[[int(str(v).split("_")[1]) for v in d.index]] = d["fraction_of_model"].to_numpy()
        shares.append(share)
        explained.append(float(d.attrs["fraction_explained"]))
    return np.mean(shares, axis=0), float(np.mean(explained))


def _consensus_of(latents, weights, criterion: str) -> np.ndarray:
    """The consensus latent of some runs: the mean of their latents, each rotated onto it."""
    return np.mean([z @ r for z, r in zip(latents, _consensus_rotations(latents, weights, criterion))], axis=0)


def _split_half(consensus: np.ndarray, latents, weights, criterion: str, *, n_splits: int = SPLITS,
                seed: int = 0) -> np.ndarray:
    """Per consensus factor, the correlation expected between this consensus and that of a
    re-run with as many fits: the runs split into two halves (``n_splits`` random splits),
    each half's consensus matched to ``consensus``, the halves' |correlation| per factor
    (median over splits), stepped up from the halves to all runs by Spearman-Brown (``2 r /
    (1 + r)`` for halves of equal size, see :func:`_step_up`). NaN with fewer than 2 runs."""
    n = len(latents)
    if n < 2:
        return np.full(consensus.shape[1], np.nan)
    rng = np.random.default_rng(seed)
    per_split = []
    for _ in range(n_splits):
        order = rng.permutation(n)
        halves = [order[: n // 2], order[n // 2:]]
        found = [_consensus_of([latents[i] for i in h], [weights[i] for i in h], criterion) for h in halves]
        (match_a, _), (match_b, _) = (_matched(consensus, f) for f in found)
        c = np.abs(_column_correlations(found[0], found[1]))
        per_split.append(c[match_a, match_b])
    r = np.median(np.array(per_split), axis=0)
    return _step_up(r, n // 2, n - n // 2)


def _step_up(r: np.ndarray, a: int, b: int) -> np.ndarray:
    """Spearman-Brown from the correlation ``r`` between the consensus of ``a`` runs and that
    of ``b`` others to the reliability of all ``a + b``: one run's reliability x solves
    r^2 = R_a(x) R_b(x), with R_m(x) = m x / (1 + (m - 1) x) (a quadratic in x; for a = b,
    x = R_a^-1(r) and the result is 2 r / (1 + r)); the result is R_{a+b}(x)."""
    r2 = np.square(np.clip(r, 0.0, 1.0))
    qa = r2 * (a - 1) * (b - 1) - a * b  # < 0
    qb = r2 * (a + b - 2)
    x = (-qb - np.sqrt(qb * qb - 4 * qa * r2)) / (2 * qa)
    n = a + b
    return n * x / (1 + (n - 1) * x)


def gene_information(model: LinearSCVI, *, n_cells: int = INFORMATION_CELLS, seed: int = 0) -> pd.Series:
    """Each gene's Fisher information for its log-rate, averaged over cells: mu theta / (mu + theta)
    under the negative binomial (also for ZINB, its count part), mu under Poisson; mu and
    theta decoded from one posterior draw of z and the library per cell (as scvi-tools'
    ``get_likelihood_parameters`` decodes them; the draws follow ``ldvae.settings.seed`` and
    average out over the cells: the mean moves by about 2 % between seeds). Computed on at
    most ``n_cells`` cells (a fixed random subset)."""
    n = model.adata.n_obs
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, n_cells, replace=False)) if n > n_cells else np.arange(n)
    params = model.get_likelihood_parameters(indices=rows, give_mean=True)
    mu = np.asarray(params["mean"], dtype=float)
    theta = params.get("dispersions")
    info = mu if theta is None else mu * theta / (mu + theta)
    return pd.Series(info.mean(axis=0), index=model.get_loadings().index.copy(), name="information")


def consensus_factors(
    models: Sequence[LinearSCVI],
    *,
    criterion: Literal["auto", "latent", "loadings"] = "auto",
    threshold: float = STABLE_THRESHOLD,
    n_cells: int = ROTATION_CELLS,
    seed: int = 0,
) -> ConsensusFactors:
    """One set of factors from fits of the same model that differ by their seed.

    Parameters
    ----------
    models
        Trained :class:`ldvae.LinearSCVI` models on the same cells and genes (e.g. from
        :func:`ldvae.factors.stability.fit_seeds`); the first is the main run, whose
        genes' Fisher information makes the scores. One model gives its rotated factors
        without reproducibility.
    criterion
        The simple structure to rotate to: ``"latent"`` (varimax of the latent means),
        ``"loadings"`` (varimax of the loadings) or ``"auto"``: the loadings where
        independently rotated runs disagree at most half as much under them as under the
        latent, else the latent (also for a single run).
    threshold
        ``reproducible`` marks factors whose reproducibility reaches it.
    n_cells
        Cells (a fixed random subset of at most this many) used for the alignment, the
        rotation and the deviance shares; the latent of every cell is returned.
    seed
        Picks that subset.

    Returns
    -------
    ConsensusFactors
    """
    from ..model import LinearSCVI

    models = list(models)
    if not models or not all(isinstance(m, LinearSCVI) for m in models):
        raise TypeError("consensus_factors takes a list of trained ldvae.LinearSCVI models.")
    for m in models:
        m._check_trained()
        if m.config.latent_distribution != "normal":
            raise ValueError("consensus_factors needs latent_distribution='normal': softmax(z) is not rotation invariant.")
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        if m.adata.n_obs != first.adata.n_obs or not m.get_loadings().index.equals(first.get_loadings().index):
            raise ValueError(f"run {i} has other cells or genes than run 0; fit every run on the same AnnData.")
        if m.config.n_latent != first.config.n_latent:
            raise ValueError(f"run {i} has {m.config.n_latent} factors, run 0 {first.config.n_latent}.")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    k = first.config.n_latent
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells < k + 2:
        raise ValueError(f"n_cells must be an integer of at least n_latent + 2 = {k + 2} (the cells that fix the "
                         f"rotation), got {n_cells!r}.")

    n = first.adata.n_obs
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, n_cells, replace=False)) if n > n_cells else np.arange(n)
    latents = _centred_latents(models, rows)
    weights = [np.nan_to_num(m.get_loadings().to_numpy(dtype=float), nan=0.0) for m in models]

    agreement: dict[str, float] = {}
    own: dict[str, list[np.ndarray]] = {}
    if len(models) > 1:
        for c in ("latent", "loadings") if criterion == "auto" else (criterion,):
            own[c] = _own_factors(c, latents, weights)
            agreement[c] = _agreement(own[c])
    if criterion == "auto":
        criterion = _auto_criterion(agreement)

    rotations = _consensus_rotations(latents, weights, criterion)

    shares, explained = _deviance_shares(models, rotations, rows)
    order = np.argsort(-shares, kind="stable")
    loadings = np.mean([w @ r for w, r in zip(weights, rotations)], axis=0)[:, order]
    consensus_rows = np.mean([z @ r for z, r in zip(latents, rotations)], axis=0)[:, order]
    names = [f"F_{k}" for k in range(len(order))]
    genes = first.get_loadings().index
    # the long tail positive: over cells (the cells a factor marks) or over genes
    tail = consensus_rows if criterion == "latent" else loadings
    signs = np.where((tail**3).mean(axis=0) < 0, -1.0, 1.0)
    rotations = [r[:, order] * signs[None, :] for r in rotations]
    loadings = loadings * signs[None, :]
    consensus_rows = consensus_rows * signs[None, :]
    if criterion in own:
        median, minimum = _reproducibility(consensus_rows, own[criterion])
    else:
        median = minimum = np.full(len(names), np.nan)
    of_consensus = _split_half(consensus_rows, latents, weights, criterion, seed=seed)
    full = [np.asarray(m.get_latent_representation(), dtype=float) for m in models]
    latent = np.mean([z @ r for z, r in zip(full, rotations)], axis=0)

    info = gene_information(first, seed=seed)
    loadings_frame = pd.DataFrame(loadings, index=genes.copy(), columns=names)
    nan_rows = first.get_loadings().isna().any(axis=1).to_numpy()
    loadings_frame[nan_rows] = np.nan
    scores = loadings_frame * np.sqrt(info.to_numpy())[:, None]
    table = pd.DataFrame(
        {
            "fraction_of_model": shares[order],
            "reproducibility": median,
            "min_correlation": minimum,
            "consensus_reproducibility": of_consensus,
            "reproducible": np.nan_to_num(of_consensus, nan=0.0) >= threshold,
        },
        index=pd.Index(names, name="factor"),
    )
    table.attrs.update(threshold=float(threshold), n_runs=len(models), criterion=criterion,
                       fraction_explained=explained)
    found = (f"{int(table['reproducible'].sum())} of {len(names)} reproducible, from {len(models)} fits"
             if len(models) > 1 else "reproducibility not assessed (one fit)")
    logger.info("consensus factors (F_k): %s (rotation to simple structure of the %s)", found, criterion)
    return ConsensusFactors(
        table=table,
        latent=pd.DataFrame(latent, index=first.adata.obs_names.copy(), columns=names),
        loadings=loadings_frame,
        scores=scores,
        rotations=rotations,
        criterion=criterion,
        agreement=agreement,
    )


def marked_groups(factors: ConsensusFactors | pd.DataFrame, groups) -> pd.DataFrame:
    """The cell group each factor marks: per factor, the group it separates best from the
    other cells, by the one-vs-rest AUC of the factor (the probability that a cell of the
    group scores above a cell outside it; factors are signed to be high where they mark),
    that group's mean factor value, and the runner-up group with its mean and AUC.

    ``groups``: one label per cell (e.g. ``adata.obs["leiden"]``); a Series is matched to the
    cells by its index. Cells without a label (NaN) are left out."""
    latent = factors.latent if isinstance(factors, ConsensusFactors) else factors
    if isinstance(groups, pd.Series) and not groups.index.equals(latent.index):
        if not latent.index.isin(groups.index).all() or groups.index.has_duplicates:
            raise ValueError("groups is a Series whose index does not name every cell of the factors once; pass "
                             "one label per cell (e.g. adata.obs[key] of the factors' AnnData).")
        groups = groups.reindex(latent.index)
    raw = np.asarray(groups, dtype=object)
    if len(raw) != latent.shape[0]:
        raise ValueError(f"groups has {len(raw)} labels for {latent.shape[0]} cells.")
    values = pd.Series(raw, index=latent.index)
    known = values.notna().to_numpy()
    if not known.any():
        raise ValueError("groups has no labels (all NaN).")
    latent, labels = latent[known], values[known].astype(str).to_numpy()
    from scipy.stats import rankdata

    means = latent.groupby(labels, observed=True).mean()
    sizes = pd.Series(labels).value_counts().reindex(means.index).to_numpy(dtype=float)
    rest = len(labels) - sizes
    rows = []
    for f in latent.columns:
        rank_sums = pd.Series(rankdata(latent[f].to_numpy())).groupby(labels).sum().reindex(means.index).to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):  # a single group has no rest
            auc = pd.Series((rank_sums - sizes * (sizes + 1) / 2) / (sizes * rest), index=means.index)
        ranked = auc.sort_values(ascending=False, kind="stable")
        top = ranked.index[0]
        nxt = ranked.index[1] if len(ranked) > 1 else None
        rows.append((f, top, float(means.at[top, f]), nxt or "", np.nan if nxt is None else float(means.at[nxt, f]),
                     float(ranked.iloc[0]), np.nan if nxt is None else float(ranked.iloc[1])))
    return pd.DataFrame(rows, columns=["factor", "group", "mean", "next_group", "next_mean", "auc", "next_auc"]
                        ).set_index("factor")


# --- into and out of AnnData ------------------------------------------------------------------------


def write_factors(adata, factors: ConsensusFactors, *, key_added: str = "ldvae", obs_columns: bool = False) -> None:
    """Write the factors into ``adata`` (the cells and genes of the runs), scanpy style.

    Writes ``obsm[f"X_{key_added}_factors"]`` (consensus latent), ``varm[f"{key_added}_factor_loadings"]``
    and ``varm[f"{key_added}_factor_scores"]`` (genes not modelled: NaN),
    ``uns[f"{key_added}_factors"]`` (``names``, ``table``, ``criterion``, ``n_runs``,
    ``threshold``, ``agreement`` and ``rotation``: the main run's R, ``z @ R`` its factors)
    and, with ``obs_columns``, ``obs["F_0"] …`` (``obs["<key_added>_F_0"] …`` for another key, as
    ``write_results`` names its ``Z_k``).
    """
    from ..data.contract import check_not_view
    from ..data.results import result_keys, set_obs_columns

    result_keys(key_added)  # a bad key is refused before anything is written
    check_not_view(adata, "write_factors")
    if adata.n_obs != factors.latent.shape[0] or not adata.obs_names.equals(factors.latent.index):
        raise ValueError("adata must hold the cells the factors were found on, in the same order.")
    names = list(factors.table.index)
    adata.obsm[f"X_{key_added}_factors"] = factors.latent.to_numpy(dtype=np.float32)
    for frame, what in ((factors.loadings, "loadings"), (factors.scores, "scores")):
        adata.varm[f"{key_added}_factor_{what}"] = frame.reindex(adata.var_names).to_numpy(dtype=np.float32)
    table = factors.table
    adata.uns[f"{key_added}_factors"] = {
        "names": np.asarray(names, dtype=object),
        "table": {c: table[c].to_numpy() for c in table.columns},
        "criterion": factors.criterion,
        "n_runs": int(factors.n_runs),
        "threshold": float(table.attrs.get("threshold", STABLE_THRESHOLD)),
        "agreement": {k: float(v) for k, v in factors.agreement.items()},
        "rotation": np.asarray(factors.rotations[0], dtype=float),
    }
    if obs_columns:
        prefix = "" if key_added == "ldvae" else f"{key_added}_"
        set_obs_columns(adata, {prefix + name: factors.latent[name].to_numpy(dtype=np.float32) for name in names})


def read_factors(adata, *, key_added: str = "ldvae") -> ConsensusFactors:
    """The factors that :func:`write_factors` wrote into ``adata`` (``rotations`` holds the
    main run's only; ``n_runs`` says how many runs they came from)."""
    key = f"{key_added}_factors"
    if key not in adata.uns:
        raise KeyError(f"adata.uns has no {key!r}: the factors were not written (ldvae run writes them).")
    rec = adata.uns[key]
    names = [str(n) for n in rec["names"]]
    columns = ["fraction_of_model", "reproducibility", "min_correlation", "consensus_reproducibility",
               "reproducible"]  # h5ad sorts the keys
    nan = np.full(len(names), np.nan)  # factors written before the consensus estimate existed
    table = pd.DataFrame({c: np.asarray(rec["table"].get(c, nan)) for c in columns}, index=pd.Index(names, name="factor"))
    table["reproducible"] = table["reproducible"].astype(bool)
    table.attrs.update(threshold=float(rec["threshold"]), n_runs=int(rec["n_runs"]), criterion=str(rec["criterion"]))
    frame = lambda m: pd.DataFrame(np.asarray(m, dtype=float), index=adata.var_names.copy(), columns=names)  # noqa: E731
    return ConsensusFactors(
        table=table,
        latent=pd.DataFrame(np.asarray(adata.obsm[f"X_{key_added}_factors"], dtype=float),
                            index=adata.obs_names.copy(), columns=names),
        loadings=frame(adata.varm[f"{key_added}_factor_loadings"]),
        scores=frame(adata.varm[f"{key_added}_factor_scores"]),
        rotations=[np.asarray(rec["rotation"], dtype=float)],
        criterion=str(rec["criterion"]),
        agreement={k: float(v) for k, v in dict(rec.get("agreement", {})).items()},
    )
