"""Server-side LIPS for NVIDIA FLARE: [`LIPSFedAvg`][LIPSFedAvg], NVFlare's ``FedAvg``
controller that masks the aggregated model. Import it from
``lips_wrap.integrations.nvflare``; it needs the ``nvflare`` extra.

Why it lives here and not beside the client side in ``integrations/``: NVFlare's job
API (``FedJob.export_job``, ``simulator_run``) writes every component's import path
into the job and first checks that the component's source file sits at that path
(``lips_wrap/.../x.py`` for ``lips_wrap....x``). In an editable install of this
project the ``lips_wrap.integrations`` modules live in the repository's
``integrations/`` folder, which fails that check; a module inside ``lips_wrap/``
passes it in every kind of install.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from .config import LIPSConfig
from .layers import find_layers
from .report import MaskReport
from .server import ServerMasker

try:
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.workflows.fedavg import FedAvg
except ImportError as error:  # pragma: no cover - exercised only without nvflare
    raise ImportError(
        "lips_wrap.integrations.nvflare needs NVIDIA FLARE: pip install 'lips-wrap[nvflare]'"
    ) from error

__all__ = ["LIPSFedAvg"]


class LIPSFedAvg(FedAvg):
    """NVFlare's ``FedAvg`` controller with server-side LIPS (clients stay unchanged).

    After each round's aggregation, if the next round is a mask round, the aggregated
    model (numpy arrays) is masked with [`lips_wrap.ServerMasker`][lips_wrap.ServerMasker] (score
    ``|dW * W|``, ``dW`` the change of the global model over the round; or the
    configured magnitude/random score) and becomes the global model that is sent and
    saved. Masking the global model itself, not only a copy per client, keeps
    ``params_type=DIFF`` updates correct: the clients' differences are taken against
    the masked model they received. The model aggregated after the last round is never
    masked. ``lips_reports`` maps each round to the report of the model sent for it.

    Args:
        lips_model: a model of the job's architecture (its layer plan is built once
            with ``find_layers``; its weights are not used).
        lips_config: LIPS settings; ``total_rounds`` must equal ``num_rounds``.
        *args: ``FedAvg``'s positional arguments.
        **kwargs: ``FedAvg``'s keyword arguments (``num_clients``, ``num_rounds``, ...).

    Example:
        job.to_server(LIPSFedAvg(num_clients=2, num_rounds=10, lips_model=Net(),
                                 lips_config=LIPSConfig(total_rounds=10),
                                 persistor_id=job.comp_ids["persistor_id"]))
    """

    def __init__(
        self, *args: Any, lips_model: nn.Module, lips_config: LIPSConfig, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(lips_model, nn.Module):
            raise TypeError(
                f"lips_model must be a torch.nn.Module, got {type(lips_model).__name__}"
            )
        if not isinstance(lips_config, LIPSConfig):
            raise TypeError(
                f"lips_config must be a LIPSConfig, got {type(lips_config).__name__}"
            )
        if lips_config.total_rounds != self.start_round + self.num_rounds:
            raise ValueError(
                f"LIPSConfig(total_rounds={lips_config.total_rounds}) but the controller runs "
                f"rounds {self.start_round}..{self.start_round + self.num_rounds - 1}; set "
                "total_rounds to start_round + num_rounds"
            )
        # FedJob writes these two into the job's config by their parameter names.
        self.lips_model = lips_model
        self.lips_config = lips_config
        plan = find_layers(lips_model, lips_config.include, lips_config.exclude)
        self.lips_reports: Dict[int, MaskReport] = {}
        self._lips_server = ServerMasker(plan, lips_config)

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        """FedAvg's update, then the mask of the model sent for the next round."""
        names = self._lips_server.plan.eligible_names
        if self.current_round == self.start_round:  # the initial model, sent unmasked
            self._lips_server.remember(_torch_view(model.params, names))
        model = super().update_model(model, aggr_result)
        next_round = self.current_round + 1
        if next_round >= self.lips_config.total_rounds:
            return model
        masked, report = self._lips_server(_torch_view(model.params, names), next_round)
        self.lips_reports[next_round] = report
        if report.masked:
            self.info(f"model for round {next_round}: {report}")
            model.params = {
                name: value if name not in masked
                else masked[name] if isinstance(value, torch.Tensor) else masked[name].numpy()
                for name, value in model.params.items()
            }
        return model


def _torch_view(params: Mapping[str, Any], names: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
    """The named numpy arrays of the server's global model as tensors (no copy)."""
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(
            f"the global model lacks {len(missing)} tensors the plan masks (e.g. "
            f"{', '.join(missing[:3])}; it holds e.g. {', '.join(list(params)[:3])}): "
            "build LIPSFedAvg from a model whose state_dict() names the job's model"
        )
    return {name: torch.as_tensor(params[name]) for name in names}
