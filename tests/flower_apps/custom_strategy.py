"""A user's own Flower strategy, as a Flower user writes one: FedAvg with a server step size.

`strategy: {name: flower, class: tests.flower_apps.custom_strategy.FedAvgServerLr, server_lr: 0.5}`
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class FedAvgServerLr(FedAvg):
    """x <- x + server_lr * (FedAvg's average - x); other keyword arguments go to FedAvg."""

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_lr = server_lr
        self.current: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any,
                        grid: Any) -> Iterable[Message]:
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        avg, metrics = super().aggregate_train(server_round, replies)
        if avg is None or self.current is None:
            return avg, metrics
        x = {k: a.numpy() for k, a in self.current.items()}
        return ArrayRecord({k: Array(np.asarray(x[k] + self.server_lr * (a.numpy() - x[k])))
                            for k, a in avg.items()}), metrics
