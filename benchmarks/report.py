"""Markdown tables (as in docs/results.md) from a results JSON of reproduce.py.

    python benchmarks/report.py benchmarks/results/shapes-resnet8-many.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inertia import ratio_by_window  # noqa: E402
from reproduce import CONTRASTS, summarise  # noqa: E402


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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    print(markdown(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
