"""LIPS for NVIDIA FLARE (tested with nvflare 2.9.0): needs the ``nvflare`` extra.

Two ways in, one per side of the federation:

- Client side, the method as in the paper: [`lips_train`][lips_train] wraps the local training
  of a Client API script (``flare.receive()`` ... ``flare.send()``). It masks the
  global model just loaded into the model (scores from this site's own last-step
  gradients) and keeps the site's LIPS state between rounds: in memory while the
  script's process lives, and in a file in the site's working directory, so a fresh
  process per task (the simulator with fewer threads than clients) picks it up.
- Server side, for clients that cannot keep gradients: [`LIPSFedAvg`][LIPSFedAvg], NVFlare's
  ``FedAvg`` controller that masks the aggregated model (numpy arrays, scored from the
  aggregated update ``|dW * W|``) before it is sent on mask rounds. It is defined in
  ``lips_wrap.nvflare_server`` (see there why) and imported from here.

Rounds: NVFlare's ``current_round`` is 0-based and is the round a client is about to
train, which is the core's round, so no conversion: with ``period=5`` the models sent
for rounds 1, 6, 11, ... are masked. ``total_rounds`` is the job's number of rounds.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from lips_wrap import LIPS, LIPSConfig, is_mask_round
from lips_wrap.nvflare_server import LIPSFedAvg
from lips_wrap.received import compare_received

try:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel
except ImportError as error:  # pragma: no cover - exercised only without nvflare
    raise ImportError(
        "lips_wrap.integrations.nvflare needs NVIDIA FLARE: pip install 'lips-wrap[nvflare]'"
    ) from error

__all__ = ["LIPSFedAvg", "lips_train", "state_path"]

logger = logging.getLogger(__name__)

_SITES: Dict[Tuple[str, str], LIPS] = {}
"""Each site's LIPS, keyed by (job id, site), while the script's process lives."""


def state_path(site: str, state_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Where [`lips_train`][lips_train] keeps ``site``'s LIPS state between task processes:
    ``lips_state_<site>.pt`` in ``state_dir`` (default: the working directory; in
    NVFlare's simulator, the site's directory of the job)."""
    return Path(os.getcwd() if state_dir is None else state_dir) / f"lips_state_{site}.pt"


def _checked_round(input_model: FLModel, config: Optional[LIPSConfig]) -> Tuple[int, LIPSConfig]:
    """(round, config) for the received model; ``config`` defaults to the schedule's
    defaults over the job's ``total_rounds``."""
    if not isinstance(input_model, FLModel):
        raise TypeError(
            f"input_model must be the FLModel that flare.receive() returned, got "
            f"{type(input_model).__name__}"
        )
    rnd, total = input_model.current_round, input_model.total_rounds
    for what, value in (("current_round", rnd), ("total_rounds", total)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"the received FLModel's {what} is {value!r}; LIPS needs the round numbers "
                "that NVFlare's FedAvg controllers send with the train task (call "
                "lips_train for train tasks only: flare.is_train())"
            )
    if config is None:
        return rnd, LIPSConfig(total_rounds=total)
    if not isinstance(config, LIPSConfig):
        raise TypeError(f"config must be a LIPSConfig or None, got {type(config).__name__}")
    if config.total_rounds != total:
        raise ValueError(
            f"LIPSConfig(total_rounds={config.total_rounds}) but the job runs {total} rounds "
            "(input_model.total_rounds); build the config with "
            "total_rounds=input_model.total_rounds"
        )
    return rnd, config


def _check_loaded(lips: LIPS, input_model: FLModel) -> None:
    """Raise unless the tensors LIPS masks equal the received params: masking before
    ``model.load_state_dict(input_model.params)`` masks weights the load overwrites."""
    params = input_model.params
    if not isinstance(params, Mapping):
        raise ValueError(
            f"the received FLModel's params are {type(params).__name__}, not a state dict; "
            "lips_train needs the full model (params_type FULL)"
        )
    check = compare_received(lips, params)
    if check.compared == 0:
        raise ValueError(
            f"none of the {len(lips.plan.eligible)} tensors LIPS masks (e.g. "
            f"{lips.plan.eligible_names[0]}) is in input_model.params (it holds e.g. "
            f"{', '.join(list(params)[:3])}), so lips_train cannot check that the model "
            "holds the received weights. Send the model's own state_dict from the server, "
            "or pass check_loaded=False if you load the weights under other names yourself"
        )
    if check.differ:
        raise ValueError(
            f"the model does not hold the received weights: {len(check.differ)} of the "
            f"{check.compared} tensors LIPS masks differ from input_model.params (e.g. "
            f"{', '.join(check.differ[:3])}). LIPS masks the weights the model holds when "
            "lips_train is entered: call model.load_state_dict(input_model.params) first. "
            "If the model trains from other weights on purpose, pass check_loaded=False"
        )


def _site_lips(
    key: Tuple[str, str], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
    config: LIPSConfig,
) -> Tuple[LIPS, bool]:
    """The site's LIPS for this round, and whether it holds a state from earlier rounds.

    The LIPS of the site's previous round in this process serves again if it wraps the
    same model and optimizer with the same config (the usual script: both built once,
    before the loop). Otherwise a new LIPS takes over the state of the previous one,
    or, in a fresh process, the state saved in ``path``.
    """
    previous = _SITES.pop(key, None)
    if (
        previous is not None and previous.model is model and previous.config == config
        and previous.optimizer.original_optimizer is optimizer
    ):
        _SITES[key] = previous
        return previous, True
    state = previous.state_dict() if previous is not None else _saved_state(key, path)
    del previous  # the optimizer takes a new LIPS only once the old one is gone
    lips = LIPS(model, optimizer, config)
    if state is not None:
        lips.load_state_dict(state)
    _SITES[key] = lips
    return lips, state is not None


def _saved_state(key: Tuple[str, str], path: Path) -> Optional[Dict[str, Any]]:
    """The LIPS state saved in ``path`` for this job and site, or None if none is."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("job") != key[0] or saved.get("site") != key[1]:
        raise ValueError(
            f"{path} holds the LIPS state of job {saved.get('job')!r}, site "
            f"{saved.get('site')!r}, not of job {key[0]!r}, site {key[1]!r}; remove it "
            "or pass lips_train another state_dir"
        )
    return saved["lips"]


def _save_state(lips: LIPS, key: Tuple[str, str], path: Path) -> None:
    """Write the site's state to ``path`` (whole, then renamed, so a process killed
    while writing leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"job": key[0], "site": key[1], "lips": lips.state_dict()}, partial)
    os.replace(partial, path)


@contextmanager
def lips_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_model: FLModel,
    config: Optional[LIPSConfig] = None,
    *,
    state_dir: Union[str, os.PathLike, None] = None,
    check_loaded: bool = True,
) -> Iterator[LIPS]:
    """Client-side LIPS around the local training of a Client API script.

    Enter it after ``model.load_state_dict(input_model.params)``: it checks that the
    tensors it masks equal the received params (and raises if not), restores this
    site's LIPS state and masks ``model`` (and the optimizer's state) if
    ``input_model.current_round`` is a mask round. Train inside the block with
    ``lips.optimizer``. On a clean exit it checks that the training went through
    ``lips.optimizer`` ([`end_round`][lips_wrap.LIPS.end_round]: a warning, or an
    error with ``LIPSConfig(unwrapped_training="error")``); the state (last-step
    gradients, last round) then stays in this process and is written to
    [`state_path`][state_path], for a fresh process to take up. If the block or the
    check raises, the state is put back as it was before.
    ``lips.last_report`` tells what was masked.

    The model and optimizer may be built once before the loop (NVFlare's examples) or
    anew every round.

    Args:
        input_model: what ``flare.receive()`` returned for a train task.
        config: LIPS settings; by default ``LIPSConfig(total_rounds=
            input_model.total_rounds)``. Its ``total_rounds`` must be the job's.
        state_dir: directory of the state file (default: the working directory, the
            site's directory of the job); it must outlive the task's process.
        check_loaded: compare the model with the received params (one exact comparison
            of the masked tensors per round). Turn off only if the model trains from
            other weights than the received ones on purpose.

    Example:
        ```python
        model.load_state_dict(input_model.params)
        with lips_train(model, optimizer, input_model) as lips:
            train(model, lips.optimizer)
        ```
    """
    rnd, config = _checked_round(input_model, config)
    site = flare.get_site_name()
    key = (str(flare.get_job_id()), site)
    path = state_path(site, state_dir)
    lips, restored = _site_lips(key, path, model, optimizer, config)
    before = lips.state_dict()
    try:
        if check_loaded:
            _check_loaded(lips, input_model)
        if not restored and rnd > 0 and is_mask_round(rnd, config):
            logger.warning(
                "%s, round %d: no LIPS state of this site from earlier rounds, neither in "
                "this process nor in %s, so this mask scores by magnitude. If the site "
                "trained before, its state was lost: give lips_train a state_dir that "
                "outlives the task process", site, rnd, path,
            )
        report = lips.on_global_model(rnd)
        if report.masked:
            logger.info("%s: %s", site, report)
        yield lips
        lips.end_round(
            f"leaving lips_train ({site}, round {rnd})",
            "inside `with lips_train(model, optimizer, input_model) as lips:` train with "
            "lips.optimizer (e.g. train(model, lips.optimizer)), not with the optimizer "
            "passed to lips_train",
        )
    except BaseException:
        lips.load_state_dict(before)
        raise
    _save_state(lips, key, path)
