"""fedsim and Flower (flwr 1.42, Message API), both ways.

A. fedsim strategies as real Flower apps: `adapter.FlowerAdapter` (a
   `flwr.serverapp.strategy.Strategy` wrapping any fedsim strategy), the ClientApp of
   `client.make_client_app`, the ServerApp of `server.make_server_app`, the engine
   `engine: {kind: flower, runtime: inprocess|ray|mpi}` (`fedsim.engines.flower`), and
   `export.export_flower` (`fedsim export-flower SCENARIO DIR`: a project `flwr run` runs).
B. Flower's own strategy objects on fedsim's clients: `strategy: {name: flower, class: ...}`
   (`plugin`: validation and the client half; `driver`: the seeded Flower strategy loop).
C. A Ray-free, deterministic runtime for any Flower app: `grid.InProcessGrid` / `grid.MpiGrid`
   (`flwr.serverapp.Grid` implementations) and `runtime.run_app` (`fedsim flower-run`). With
   fedsim's own ClientApp these grids multiplex: a round's messages to the nodes of one host
   are trained as one stacked computation (`client.FedsimClientApp.handle_batch`, `node`).

Every Flower internal fedsim touches is in `internals` (pinned by tests). Modules here import
flwr at top level (but `plugin` and `internals`); import them lazily (the engine and strategy
registries must not pay for flwr).
"""
