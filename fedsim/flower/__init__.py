"""fedsim and Flower (flwr 1.41, Message API), both ways.

A. fedsim strategies as real Flower apps: `adapter.FlowerAdapter` (a
   `flwr.serverapp.strategy.Strategy` wrapping any fedsim strategy), the ClientApp of
   `client.make_client_app`, the ServerApp of `server.make_server_app`, the engine
   `engine: {kind: flower, runtime: inprocess|ray|mpi}` (`fedsim.engines.flower`), and
   `export.export_flower` (`fedsim export-flower SCENARIO DIR`: a project `flwr run` runs).
B. A Ray-free, deterministic runtime for any Flower app: `grid.InProcessGrid` / `grid.MpiGrid`
   (`flwr.serverapp.Grid` implementations) and `runtime.run_app` (`fedsim flower-run`).

The only Flower internal used is isolated in `identity.set_task_identity`. Modules here import
flwr at top level; import them lazily (the engine registry must not pay for flwr).
"""
