"""MaskReport: what one mask step did, for callers to log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class MaskReport:
    """What [`lips_wrap.LIPS.on_global_model`][lips_wrap.LIPS.on_global_model] (or the server side)
    did in one round.

    ``round`` is the 0-based round about to start. ``density`` is None on rounds
    that do not mask. ``fallback`` names the tensors scored by magnitude because no
    gradient was stored for them yet (the client never trained through
    ``lips.optimizer``, e.g. with partial participation), or because the server had
    no previous global model. ``skipped`` lists the mask rounds before ``round``
    that this client's LIPS never saw: since its previous round, or, in its first
    round, since the start of the run (a client that did not take part in them, which
    partial participation makes normal, or whose LIPS state was not restored). A
    skipped mask is not made up later; the next mask round masks as scheduled.
    """

    round: int
    density: Optional[float]
    score: Optional[str]
    tensors_masked: int
    elements_zeroed: int
    elements_eligible: int
    fallback: Tuple[str, ...] = ()
    skipped: Tuple[int, ...] = ()

    @property
    def masked(self) -> bool:
        return self.density is not None

    def __str__(self) -> str:
        if not self.masked:
            return f"LIPS round {self.round}: no mask" + self._skipped_text()
        text = (
            f"LIPS round {self.round}: masked {self.tensors_masked} tensors at density "
            f"{self.density:.3f} ({self.score}), dropped {self.elements_zeroed:,} of "
            f"{self.elements_eligible:,} eligible entries"
        )
        if self.fallback:
            text += f"; {len(self.fallback)} tensors had no stored gradient: magnitude score"
        return text + self._skipped_text()

    def _skipped_text(self) -> str:
        if not self.skipped:
            return ""
        rounds = ", ".join(map(str, self.skipped))
        return f"; skipped the mask of round(s) {rounds} (this client was not there)"
