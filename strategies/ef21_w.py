"""EF21-W: EF21 with per-client weights proportional to the smoothness constants L_i.

References:
  Richtárik, Gasanov, Burlachenko, "Error Feedback Reloaded: From Quadratic to Arithmetic Mean
  of Smoothness Constants", ICLR 2024, arXiv:2402.10774.
"""

from __future__ import annotations

from fedsim.constraints import PositiveFloat
from fedsim.types import Compressor, Strategy, StrategyRuntime
from strategies import STRATEGIES
from strategies.ef21 import THEORY, TOP_K, Step, Weighting, check_smoothness, ef21_family
from strategies.feedback import Init


@STRATEGIES.register("ef21-w")
def ef21_w(*, lr: Step = THEORY, compressor: Compressor = TOP_K,
           smoothness: list[PositiveFloat] | None = None, stochastic: bool = False,
           init: Init = "dense", weighting: Weighting = "samples",
           runtime: StrategyRuntime | None = None) -> Strategy:
    """EF21-W (Richtárik, Gasanov, Burlachenko, ICLR 2024): EF21 with weights w_i ∝ pi_i L_i.

    c_i = C(grad_i / L_i - g_i), g_i += c_i, and the server adds sum_i pi_i L_i c_i: the paper's
    c_i = C(grad_i / (n w_i) - g_i), g += sum_i w_i c_i with w_i = pi_i L_i / sum_j pi_j L_j,
    run in unnormalised form. By default it takes its own theory step (Thm 2),
    1 / (L + L_AM sqrt(beta/theta)), L_AM = sum_i pi_i L_i: for positively homogeneous
    compressors (top_k, rand_k, qsgd) its iterates are EF21's whatever the weights (the paper's
    Sec. 2.4), so this larger step, not the weights, is where its gain over EF21's
    1 / (L + L_QM sqrt(beta/theta)) comes from. With those compressors and a numeric lr nothing
    uses the L_i, so none are estimated and it runs as `ef21`.

    Args:
      lr: `theory` (default; {kind: theory, factor: f, L: L} for a multiple or the smoothness L
        of f, else bounded by L_AM) or a number.
      smoothness: L_i of every client (length N). None: each client estimates its L_i once, at
        its first participation, by power iteration on its full loss at the current model
        (`fedsim.objectives.estimate_smoothness`: 21 extra full-gradient calls of the block in
        rounds where a participant is new), and sends it up (one value). That is a local
        curvature estimate (20 power iterations), not the global constant L_i.
      Other arguments as for `ef21`.

    Shapes: server {"x", "g": [P]} (+ "Ls": [4] when estimated L_i set the step); clients
    EF21's {"g": [m, P], "seen": [m]} (+ "L": [m] when estimated).
    """
    check_smoothness(smoothness, runtime)
    return ef21_family(lr=lr, compressor=compressor, smoothness=smoothness, weighted=True,
                       stochastic=stochastic, init=init, weighting=weighting)
