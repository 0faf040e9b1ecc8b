"""ldvae and scvi-tools LinearSCVI side by side, on the same data, cells and machine.

    bash bench/setup_scvi_env.sh                        # once: .bench-venv with scvi-tools 1.4.2
    .venv/bin/python bench/compare_scvi.py              # full run (hours on 2 busy cores)
    .venv/bin/python bench/compare_scvi.py --epochs 30 --repeats 2 --scaling-sizes 10000,100000

Three parts (``--parts``), each run as fresh processes so peak RSS is per run:

1. ``recipe``: the tutorial recipe (bench/tutorial_recipe.py and its scvi-tools twin
   bench/_scvi_recipe.py), alternating ldvae and scvi-tools ``--repeats`` times: medians
   of training wall time, CPU time, peak RSS and final validation ELBO. Both packages
   validate on the same cells (scvi-tools' seeded split, checked by hash).
2. ``ttq``: time to quality, ldvae at its fast settings (bench/time_to_quality.py) until
   it reaches the validation ELBO of scvi-tools' recipe run (``--target-from`` a JSON of
   a 250-epoch scvi-tools run, else this invocation's own scvi-tools runs).
3. ``scaling``: seconds per epoch and peak RSS on simulated counts (bench/scaling.py),
   ldvae at every ``--scaling-sizes``, scvi-tools at ``--scvi-scaling-sizes``.

Threads: both packages run with ``--threads`` (default 1) threads (torch's, and ldvae's
compiled step's); ``--threads 0`` leaves each at its own default (every core for both). On a
machine shared with other jobs one thread per process gives the steadiest timings.
Results go to bench/out/compare_*.json and a table to ``--results`` (bench/out/compare.md);
bench/RESULTS.md is the curated record, edited by hand from these.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from _common import BENCH_DIR, REPO
from ldvae.model.params import PRESETS

LDVAE_PY = REPO / ".venv" / "bin" / "python"
SCVI_PY = REPO / ".bench-venv" / "bin" / "python"
OUT = BENCH_DIR / "out"


def _run(python: Path, script: str, args: list[str], threads: int) -> dict:
    """One benchmark process; ``threads`` 0: each package at its own default thread counts."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    else:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env.pop(name, None)
    cmd = [str(python), str(BENCH_DIR / script), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=BENCH_DIR, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1])
    print("  ->", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k != "curve"}, flush=True)
    return res


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def part_recipe(args) -> dict:
    common = ["--epochs", str(args.epochs), "--batch-size", "128", "--lr", "5e-3", "--check-val-every", "10"]
    runs: dict[str, list[dict]] = {"ldvae": [], "scvi": []}
    # One untimed epoch of each first: one-time work that a fresh install or an edited
    # kernel would add to the first timed run (numba compiling into its cache; files read
    # into the page cache) stays out of the medians.
    warm = ["--epochs", "1", "--batch-size", "128", "--lr", "5e-3", "--check-val-every", "1"]
    _run(LDVAE_PY, "tutorial_recipe.py", [*warm, "--json"], args.threads)
    _run(SCVI_PY, "_scvi_recipe.py", warm, args.threads)
    for _ in range(args.repeats):
        runs["ldvae"].append(_run(LDVAE_PY, "tutorial_recipe.py", [*common, "--json"], args.threads))
        runs["scvi"].append(_run(SCVI_PY, "_scvi_recipe.py", common, args.threads))
    hashes = {r["validation_sha1"] for rs in runs.values() for r in rs}
    summary = {
        name: {k: _median(rs, k) for k in ("train_wall_s", "train_cpu_s", "peak_rss_mib", "elbo_validation")}
        for name, rs in runs.items()
    }
    summary["same_validation_cells"] = len(hashes) == 1
    summary["epochs"], summary["repeats"] = args.epochs, args.repeats
    return {"runs": runs, "summary": summary}


def part_ttq(args, recipe: dict | None) -> dict:
    if args.target_from:
        scvi_ref = json.loads(Path(args.target_from).read_text())
    elif recipe is not None:
        scvi_ref = {"elbo_validation": recipe["summary"]["scvi"]["elbo_validation"],
                    "train_wall_s": recipe["summary"]["scvi"]["train_wall_s"],
                    "train_cpu_s": recipe["summary"]["scvi"]["train_cpu_s"], "epochs": args.epochs}
    else:
        raise SystemExit("--parts ttq needs --target-from (a scvi-tools recipe JSON) or the recipe part.")
    target = scvi_ref["elbo_validation"]
    runs = [
        _run(LDVAE_PY, "time_to_quality.py",
             ["--target", str(target), "--batch-size", str(args.ttq_batch_size), "--warmup-epochs", str(args.ttq_warmup),
              "--max-epochs", str(args.ttq_max_epochs),
              *(["--lr", str(args.ttq_lr)] if args.ttq_lr else []),
              *(["--bn-momentum", str(args.ttq_bn_momentum)] if args.ttq_bn_momentum else []),
              *(["--ema-decay", str(args.ttq_ema_decay)] if args.ttq_ema_decay else []),
              "--train-seed", str(train_seed)],  # the same validation cells; another training draw
             args.threads)
        for train_seed in range(args.ttq_repeats)
    ]
    return {"target": target, "scvi_reference": scvi_ref, "runs": runs,
            "summary": {"wall_s": _median(runs, "wall_s"), "cpu_s": _median(runs, "cpu_s"),
                        "epochs": _median(runs, "epochs"),
                        "reached": all(r["reached"] for r in runs)}}


def part_scaling(args) -> dict:
    rows = []
    for n in args.scaling_sizes:
        rows.append(_run(LDVAE_PY, "scaling.py", ["--n-cells", str(n), "--epochs", str(args.scaling_epochs), "--json"],
                         args.threads))
        if n in args.scvi_scaling_sizes:
            h5ad = OUT / f"sim_{n}.h5ad"
            if not h5ad.exists():
                subprocess.run([str(LDVAE_PY), str(BENCH_DIR / "scaling.py"), "--n-cells", str(n), "--write-h5ad", str(h5ad)],
                               cwd=BENCH_DIR, check=True)
            res = _run(SCVI_PY, "_scvi_recipe.py",
                       ["--h5ad", str(h5ad), "--epochs", str(args.scaling_epochs), "--train-size", "1.0"], args.threads)
            rows.append(res)
    return {"rows": rows}


def _fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def write_results(path: Path, args, parts: dict) -> str:
    lines = [
        "# ldvae vs scvi-tools LinearSCVI",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores ({_cpu_name()}), shared with other jobs during the run",
        f"- threads per process: {args.threads}",
        f"- command: `{' '.join(['.venv/bin/python', 'bench/compare_scvi.py', *sys.argv[1:]])}`",
        "",
    ]
    if "recipe" in parts:
        s = parts["recipe"]["summary"]
        lv, sv = s["ldvae"], s["scvi"]
        ratio = sv["train_wall_s"] / lv["train_wall_s"]
        cpu_ratio = sv["train_cpu_s"] / lv["train_cpu_s"]
        lines += [
            f"## Tutorial recipe ({s['epochs']} epochs, batch 128, lr 5e-3; medians of {s['repeats']}, alternating)",
            "",
            "| | train wall s | train CPU s | peak RSS MiB | validation ELBO |",
            "|---|---:|---:|---:|---:|",
            f"| ldvae | {_fmt(lv['train_wall_s'])} | {_fmt(lv['train_cpu_s'])} | {_fmt(lv['peak_rss_mib'], '.0f')} | {_fmt(lv['elbo_validation'], '.2f')} |",
            f"| scvi-tools | {_fmt(sv['train_wall_s'])} | {_fmt(sv['train_cpu_s'])} | {_fmt(sv['peak_rss_mib'], '.0f')} | {_fmt(sv['elbo_validation'], '.2f')} |",
            f"| ratio | {ratio:.2f}× | {cpu_ratio:.2f}× | | {100 * (lv['elbo_validation'] / sv['elbo_validation'] - 1):+.2f} % |",
            "",
            f"Same validation cells: {s['same_validation_cells']}.",
            "",
        ]
    if "ttq" in parts:
        t = parts["ttq"]
        ref = t["scvi_reference"]
        w = t["summary"]["wall_s"]
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in t["runs"])
        lines += [
            "## Time to scvi-tools' quality",
            "",
            f"Target: validation ELBO {t['target']:.2f} (scvi-tools after {ref.get('epochs')} epochs, "
            f"{ref['train_wall_s']:.0f} s wall, {ref['train_cpu_s']:.0f} s CPU).",
            "",
            "| ldvae settings | reached | epochs | wall s | CPU s | speed-up (wall) | speed-up (CPU) |",
            "|---|---|---:|---:|---:|---:|---:|",
            f"| batch {args.ttq_batch_size}, lr {t['runs'][0]['lr']:.3g}, warm-up {args.ttq_warmup} epochs"
            f"{'' if not args.ttq_bn_momentum else f', batch-norm momentum {args.ttq_bn_momentum}'}"
            f"{'' if not args.ttq_ema_decay else f', ema_decay {args.ttq_ema_decay}'} | "
            f"{t['summary']['reached']} | {_fmt(t['summary']['epochs'], '.0f')} | {_fmt(w)} | "
            f"{_fmt(t['summary']['cpu_s'])} | {ref['train_wall_s'] / w:.1f}× | "
            f"{ref['train_cpu_s'] / t['summary']['cpu_s']:.1f}× |",
            "",
            f"Medians over training seeds 0-{len(t['runs']) - 1} (same validation cells): epochs "
            f"{', '.join(str(r['epochs']) for r in t['runs'])}; wall s {walls}.",
            "",
        ]
    if "scaling" in parts:
        lines += [
            f"## Scaling (simulated, 1000 genes; {args.scaling_epochs} epoch(s), batch 128, no validation)",
            "",
            "| cells | package | wall s / epoch | CPU s / epoch | peak RSS MiB |",
            "|---:|---|---:|---:|---:|",
        ]
        for r in parts["scaling"]["rows"]:
            lines.append(f"| {r['n_cells']:,} | {r['package']} | {_fmt(r['s_per_epoch'], '.2f')} | {_fmt(r.get('cpu_s_per_epoch'), '.2f')} | {_fmt(r['peak_rss_mib'], '.0f')} |")
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="recipe,ttq,scaling")
    ap.add_argument("--epochs", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-from", default=None, help="JSON of a scvi-tools recipe run (its elbo_validation)")
    # ldvae's fast settings (bench/RESULTS.md, "Choosing the fast settings")
    fast = PRESETS["fast"]  # the ttq part's defaults: train(preset="fast")'s settings
    ap.add_argument("--ttq-batch-size", type=int, default=128)
    ap.add_argument("--ttq-lr", type=float, default=fast["lr"])
    ap.add_argument("--ttq-warmup", type=int, default=fast["n_epochs_kl_warmup"])
    ap.add_argument("--ttq-bn-momentum", type=float, default=fast["batch_norm_momentum"])
    ap.add_argument("--ttq-ema-decay", type=float, default=fast["ema_decay"], help="0: no parameter averaging")
    ap.add_argument("--ttq-repeats", type=int, default=4, help="training seeds 0 .. N-1")
    ap.add_argument("--ttq-max-epochs", type=int, default=400)
    ap.add_argument("--scaling-sizes", type=_ints, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--scvi-scaling-sizes", type=_ints, default=[10_000])
    ap.add_argument("--scaling-epochs", type=int, default=1)
    # the tables of this run; bench/RESULTS.md is the curated record of all runs
    ap.add_argument("--results", default=str(OUT / "compare.md"))
    return ap


def main() -> None:
    args = _parser().parse_args()
    if not SCVI_PY.exists():
        raise SystemExit(f"{SCVI_PY} not found. Create it first: bash bench/setup_scvi_env.sh")
    OUT.mkdir(exist_ok=True)
    wanted = args.parts.split(",")
    parts: dict = {}
    if "recipe" in wanted:
        parts["recipe"] = part_recipe(args)
    if "ttq" in wanted:
        parts["ttq"] = part_ttq(args, parts.get("recipe"))
    if "scaling" in wanted:
        parts["scaling"] = part_scaling(args)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M")
    (OUT / f"compare_{stamp}.json").write_text(json.dumps(parts, indent=1))
    print(write_results(Path(args.results), args, parts))


def render(json_path: str, results: str, argv: list[str]) -> None:
    """Write the tables of a saved ``compare_*.json`` again (e.g. after a formatting fix)."""
    parts = json.loads(Path(json_path).read_text())
    if "ttq" in parts and "train_cpu_s" not in parts["ttq"]["scvi_reference"]:
        parts["ttq"]["scvi_reference"]["train_cpu_s"] = parts["recipe"]["summary"]["scvi"]["train_cpu_s"]
    sys.argv = [sys.argv[0], *argv]
    main_args = _parser().parse_args()
    print(write_results(Path(results), main_args, parts))


if __name__ == "__main__":
    main()
