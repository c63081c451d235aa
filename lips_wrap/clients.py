"""ClientStates: one LIPS object serving many simulated clients, each with its own state.

A simulation or a framework process often trains many clients in turn on one model
and one optimizer. Each client's stored gradients and round bookkeeping must follow
that client: [`ClientStates.activate`][lips_wrap.ClientStates.activate] saves the state of the
client that was active and restores (or starts fresh) the state of the next one.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping, Optional

from .lips import LIPS

_NO_CLIENT = object()
"""``active`` before any client was activated (``None`` is a valid client id)."""


class ClientStates:
    """Per-client LIPS states for ``lips``, keyed by any hashable client id.

    Example:
        ```python
        clients = ClientStates(lips)
        for rnd in range(rounds):
            for cid in selected:
                model.load_state_dict(global_state)
                clients.activate(cid)
                lips.on_global_model(rnd)
                train(model, lips.optimizer)
        ```
    """

    def __init__(
        self, lips: LIPS, carry: Optional["ClientStates"] = None, fix: Optional[str] = None
    ) -> None:
        """``carry``: the states of another ``ClientStates`` to take over, e.g. when a
        new LIPS is built each round around a fresh optimizer (call its
        [`save`][ClientStates.save] first). ``fix``: how the warning about training that bypassed
        ``lips.optimizer`` tells the fix, in the caller's terms (an adapter's)."""
        if not isinstance(lips, LIPS):
            raise TypeError(f"ClientStates needs a LIPS, got {type(lips).__name__}")
        self.lips = lips
        self._fix = fix
        self._fresh = {**lips.state_dict(), "last_round": None, "grads": {}}
        self._states: Dict[Hashable, Dict[str, Any]] = (
            {} if carry is None else dict(carry._states)
        )
        self.active: Hashable = _NO_CLIENT

    def activate(self, client: Hashable, save_active: bool = True) -> None:
        """Save the active client's state (unless ``save_active`` is False, e.g. to
        retry a failed round from the state stored before it), then make ``client``'s
        stored state the LIPS's (a fresh one for a client seen for the first time)."""
        if save_active:
            self.save()
        self.lips.load_state_dict(self._states.get(client, self._fresh))
        self.active = client

    def save(self) -> None:
        """Store the active client's current state (done by [`activate`][ClientStates.activate]
        too), after [`LIPS.end_round`][lips_wrap.LIPS.end_round]: its training since its round began
        must have gone through ``lips.optimizer`` (a warning or an error otherwise, per
        ``LIPSConfig.unwrapped_training``)."""
        if self.active is not _NO_CLIENT:
            self.lips.end_round(f"the round of client {self.active!r}", self._fix)
            self._states[self.active] = self.lips.state_dict()

    def state_of(self, client: Hashable) -> Mapping[str, Any]:
        """The stored state of ``client`` (a fresh one for a client never stored)."""
        return self._states.get(client, self._fresh)

    def state_dict(self) -> Dict[str, Any]:
        """Every client's stored state (the active one's current), e.g. to checkpoint
        a simulation."""
        self.save()
        return {"clients": dict(self._states)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what [`state_dict`][ClientStates.state_dict] returned; no client is active
        afterwards.
        Each client's state is checked when it is activated."""
        if not isinstance(state, Mapping) or not isinstance(state.get("clients"), Mapping):
            raise ValueError(
                "not a ClientStates state (expected a dict with a 'clients' dict, as "
                f"ClientStates.state_dict() returns), got {type(state).__name__}"
            )
        self._states = dict(state["clients"])
        self.active = _NO_CLIENT

    def __len__(self) -> int:
        """Clients with a stored state."""
        return len(self._states)
