"""Inertia in an existing federated run, measured from the global checkpoints it saved.

[`diagnose`][diagnose] reads one checkpoint per round (``torch.save`` state dicts, safetensors
files or ``.npz`` archives), orders them by the round number in their file names,
records each tracked layer's relative update between consecutive checkpoints with an
[`InertiaTracker`][lips_wrap.diagnostics.InertiaTracker], and compares the middle layers with the
first and last layers ([`inertia_ratio`][lips_wrap.diagnostics.inertia_ratio]). It is what
``lips-wrap diagnose`` runs. Every problem with the input is a [`CheckpointError`][CheckpointError]
whose message names the file.
"""

from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from torch import nn

from .diagnostics import (
    INERTIA_THRESHOLD,
    MEASURES,
    AnchorDrift,
    InertiaRatio,
    InertiaTracker,
    WindowRatio,
    inertia_ratio,
    inertia_ratio_by_window,
)
from .layers import LayerPlan

TORCH_SUFFIXES: Tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt")
"""File endings read with ``torch.load(weights_only=True)``."""
CHECKPOINT_SUFFIXES: Tuple[str, ...] = TORCH_SUFFIXES + (".safetensors", ".npz")
"""Every file ending ``diagnose`` reads (others in a folder are ignored)."""
NESTED_KEYS: Tuple[str, ...] = ("state_dict", "model_state_dict", "model", "arrays",
                                "global_model", "weights")
"""Keys under which a saved dict may hold the state dict itself."""
MIN_ROUNDS = 3
"""Fewest checkpoints that give two relative updates."""
DEFAULT_WINDOWS = 5
"""Spans of rounds over which ``diagnose`` also reports the ratio (fewer when the run
has fewer updates)."""

Progress = Callable[[Iterable[Any]], Iterable[Any]]
"""Wraps the checkpoint iteration (e.g. ``tqdm``); identity by default."""


class CheckpointError(ValueError):
    """A checkpoint (or the set of them) cannot be diagnosed; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved global model and the round number taken from its file name."""

    path: Path
    round: int


# -- finding and reading checkpoints ----------------------------------------------------

def round_of(path: Union[str, Path]) -> int:
    """The round number of a checkpoint: the last run of digits in its file name
    without the ending (``round_12.pt`` -> 12, ``ckpt-r0005.safetensors`` -> 5), or, when
    the name has none, in its folder's name (``round_7/model.safetensors`` -> 7, as
    ``save_pretrained`` writes per-round folders)."""
    path = Path(path)
    name = path.name
    numbers = re.findall(r"\d+", name[: len(name) - len(_suffix(path))])
    if not numbers:
        numbers = re.findall(r"\d+", path.parent.name)
    if not numbers:
        raise CheckpointError(
            f"{path}: no round number in the file name (nor in its folder's name); name "
            "checkpoints like 'round_12.pt' so they can be put in order"
        )
    return int(numbers[-1])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in CHECKPOINT_SUFFIXES if name.endswith(s)), "")


def find_checkpoints(paths: Sequence[Union[str, Path]]) -> List[Checkpoint]:
    """Checkpoints named by ``paths`` (files, folders or glob patterns), ordered by round.

    A folder contributes its files ending in ``CHECKPOINT_SUFFIXES`` (not its
    subfolders). Raises [`CheckpointError`][CheckpointError] for a path that matches nothing, a file
    of another type, a name without a round number, two files of the same round, and
    fewer than ``MIN_ROUNDS`` checkpoints.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: List[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p))
            if not found:
                raise CheckpointError(
                    f"{path}: folder holds no checkpoint (files ending in "
                    f"{', '.join(CHECKPOINT_SUFFIXES)})"
                )
            files.extend(found)
        elif path.is_file():
            if not _suffix(path):
                raise CheckpointError(
                    f"{path}: not a checkpoint type read here; accepted endings: "
                    f"{', '.join(CHECKPOINT_SUFFIXES)}"
                )
            files.append(path)
        elif glob.has_magic(str(given)):
            found = sorted(Path(p) for p in glob.glob(str(given)) if Path(p).is_file()
                           and _suffix(Path(p)))
            if not found:
                raise CheckpointError(f"{given}: the pattern matches no checkpoint file")
            files.extend(found)
        else:
            raise CheckpointError(f"{given}: no such file or folder")
    by_round: Dict[int, Path] = {}
    for path in dict.fromkeys(p.resolve() for p in files):
        number = round_of(path)
        if number in by_round:
            raise CheckpointError(
                f"{by_round[number]} and {path} both carry round number {number}; keep "
                "one checkpoint per round"
            )
        by_round[number] = path
    checkpoints = [Checkpoint(by_round[n], n) for n in sorted(by_round)]
    if len(checkpoints) < MIN_ROUNDS:
        names = ", ".join(str(c.path) for c in checkpoints) or "none"
        raise CheckpointError(
            f"diagnose needs checkpoints of at least {MIN_ROUNDS} rounds, found "
            f"{len(checkpoints)}: {names}"
        )
    return checkpoints


def _tensors_of(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    """The name -> tensor mapping held by a loaded object (see ``NESTED_KEYS``)."""
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return {str(i): t for i, t in enumerate(obj)}
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of "
            "names to tensors)"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors
    for key in NESTED_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _tensors_of(obj[key], path)
    raise CheckpointError(
        f"{path}: no tensors found; keys are {sorted(map(str, obj))[:8]}, and none of "
        f"{', '.join(NESTED_KEYS)} holds a state dict"
    )


def load_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read one checkpoint into a name -> tensor dict on the CPU.

    ``torch.save`` files are loaded with ``weights_only=True`` (no pickled code runs);
    ``.npz`` with ``allow_pickle=False``; ``.safetensors`` needs the safetensors package.
    """
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CheckpointError(
                    f"{path}: reading .safetensors needs the safetensors package: "
                    "pip install 'lips-wrap[safetensors]'"
                ) from None
            return dict(load_file(str(path), device="cpu"))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: torch.from_numpy(np.array(archive[name]))
                        for name in archive.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:  # every reader has its own error types
        kind = suffix.lstrip(".") or "torch"
        raise CheckpointError(f"{path}: cannot read it as a {kind} checkpoint: {error}") from None
    return _tensors_of(obj, path)


# -- which layers, in which role --------------------------------------------------------

def natural_key(name: str) -> Tuple[Tuple[int, Union[int, str]], ...]:
    """Sort key that orders the numbers inside names by value (``h.2`` < ``h.10``)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", name) if part)


def weight_matrices(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors with two or more dimensions, in order."""
    return [name for name, t in state.items() if t.is_floating_point() and t.dim() >= 2]


def roles_in_order(names: Sequence[str], middle: Optional[Sequence[str]] = None) -> List[str]:
    """Role of each weight matrix, ``names`` in model order.

    Without ``middle``: the first name is ``"first"``, the last ``"last"``, the rest
    ``"middle"``. With ``middle`` (the layers LIPS masks): those are ``"middle"``; the
    first other name before them is ``"first"``, the last other name after them is
    ``"last"``; the remaining ones are ``"other"`` (shown, not counted).
    """
    if middle is None:
        if len(names) < 3:
            raise CheckpointError(
                f"need at least 3 weight matrices (first, middle, last), the checkpoints "
                f"hold {len(names)}: {list(names)}"
            )
        return ["first"] + ["middle"] * (len(names) - 2) + ["last"]
    chosen = set(middle)
    roles = ["middle" if n in chosen else "other" for n in names]
    positions = [i for i, role in enumerate(roles) if role == "middle"]
    if not positions:
        raise CheckpointError("no middle layer among the weight matrices")
    before = [i for i in range(positions[0]) if roles[i] == "other"]
    after = [i for i in range(positions[-1] + 1, len(names)) if roles[i] == "other"]
    if before:
        roles[before[0]] = "first"
    if after:
        roles[after[-1]] = "last"
    if not before and not after:
        raise CheckpointError(
            "every weight matrix is a middle layer: there is no first or last layer to "
            "compare with"
        )
    return roles


def plan_layers(plan: LayerPlan, model: nn.Module) -> Tuple[List[str], List[str]]:
    """(weight matrices in model order, their roles) from a model and its LIPS plan."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dim() >= 2]
    return names, roles_in_order(names, plan.eligible_names)


# -- the diagnosis ----------------------------------------------------------------------

@dataclass
class Diagnosis:
    """Relative updates of every tracked layer and the verdict on them."""

    checkpoints: List[Checkpoint]
    tracker: InertiaTracker
    roles: List[str]
    shapes: List[Tuple[int, ...]]
    ratio: InertiaRatio
    threshold: float
    order_note: str = ""
    windows: List[WindowRatio] = field(default_factory=list)
    drift: Optional[AnchorDrift] = None

    @property
    def update_rounds(self) -> List[int]:
        """Round number of each column: the checkpoint the update leads to."""
        return [c.round for c in self.checkpoints[1:]]

    @property
    def stalled(self) -> bool:
        """True when the ratio is below the threshold (inertia)."""
        return self.ratio.ratio < self.threshold

    def verdict(self) -> str:
        """One paragraph: the decision and the numbers it rests on."""
        r = self.ratio
        used = self.update_rounds[r.warmup:]
        span = (f"rounds {used[0]}..{used[-1]} ({r.rounds_used} updates after a warm-up "
                f"of {r.warmup})")
        numbers = (f"middle layers' mean relative update {r.middle:.4g}, first layer "
                   f"{r.first:.4g}, last layer {r.last:.4g}: ratio middle / mean(first, "
                   f"last) = {r.ratio:.3f}, threshold {self.threshold:.3f}, over {span}")
        if math.isnan(r.ratio):
            return f"verdict: cannot tell: no layer moved ({numbers})."
        if self.stalled:
            return (f"verdict: INERTIA: the middle layers stall against the first and last "
                    f"layers; {numbers}. LIPS targets this (a description of the run: on "
                    f"the benchmark a stall did not predict how much LIPS gains).")
        return f"verdict: no inertia: the middle layers keep moving; {numbers}."

    def window_rounds(self, window: WindowRatio) -> Tuple[int, int]:
        """First and last round number of the updates in ``window``."""
        return self.update_rounds[window.start], self.update_rounds[window.stop - 1]

    def over_time(self) -> str:
        """One line: the ratio over consecutive spans of rounds (no warm-up), and which
        spans fall on the other side of the threshold than the run as a whole."""
        if not self.windows:
            return ""
        cells = []
        for window in self.windows:
            first, last = self.window_rounds(window)
            cells.append(f"rounds {first}..{last} {window.ratio:.3f}")
        line = "ratio over time (no warm-up): " + " | ".join(cells)
        other = [w for w in self.windows if math.isfinite(w.ratio)
                 and (w.ratio < self.threshold) != self.stalled]
        if other and len(self.windows) > 1:
            spans = ", ".join("{}..{}".format(*self.window_rounds(w)) for w in other)
            side = "above" if self.stalled else "below"
            line += (f"; {side} the threshold in rounds {spans}: the middle layers "
                     + ("kept moving there" if self.stalled else "lagged there only"))
        return line

    def drift_line(self) -> str:
        """One line: the anchor drift (the authors' measure) beside the ratio, or why
        there is none."""
        if self.drift is None:
            return (f"anchor drift: needs a round after the anchor (update "
                    f"{self.tracker.anchor_round}); too few checkpoints")
        d = self.drift
        anchor, last = self.update_rounds[d.anchor], self.update_rounds[d.last]
        return (f"anchor drift (since the global model of round {anchor}, to round {last}): "
                f"middle layers cosine {d.middle_cosine:.3f}, moved {d.middle_drift:.3g} of "
                f"their norm, norm x{d.middle_norm_growth:.3f}; first/last layers cosine "
                f"{d.edges_cosine:.3f}, moved {d.edges_drift:.3g}, norm "
                f"x{d.edges_norm_growth:.3f}; drift ratio middle / edges {d.ratio:.3f}")

    def table(self) -> str:
        """Per-layer table: role, shape, mean and last relative update, ratio to the edges."""
        updates = self.tracker.relative_update[:, self.ratio.warmup:]
        rows = [("layer", "role", "shape", "mean update", "last update", "vs edges")]
        for name, role, shape, row in zip(self.tracker.layers, self.roles, self.shapes,
                                          updates):
            finite = row[np.isfinite(row)]
            mean = float(finite.mean()) if finite.size else math.nan
            edges = self.ratio.edges
            versus = mean / edges if edges > 0 else math.nan
            rows.append((name, role, "x".join(map(str, shape)), f"{mean:.4g}",
                         f"{row[-1]:.4g}", f"{versus:.2f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                 for row in rows]
        rounds = [c.round for c in self.checkpoints]
        lines.append(f"{len(rounds)} checkpoints, rounds {rounds[0]}..{rounds[-1]}; "
                     f"{len(self.tracker.layers)} layers tracked")
        if self.order_note:
            lines.append(self.order_note)
        return "\n".join(lines)

    def report(self) -> str:
        """Table, ratio over time, anchor drift and verdict, as the command prints them."""
        over_time = self.over_time()
        return "\n".join([self.table()] + ([over_time] if over_time else [])
                         + [self.drift_line(), self.verdict()])

    def to_dict(self) -> Dict[str, Any]:
        """Everything in plain JSON types (non-finite numbers as None). The keys of
        [`InertiaTracker.to_json`][lips_wrap.InertiaTracker.to_json] are included, so
        ``InertiaTracker.from_json`` reads the file back."""

        def clean(value: float) -> Optional[float]:
            return float(value) if math.isfinite(value) else None

        r = self.ratio
        return {
            "checkpoints": [{"path": str(c.path), "round": c.round} for c in self.checkpoints],
            "update_rounds": self.update_rounds,
            "layers": list(self.tracker.layers),
            "roles": list(self.roles),
            "shapes": [list(s) for s in self.shapes],
            "anchor_round": self.tracker.anchor_round,
            **{measure: [[clean(v) for v in row] for row in getattr(self.tracker, measure)]
               for measure in MEASURES},
            "anchor_drift": None if self.drift is None else {
                "anchor_round": self.update_rounds[self.drift.anchor],
                "last_round": self.update_rounds[self.drift.last],
                **{k: clean(v) for k, v in self.drift._asdict().items()
                   if k not in ("anchor", "last")}},
            "verdict": {
                "stalled": bool(self.stalled),
                "ratio": clean(r.ratio),
                "threshold": self.threshold,
                "middle": clean(r.middle),
                "first": clean(r.first),
                "last": clean(r.last),
                "edges": clean(r.edges),
                "warmup": r.warmup,
                "updates_used": r.rounds_used,
                "text": self.verdict(),
            },
            "ratio_over_time": [
                {"rounds": list(self.window_rounds(w)), "ratio": clean(w.ratio)}
                for w in self.windows
            ],
        }

    def write(self, out_dir: Union[str, Path], plot: bool = True) -> List[Path]:
        """Write ``inertia.json``, ``inertia.csv`` and (``plot``, needs matplotlib)
        ``inertia.png`` into ``out_dir``; returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "inertia.json", out / "inertia.csv"]
        written[0].write_text(json.dumps(self.to_dict(), indent=1))
        self.tracker.to_csv(written[1])
        if plot:
            from ._plotting import plot_inertia

            groups = [(label, [i for i, r in enumerate(self.roles) if r == role])
                      for label, role in (("first layer", "first"),
                                          ("middle layers (mean)", "middle"),
                                          ("last layer", "last"))]
            title = "stalled" if self.stalled else "no stall"
            plot_inertia(self.tracker.layers, self.tracker.relative_update,
                         out / "inertia.png",
                         title=f"inertia ratio {self.ratio.ratio:.3f} "
                               f"(threshold {self.threshold:.3f}): {title}",
                         groups=groups, rounds=self.update_rounds)
            written.append(out / "inertia.png")
        return written


def _check(state: Mapping[str, torch.Tensor], reference: Mapping[str, Tuple[int, ...]],
           path: Path) -> None:
    missing = [name for name in reference if name not in state]
    if missing:
        raise CheckpointError(
            f"{path}: lacks {len(missing)} tracked tensors, e.g. {missing[:3]}; its "
            f"tensors look like {list(state)[:3]} (checkpoints of one run must hold the "
            "same model)"
        )
    for name, shape in reference.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, but "
                f"{shape} in the first checkpoint; shapes must not change between rounds"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or inf)"
            )


def _states(checkpoints: Sequence[Checkpoint], progress: Optional[Progress]
            ) -> Iterator[Tuple[Checkpoint, Dict[str, torch.Tensor]]]:
    wrapped: Iterable[Checkpoint] = checkpoints if progress is None else progress(checkpoints)
    for checkpoint in wrapped:
        yield checkpoint, load_checkpoint(checkpoint.path)


def diagnose(
    paths: Sequence[Union[str, Path]],
    model: Optional[nn.Module] = None,
    plan: Optional[LayerPlan] = None,
    warmup: Optional[int] = None,
    threshold: float = INERTIA_THRESHOLD,
    progress: Optional[Progress] = None,
    windows: Optional[int] = None,
) -> Diagnosis:
    """Measure inertia from the global checkpoints of a run.

    Args:
        paths: files, folders or glob patterns (see [`find_checkpoints`][find_checkpoints]).
        model: the run's model; with ``plan`` (``find_layers(model)``) the layers LIPS
            masks are the middle layers and the model's order decides first and last.
            Without them every weight matrix of the checkpoints is tracked, in the
            order they were saved.
        plan: the LIPS plan of ``model`` (both or neither).
        warmup: updates skipped before averaging; default 20% of them.
        threshold: ratio below which the middle layers count as stalled.
        progress: wraps the iteration over checkpoints (a progress bar).
        windows: spans of rounds over which the ratio is also reported (no warm-up);
            default ``DEFAULT_WINDOWS``, or one per update if there are fewer.

    Raises:
        CheckpointError: unreadable, mismatched or too few checkpoints, changing
            shapes, non-finite values; the message names the file.
    """
    if (model is None) != (plan is None):
        raise ValueError("pass model and plan together (plan = find_layers(model)), or neither")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    checkpoints = find_checkpoints(paths)
    updates = len(checkpoints) - 1
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int)
                                or not 1 <= windows <= updates):
        raise ValueError(
            f"windows {windows!r} does not fit {updates} updates ({len(checkpoints)} "
            f"checkpoints); use 1..{updates}"
        )
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int)
                               or not 0 <= warmup < updates):
        raise ValueError(
            f"warmup {warmup!r} leaves no update: {len(checkpoints)} checkpoints give "
            f"{updates} updates; use 0..{updates - 1}"
        )
    states = _states(checkpoints, progress)
    first_checkpoint, first = next(states)
    order_note = ""
    if model is not None and plan is not None:
        names, roles = plan_layers(plan, model)
    else:
        names = weight_matrices(first)
        if first_checkpoint.path.name.lower().endswith(".safetensors"):
            names = sorted(names, key=natural_key)
            order_note = ("note: safetensors files do not keep the model's order; the "
                          "layers are in natural name order (layers.2 before layers.10), "
                          "which decides the first and last layer. Pass --model for the "
                          "model's order.")
        roles = roles_in_order(names)
    shapes = {}
    for name in names:
        if name not in first:
            raise CheckpointError(
                f"{first_checkpoint.path}: lacks the model's tensor {name!r}; its tensors "
                f"look like {list(first)[:3]}"
            )
        shapes[name] = tuple(first[name].shape)
    _check(first, shapes, first_checkpoint.path)
    tracker = InertiaTracker.from_weights(first, names)
    del first  # the tracker holds copies of the tracked tensors only
    for checkpoint, state in states:
        _check(state, shapes, checkpoint.path)
        tracker.update(state)
    ratio = inertia_ratio(tracker.relative_update, roles, warmup)
    spans = inertia_ratio_by_window(tracker.relative_update, roles,
                                    windows or min(DEFAULT_WINDOWS, updates))
    drift = tracker.drift(roles) if tracker.rounds > tracker.anchor_round + 1 else None
    return Diagnosis(checkpoints, tracker, roles, [shapes[n] for n in names], ratio,
                     float(threshold), order_note, spans, drift)
