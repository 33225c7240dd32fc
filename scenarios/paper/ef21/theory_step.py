"""The theory steps of EF21 and EF21-W in the EF21 reproduction, per seed.

One real round of `ef21-top1.yaml` with `lr: theory` (each strategy estimates its L_i at x0 as in
a run); the step is read back as gamma = (x0 - x1)_k / g1_k at the largest |g1_k|.

    python scenarios/paper/ef21/theory_step.py
"""

from __future__ import annotations

import os

import torch
import yaml

from fedsim import testing
from fedsim.config import parse_scenario
from fedsim.setup import build_setup

SCENARIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ef21-top1.yaml")


def theory_step(name: str, seed: int) -> tuple[float, torch.Tensor]:
    """(gamma of `name` with `lr: theory`, the L_i [N] it used)."""
    with open(SCENARIO) as f:
        raw = yaml.safe_load(f)
    raw["seed"] = seed
    raw["strategy"].update(name=name, lr="theory")
    setup = build_setup(parse_scenario(raw))
    loop = testing.run(setup.strategy, setup.problem(), 1, x0=setup.x0, seed=seed)
    g = loop.state.server["g"].double()
    k = int(g.abs().argmax())
    gamma = float((setup.x0.double()[k] - loop.state.server["x"].double()[k]) / g[k])
    return gamma, loop.state.store.gather(torch.arange(setup.num_clients))["L"]


def main() -> None:
    for seed in (0, 1, 2):
        plain, ls = theory_step("ef21", seed)
        weighted, _ = theory_step("ef21-w", seed)
        print(f"seed {seed}: L_i {float(ls.min()):.2f}..{float(ls.max()):.2f}  ef21 {plain:.3e}  "
              f"ef21-w {weighted:.3e}  ratio {weighted / plain:.3f}")


if __name__ == "__main__":
    main()
