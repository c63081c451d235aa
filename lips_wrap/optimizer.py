"""LIPSOptimizer: a torch Optimizer that wraps the user's optimizer by composition.

It delegates everything to the wrapped optimizer (``param_groups``, ``state``,
``defaults``, ``step``, ``zero_grad``, ``state_dict``, hooks, ...). Around ``step`` it
copies each tracked parameter's gradient into a buffer of ``grad_dtype`` (the ``g`` of
the sensitivity score: the gradient of the last optimizer step), and it lists each
parameter's state tensors (momentum, Adam moments, ...) so LIPS can mask them too.

AMP: ``GradScaler`` hands optimizers that unscale inside their step (``fused=True``)
the attributes ``grad_scale`` and ``found_inf``; the wrapper passes them on to the
wrapped optimizer, keeps the unscaled gradient, and keeps nothing from a step that
found inf (the step is skipped). Steps taken on the wrapped optimizer directly, not
through the wrapper, are counted so LIPS can say so.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

_WRAPPERS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.ref]" = (
    weakref.WeakKeyDictionary()
)
"""Each wrapped optimizer -> its live wrapper (the guard dies with the wrapper)."""
AMP_ATTRIBUTES = ("grad_scale", "found_inf")
"""Attributes GradScaler sets on optimizers that unscale inside ``step``."""
_OWN = frozenset(
    {"original_optimizer", "grad_dtype", "grad_device", "_grads", "_pending",
     "_inside_step", "_wrapped_steps", "_raw_steps", "before_next_step"}
)


def _count_raw_step(wrapper_ref: "weakref.ref[LIPSOptimizer]") -> Callable[..., None]:
    """A step post-hook for the wrapped optimizer: counts the steps that did not go
    through the wrapper. Holds the wrapper weakly."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        wrapper = wrapper_ref()
        if wrapper is not None and not wrapper._inside_step:
            wrapper._raw_steps += 1

    return hook


class LIPSOptimizer(torch.optim.Optimizer):
    """The user's optimizer, plus last-step gradient capture and state masking.

    Build it through [`lips_wrap.LIPS`][lips_wrap.LIPS], which knows the eligible parameters.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tracked: Iterable[torch.nn.Parameter],
        grad_dtype: torch.dtype = torch.bfloat16,
        grad_device: Optional[str] = None,
    ) -> None:
        # Composition: the base class's __init__ is not called; every attribute the base
        # class would own is read from the wrapped optimizer (see __getattr__).
        if isinstance(optimizer, LIPSOptimizer):
            raise ValueError(
                "this optimizer is already a LIPSOptimizer; pass the original optimizer "
                "(lips.optimizer.original_optimizer) to a new LIPS, not the wrapper"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        previous = _WRAPPERS.get(optimizer)
        if previous is not None and previous() is not None:
            raise ValueError(
                f"this {type(optimizer).__name__} is already wrapped by another LIPS that "
                "is still alive; one optimizer can serve one LIPS only (drop the other "
                "LIPS and its .optimizer first)"
            )
        _WRAPPERS[optimizer] = weakref.ref(self)
        self.original_optimizer = optimizer
        self.grad_dtype = grad_dtype
        self.grad_device = None if grad_device is None else torch.device(grad_device)
        self._grads: Dict[torch.nn.Parameter, Optional[torch.Tensor]] = {
            p: None for p in tracked
        }
        self._pending: Optional[torch.device] = None
        self._inside_step = False
        self.before_next_step: Optional[Callable[[], None]] = None
        """Called once at the start of the next step through the wrapper, then cleared."""
        self._wrapped_steps = 0
        self._raw_steps = 0
        handle = optimizer.register_step_post_hook(_count_raw_step(weakref.ref(self)))
        weakref.finalize(self, handle.remove)

    # -- delegation ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in _OWN:
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in AMP_ATTRIBUTES:  # read by the wrapped (fused) optimizer's step
            setattr(self.original_optimizer, name, value)
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in AMP_ATTRIBUTES:
            delattr(self.original_optimizer, name)
        else:
            object.__delattr__(self, name)

    @property
    def param_groups(self):  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.original_optimizer.defaults = value

    def __repr__(self) -> str:
        return f"LIPSOptimizer({self.original_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.original_optimizer.add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """The wrapped optimizer's step; the (unscaled) gradients it uses are kept."""
        if self.before_next_step is not None:
            check, self.before_next_step = self.before_next_step, None
            check()
        self._inside_step = True
        try:
            if closure is None:
                self._capture_grads()
                loss = self.original_optimizer.step()
            else:
                loss = self.original_optimizer.step(closure)
                self._capture_grads()
        finally:
            self._inside_step = False
        self._wrapped_steps += 1
        return loss

    @property
    def step_counts(self) -> Tuple[int, int]:
        """``(through the wrapper, on the wrapped optimizer directly)``: steps taken
        since this wrapper was built."""
        return self._wrapped_steps, self._raw_steps

    # -- LIPS ---------------------------------------------------------------------
    def _capture_grads(self) -> None:
        """Copy every tracked gradient into its ``grad_dtype`` buffer: one fused
        ``torch._foreach_copy_`` (it converts the dtype), asynchronous when the buffers
        are pinned CPU memory and the gradients live on an accelerator.

        Under GradScaler with an optimizer that unscales inside its step, the
        gradients are still scaled here: they are divided by ``grad_scale`` first, and
        nothing is kept from a step whose ``found_inf`` is set (the step is skipped).
        """
        found_inf = getattr(self.original_optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        grad_scale = getattr(self.original_optimizer, "grad_scale", None)
        targets: List[torch.Tensor] = []
        sources: List[torch.Tensor] = []
        for param, buffer in self._grads.items():
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise ValueError(
                    "LIPS cannot keep sparse gradients; use dense layers for the "
                    "tensors it masks"
                )
            if buffer is None:
                buffer = self._new_buffer(param)
                self._grads[param] = buffer
            targets.append(buffer)
            sources.append(grad)
        if not targets:
            return
        if grad_scale is not None:
            sources = _unscaled(sources, grad_scale)
        asynchronous = sources[0].device.type != "cpu" and targets[0].device.type == "cpu"
        with torch.no_grad():
            torch._foreach_copy_(targets, sources, non_blocking=asynchronous)
        if asynchronous:
            self._pending = sources[0].device

    def _new_buffer(self, param: torch.nn.Parameter) -> torch.Tensor:
        device = self.grad_device or param.device
        pinned = device.type == "cpu" and param.device.type == "cuda"
        return torch.empty(
            param.shape, dtype=self.grad_dtype, device=device, pin_memory=pinned
        )

    def captured_grad(self, param: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """The gradient kept from the last step for ``param``, or None before any step."""
        if self._pending is not None:  # wait for asynchronous copies to pinned memory
            torch.cuda.synchronize(self._pending)
            self._pending = None
        return self._grads[param]

    def set_captured_grad(
        self, param: torch.nn.Parameter, grad: Optional[torch.Tensor]
    ) -> None:
        """Replace the kept gradient of ``param`` (None forgets it); used on restore."""
        if grad is None:
            self._grads[param] = None
            return
        buffer = self._new_buffer(param)
        buffer.copy_(grad.detach())
        self._grads[param] = buffer

    def state_tensors(self, param: torch.nn.Parameter) -> List[torch.Tensor]:
        """Every state tensor of ``param``'s shape (momentum, Adam moments, ...)."""
        return [
            value for value in self.original_optimizer.state.get(param, {}).values()
            if isinstance(value, torch.Tensor) and value.shape == param.shape
        ]


def _unscaled(grads: List[torch.Tensor], grad_scale: torch.Tensor) -> List[torch.Tensor]:
    """``grads / grad_scale`` in float32 (new tensors; the gradients are untouched)."""
    by_device: Dict[torch.device, torch.Tensor] = {}
    out = []
    for grad in grads:
        if grad.device not in by_device:
            by_device[grad.device] = grad_scale.to(grad.device, torch.float32)
        out.append(grad.to(torch.float32) / by_device[grad.device])
    return out
