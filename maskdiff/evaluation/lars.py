"""LARS as in MAE's ``util/lars.py`` (the linear-probe optimizer of MAE and MoCo v3) and as ``optax.lars`` (UMD's,
through big_vision)."""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling: MAE's update, or ``optax.lars``'s.

    ``flavour="mae"``: for each parameter ``p`` with gradient ``g``: if ``p.ndim > 1``, ``d = g + weight_decay·p``
    scaled by ``q = trust_coefficient·‖p‖/‖d‖`` (``q = 1`` when either norm is 0); 1-D parameters (biases, norms) use
    ``d = g`` with no decay or scaling. Then ``μ ← momentum·μ + d`` and ``p ← p − lr·μ``.

    ``flavour="optax"`` (``optax.lars`` with its defaults, UMD's probe): every parameter, biases included, is decayed
    and trust-scaled as above, and the learning rate enters before the momentum: ``μ ← momentum·μ + lr·d``,
    ``p ← p − μ`` (the same steps at a constant lr; under a schedule μ keeps each step's own lr).
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        flavour: str = "mae",
    ) -> None:
        if flavour not in ("mae", "optax"):
            raise ValueError(f"unknown LARS flavour {flavour!r}; expected 'mae' or 'optax'")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)
        self.flavour = flavour

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                update = p.grad
                if update is None:
                    continue
                if p.ndim > 1 or self.flavour == "optax":
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(update)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one),
                        one,
                    )
                    update = update.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                if self.flavour == "optax":
                    mu.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                    p.sub_(mu)
                else:
                    mu.mul_(group["momentum"]).add_(update)
                    p.add_(mu, alpha=-group["lr"])
        return loss
