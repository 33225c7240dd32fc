"""A user strategy (dotted path `tests.mpi_scripts.boom:factory`) that raises in round 2 on the
block holding the last client: under `mpiexec -n 2` only rank 1 fails (the fault test)."""

from fedsim.types import Strategy
from strategies import STRATEGIES


def factory(*, lr: float = 0.1) -> Strategy:
    """FedAvg that raises RuntimeError in round 2 on the last client's block."""
    base = STRATEGIES.build("fedavg", {"lr": lr, "local_steps": 2})

    def local(server, clients, oracle, ctx):
        if ctx.round == 2 and bool((ctx.ids == ctx.num_clients - 1).any()):
            raise RuntimeError("boom: last client, round 2")
        return base.local(server, clients, oracle, ctx)

    return base._replace(local=local)
