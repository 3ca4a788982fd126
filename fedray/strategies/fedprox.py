"""FedProx: FedAvg with a proximal term in every client's local objective (Li et al., 2020).

Each client minimises ``f_k(w) + mu/2 ||w - w_global||^2`` instead of ``f_k(w)``, which
keeps heterogeneous clients from drifting far from the global model. The server side is
FedAvg; what differs is the train stage's config: every train task carries ``mu`` (next
to ``session.round_config``), and the client's training applies the term (the digits
example's ``model.train`` does: ``grad += mu * (w - w_global)``). ``mu: 0`` is FedAvg.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fedray.strategies.fedavg import FedAvg
from fedray.strategies.snapshots import RoundContext, RoundPlan


class FedProx(FedAvg):
    """Options: ``mu`` (the proximal coefficient, >= 0; 0.01 by default)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, int | float) \
                or not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)

    def configure(self, ctx: RoundContext) -> RoundPlan:
        plan = super().configure(ctx)
        return replace(plan, config={**plan.config, "mu": self.mu})
