"""Every Flower internal fedsim touches, in one place (flwr 1.42; pinned by tests).

fedsim's Ray-free runtimes (`fedsim.flower.grid`) build and route Messages outside Flower's
own runtimes, which needs four things Flower's public API (`flwr.app`, `flwr.serverapp`,
`flwr.clientapp`, `flwr.simulation`) does not offer in 1.42:

1. `TaskIdentity` (`flwr.supercore.task_identity`): the class-level run/node/task identity
   from which `Message(...)` stamps `run_id`, `src_node_id` and `src_task_id`; Flower's
   runtimes set it before running an app, and without it `Message(...)` raises
   ``RuntimeError: TaskIdentity.run_id is not set``.
2. `Run` (`flwr.supercore.run`): the type of `Grid.set_run` / `Grid.run`, abstract methods
   every Grid implements.
3. A message's id: `Metadata.message_id` has no public setter. A Grid assigns the ids of the
   messages pushed to it, and Flower's own `InMemoryGrid` does it by writing
   ``metadata.__dict__["_message_id"]`` of the ServerApp's message; `set_message_id` does
   the same. `copy_message` builds a message from given metadata with
   `Message(metadata=...)`, the keyword Flower's own deserialisation uses (`make_message`).
4. `ErrorCode.CLIENT_APP_RAISED_EXCEPTION` and `SUPERLINK_NODE_ID`
   (`flwr.common.constant`): the error code Flower's runtimes put in the reply of a ClientApp
   that raised, and the node id of the ServerApp.

`tests/test_flower.py::test_flower_internals_contract` checks each of them against the
installed Flower and fails loudly on an upgrade that moves or changes one.
"""

from __future__ import annotations

from typing import Any

FLOWER_VERSION = "1.42"
"""The Flower minor version these internals were checked against (pyproject pins it)."""


def server_node_id() -> int:
    """Flower's `SUPERLINK_NODE_ID`: the source node of ServerApp instructions."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    return int(SUPERLINK_NODE_ID)


def client_app_error_code() -> int:
    """The `Error.code` of a reply whose ClientApp raised (as Flower's runtimes send it)."""
    from flwr.common.constant import ErrorCode

    return int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


def set_task_identity(run_id: int, node_id: int | None = None, task_id: int = 1) -> None:
    """Declare which run/node/task this process executes (needed before building Messages)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = int(run_id)
    TaskIdentity.node_id = int(server_node_id() if node_id is None else node_id)
    TaskIdentity.task_id = int(task_id)


def task_identity() -> tuple[int, int, int]:
    """(run_id, node_id, task_id) currently set; RuntimeError from Flower if unset."""
    from flwr.supercore.task_identity import TaskIdentity

    return TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id


def new_run(run_id: int) -> Any:
    """An empty Flower `Run` with id `run_id` (what `Grid.run` returns)."""
    from flwr.supercore.run import Run

    return Run.create_empty(run_id=int(run_id))


def run_type() -> type:
    """The `Run` class of `Grid.set_run`."""
    from flwr.supercore.run import Run

    return Run


def set_message_id(msg: Any, message_id: str) -> Any:
    """Give `msg` the id `message_id`, as Flower's Grids do when a message is pushed; returns it."""
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def copy_message(msg: Any, content: Any) -> Any:
    """A new Message with a copy of `msg`'s metadata (same ids) carrying `content`."""
    import copy

    from flwr.app import Message

    return Message(metadata=copy.copy(msg.metadata), content=content)  # type: ignore[call-overload]
