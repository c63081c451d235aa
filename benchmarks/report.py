"""Markdown tables (as in docs/results.md) from results JSONs of reproduce.py.

    python benchmarks/report.py benchmarks/results/shapes-resnet8-many.json
    python benchmarks/report.py --across benchmarks/results/*.json
                        # one table: FedAvg's inertia by both measures against the gain
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inertia import cosine_drift_ratio, drift_of, group_means, ratio_by_window  # noqa: E402
from reproduce import CONTRASTS, paired, summarise  # noqa: E402


def _ci(d: Optional[dict]) -> str:
    if not d:
        return ""
    return f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


def markdown(result: dict) -> str:
    """The accuracy table, the contrast table and the inertia table, in points (%)."""
    summary = summarise(result["runs"])
    lines: List[str] = [
        "**Personalized accuracy** (%, mean ± std over seeds of the last-5-round means; Δ: "
        "paired difference to FedAvg in points, 95% t-interval):",
        "",
        "| arm | seeds | after aggregation | Δ vs FedAvg [95% CI] | before aggregation "
        "| Δ vs FedAvg [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for arm, entry in summary.items():
        a, b = entry["after_last"], entry["before_last"]
        lines.append(f"| {arm} | {entry['n']} | {100 * a['mean']:.1f} ± {100 * a['std']:.1f} "
                     f"| {_ci(a.get('diff_vs_fedavg'))} | {100 * b['mean']:.1f} ± "
                     f"{100 * b['std']:.1f} | {_ci(b.get('diff_vs_fedavg'))} |")
    lines += ["", "**Contrasts between LIPS arms** (points, paired on the seeds both ran):",
              "", "| contrast (paired) | seeds | Δ after [95% CI] | Δ before [95% CI] |",
              "|---|---|---|---|"]
    for contrast, reference in CONTRASTS:
        if contrast in summary and f"diff_vs_{reference}" in summary[contrast]["after_last"]:
            a = summary[contrast]["after_last"][f"diff_vs_{reference}"]
            b = summary[contrast]["before_last"][f"diff_vs_{reference}"]
            lines.append(f"| {contrast} − {reference} | {a['n_pairs']} | {_ci(a)} | {_ci(b)} |")
    lines += ["", "**Inertia ratio** of the global model under each arm (mean [min, max] over "
              "seeds; rounds 20-99; also without the rounds whose clients started from a "
              "masked model, and over rounds 1-19 only) and the mean relative update per "
              "round of each group over rounds 20-99:", "",
              "| arm | seeds | inertia ratio, mean [min, max] | without mask rounds "
              "| rounds 1-19 only | first layer | middle layers | last layer |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, entry in summary.items():
        ratio = entry.get("inertia_ratio")
        if ratio:
            plain = entry.get("inertia_ratio_unmasked_rounds")
            plain_cell = (f"{plain['mean']:.2f} [{plain['min']:.2f}, {plain['max']:.2f}]"
                          if plain else "")
            early = entry.get("inertia_ratio_early")
            early_cell = (f"{early['mean']:.2f} [{early['min']:.2f}, {early['max']:.2f}]"
                          if early else "")
            lines.append(f"| {arm} | {ratio['n']} | {ratio['mean']:.2f} [{ratio['min']:.2f}, "
                         f"{ratio['max']:.2f}] | {plain_cell} | {early_cell} | "
                         f"{entry['inertia_first']:.4f} | "
                         f"{entry['inertia_middle']:.4f} | {entry['inertia_last']:.4f} |")
    windows = next((e["inertia_ratio_by_window"] for e in summary.values()
                    if "inertia_ratio_by_window" in e), None)
    if windows:
        lines += ["", "**Inertia ratio over time** (each span of rounds on its own, no "
                  "warm-up; mean [min, max] over seeds):", "",
                  "| arm | " + " | ".join(f"rounds {w['rounds'][0]}-{w['rounds'][1]}"
                                         for w in windows) + " |",
                  "|---|" + "---|" * len(windows)]
        for arm, entry in summary.items():
            cells = [f"{w['mean']:.2f} [{w['min']:.2f}, {w['max']:.2f}]"
                     for w in entry.get("inertia_ratio_by_window", [])]
            if cells:
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    base = {r["seed"]: r for r in result["runs"].get("FedAvg", []) if "inertia" in r}
    lines += ["", "**Does FedAvg's inertia ratio predict the gain?** Pearson correlation, "
              "over seeds, of FedAvg's ratio (after the warm-up, and over the first fifth "
              "of the rounds) with the arm's paired gain on that seed:", "",
              "| arm | seeds | corr(FedAvg ratio, Δ after) | corr(FedAvg ratio, Δ before) "
              "| corr(early ratio, Δ after) | corr(early ratio, Δ before) |",
              "|---|---|---|---|---|---|"]
    early = {seed: ratio_by_window(run["relative_update"])[0].ratio
             for seed, run in base.items() if "relative_update" in run}
    for arm, runs in result["runs"].items():
        pairs = [(base[r["seed"]]["inertia"]["ratio"], early.get(r["seed"], np.nan),
                  r["after_last"] - base[r["seed"]]["after_last"],
                  r["before_last"] - base[r["seed"]]["before_last"])
                 for r in runs if arm != "FedAvg" and r["seed"] in base]
        if len(pairs) >= 3:
            ratio, first, after, before = (np.array(column) for column in zip(*pairs))
            cells = [np.corrcoef(x, y)[0, 1] for x in (ratio, first) for y in (after, before)]
            lines.append(f"| {arm} | {len(pairs)} | "
                         + " | ".join(f"{c:+.2f}" for c in cells) + " |")
    return "\n".join(lines)


def drift_table(result: dict) -> str:
    """Per arm, the anchor drift at the last round (mean [min, max] over the seeds
    stored with it); empty for results stored before the drift was recorded."""
    lines = []
    for arm, runs in result["runs"].items():
        drifts = [d for d in (drift_of(r) for r in runs) if d is not None]
        if not drifts:
            continue
        cells = []
        for field in ("ratio", "middle_cosine", "edges_cosine", "middle_norm_growth",
                      "edges_norm_growth"):
            values = np.array([getattr(d, field) for d in drifts])
            cells.append(f"{values.mean():.2f} [{values.min():.2f}, {values.max():.2f}]")
        lines.append(f"| {arm} | {len(drifts)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join([
        "**Anchor drift** (the authors' measure): from the global model of round 2 to the "
        "last round, the middle layers' L2 distance over their round-2 norm against the "
        "first and last layers' (drift ratio), the cosines to round 2, and the weight-norm "
        "growth since (mean [min, max] over seeds):", "",
        "| arm | seeds | drift ratio | middle cosine | first/last cosine | middle norm "
        "growth | first/last norm growth |", "|---|---|---|---|---|---|---|", *lines])


def _stat(values: List[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return ""
    return f"{np.mean(values):.2f} [{np.min(values):.2f}, {np.max(values):.2f}] (n={len(values)})"


def across(paths: List[Path]) -> str:
    """One table over setups: FedAvg's inertia by the relative-update ratio (after the
    warm-up, and over the first fifth of the rounds) and by the anchor drift (cosine
    based; L2 where stored), against each LIPS arm's paired gain in points."""
    lines = ["| setup | FedAvg ratio | first fifth | cosine drift ratio | L2 drift ratio "
             "| arm | seeds | Δ after [95% CI] | Δ before [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        result = json.loads(path.read_text())
        name, runs = result["config"]["name"], result["runs"]
        fedavg = runs.get("FedAvg", [])
        if not fedavg:
            continue
        tracker = path.with_name(f"{name}_FedAvg_inertia.json")
        seed0 = json.loads(tracker.read_text()) if tracker.exists() else {}
        # older runs kept their curves in the seed-0 tracker file only
        updates = [r["relative_update"] for r in fedavg if "relative_update" in r] or \
            [seed0["relative_update"]] * bool(seed0)
        cosines = [r["cosine_to_anchor"] for r in fedavg if "cosine_to_anchor" in r] or \
            [seed0["cosine_to_anchor"]] * bool(seed0)
        ratio = _stat([group_means(u)["ratio"] for u in updates])
        first = _stat([ratio_by_window(u)[0].ratio for u in updates])
        cosine = _stat([cosine_drift_ratio(c) for c in cosines])
        drifts = [d.ratio for d in (drift_of(r) for r in fedavg) if d is not None]
        l2 = _stat(drifts)
        for arm in (a for a in runs if a.startswith("LIPS") and "server" not in a
                    and "random" not in a and "magnitude" not in a):
            after = paired(runs[arm], fedavg, "after_last")
            before = paired(runs[arm], fedavg, "before_last")
            if after is None:
                continue
            lines.append(f"| {name} | {ratio} | {first} | {cosine} | {l2} | {arm} | "
                         f"{after['n_pairs']} | {_ci(after)} | {_ci(before)} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--across", action="store_true",
                        help="one table over every given setup: inertia against the gain")
    args = parser.parse_args(argv)
    if args.across:
        print(across(args.results))
        return 0
    for path in args.results:
        result = json.loads(path.read_text())
        print(markdown(result))
        drift = drift_table(result)
        if drift:
            print("\n" + drift)
    return 0


if __name__ == "__main__":
    sys.exit(main())
