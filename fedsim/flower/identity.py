"""The one place fedsim touches a Flower internal: the process's task identity.

Flower 1.41 stamps every instruction `Message` with `run_id`, `src_node_id` and
`src_task_id` read from the class-level `flwr.supercore.task_identity.TaskIdentity`, which
Flower's own runtimes (SuperExec, `run_simulation`) set before they run an app. A runtime
that builds Messages outside Flower (fedsim's in-process and MPI grids) must set it too,
otherwise `Message(...)` raises ``RuntimeError: TaskIdentity.run_id is not set``.
`tests/test_flower.py::test_task_identity_contract` fails loudly if Flower moves or changes
it (fedsim pins ``flwr==1.41.*``).
"""

from __future__ import annotations

SERVER_NODE_ID = 1
"""Flower's `SUPERLINK_NODE_ID`: the source node of ServerApp instructions."""


def set_task_identity(run_id: int, node_id: int = SERVER_NODE_ID, task_id: int = 1) -> None:
    """Declare which run/node/task this process executes (needed before building Messages)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = int(run_id)
    TaskIdentity.node_id = int(node_id)
    TaskIdentity.task_id = int(task_id)


def task_identity() -> tuple[int, int, int]:
    """(run_id, node_id, task_id) currently set; RuntimeError from Flower if unset."""
    from flwr.supercore.task_identity import TaskIdentity

    return TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id
