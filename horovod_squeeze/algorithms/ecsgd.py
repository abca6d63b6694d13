"""EC-SGD, EC-GD, EC-LSVRG and their DIANA forms (Gorbunov, Kovalev, Makarenko, Richtárik,
NeurIPS 2020): error-compensated compression of a gradient estimator, the baselines of ECLK.

For n ranks, each with its estimator ``g_t`` of ``grad f_t(x)``::

    g_t = grad f_{t,i}(x)                                   "sgd"   (i: this round's samples)
        | grad f_t(x)                                       "gd"
        | grad f_{t,i}(x) - grad f_{t,i}(w) + grad f_t(w)   "lsvrg" (w: a snapshot, coin p)
    u_t = C(gamma (g_t - h_t) + e_t);   e_t = gamma (g_t - h_t) + e_t - u_t     # uplink
    q_t = Q(g_t - h_t);                 h_t = h_t + alpha q_t                    # DIANA shift
    x   = x - (mean_t u_t + gamma h);   h   = h + alpha mean_t q_t
    lsvrg, with probability p (one coin for all ranks): w = x (before this step's update)

``feedback="ef21"`` is EF21 (Richtárik, Sokolov, Fatkhullin 2021) on the same estimators: no
error, each rank's estimate moves by its compressed change and the step is its mean::

    q_t = C(g_t - h_t);   h_t = h_t + alpha q_t;   h = h + alpha mean_t q_t;   x = x - gamma h

Without a shift compressor ``h_t = 0``: plain EC-SGD / EC-GD / EC-LSVRG, which converge only to a
neighbourhood when ``grad f_t(x*) != 0`` (the compressed quantity does not vanish); the shift
learns ``grad f_t(x*)`` and makes EC-GD-DIANA and EC-LSVRG-DIANA exact. The uplink is
:class:`~horovod_squeeze.ErrorFeedback` and the shift :class:`~horovod_squeeze.EF21`, as for
:class:`~horovod_squeeze.ECLK`.

Example::

    import horovod_squeeze as hs
    hs.ECSGD(hs.TopK(0.1), gamma=0.5, estimator="lsvrg", shift=hs.TopK(0.1), p=0.01)
    hs.ECSGD(hs.TopK(0.1), gamma=0.5, estimator="gd", feedback="ef21")        # EF21
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.eclk import (
    check_compressors, coin_of, finite_number, resolve_compressors,
)
from horovod_squeeze.algorithms.ef21 import EF21, shift_step_rule
from horovod_squeeze.algorithms.error_feedback import ErrorFeedback
from horovod_squeeze.compressors import Compressor

__all__ = ["ECSGD", "ESTIMATORS", "FEEDBACK"]

ESTIMATORS = ("sgd", "gd", "lsvrg")
FEEDBACK = ("error", "ef21")


@dataclasses.dataclass(frozen=True)
class ECSGD:
    """An error-compensated method with a plain step (see the module's docstring).

    Args:
      compressor: ``C``, the uplink's, contractive.
      gamma: the step, positive (``1 / (2 L)`` is safe for EC-GD with a contractive ``C`` of
        ``delta`` near 1; the theory's bounds shrink with ``delta``).
      estimator: ``"sgd"``, ``"gd"`` or ``"lsvrg"``.
      shift: ``Q`` for the DIANA forms (``eclk.SAME``: ``C``); ``None`` (the default): no shift.
      alpha: the shift's step, in (0, 1], at most ``1 / (omega + 1)`` for an unbiased ``Q``.
      p: L-SVRG's snapshot probability, in (0, 1].
      seed: the coin's stream (the same on every rank).
      feedback: ``"error"`` (error compensation, the EC family) or ``"ef21"`` (EF21, no shift).
    """

    compressor: Compressor
    gamma: float
    estimator: str = "sgd"
    shift: Compressor | str | None = None
    alpha: float = 1.0
    p: float = 1.0
    seed: int = 0
    feedback: str = "error"

    def __post_init__(self):
        resolve_compressors(self)
        if self.feedback not in FEEDBACK:
            raise ValueError(f"ECSGD: feedback must be one of {FEEDBACK}, got {self.feedback!r}")
        if self.feedback == "ef21" and self.shift is not None:
            raise ValueError("ECSGD: EF21 has no separate shift (its estimates are the shifts): "
                             "leave shift=None with feedback='ef21'")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"ECSGD: estimator must be one of {ESTIMATORS}, got "
                             f"{self.estimator!r}")
        if not finite_number("ECSGD", "gamma", self.gamma) > 0:
            raise ValueError(f"ECSGD: the step gamma must be positive, got {self.gamma!r}")
        if not 0 < finite_number("ECSGD", "p", self.p) <= 1:
            raise ValueError(f"ECSGD: the snapshot probability p must be in (0, 1], got "
                             f"{self.p!r}")

    @property
    def name(self) -> str:
        """The paper's name: ``EC-SGD``, ``EC-LSVRG-DIANA``, ``EF21``, ``EF21-SGD``, ..."""
        if self.feedback == "ef21":
            return "EF21" + ("" if self.estimator == "gd" else f"-{self.estimator.upper()}")
        return f"EC-{self.estimator.upper()}" + ("-DIANA" if self.shift is not None else "")

    def check(self, numel: int) -> None:
        check_compressors(self, numel)
        if self.feedback == "ef21":
            shift_step_rule(self, self.compressor, self.alpha, numel)

    # --- what runs (the protocol of horovod_squeeze.torch.FiniteSumOptimizer) ----------------

    needs_snapshot = property(lambda self: self.estimator == "lsvrg")
    #: Whether the estimator is the full local gradient itself (``"gd"``).
    full_estimator = property(lambda self: self.estimator == "gd")
    step_scale = property(lambda self: self.gamma)

    def uplink(self) -> ErrorFeedback | None:
        """The error-compensated uplink; ``None`` for EF21, whose estimates are the update."""
        return None if self.feedback == "ef21" else ErrorFeedback(self.compressor)

    def shift_learning(self) -> EF21 | None:
        if self.feedback == "ef21":
            return EF21(self.compressor, alpha=self.alpha)
        return None if self.shift is None else EF21(self.shift, alpha=self.alpha)

    def start(self, x0) -> dict:
        return {"x": x0, "w": x0}

    def query(self, v: dict):
        """Where the gradients are taken."""
        return v["x"]

    def shift_target(self, estimator, grad_at_w):
        """What the shift learns: the estimator itself (DIANA)."""
        return estimator

    def advance(self, v: dict, x, update) -> dict:
        """The new sequences after the averaged ``update``; ``w`` moves if the coin says so."""
        return {**v, "x": x - update}

    def snapshot_point(self, v_before: dict):
        return v_before["x"]

    def snapshot(self, step: int) -> bool:
        return self.needs_snapshot and coin_of(self.seed, step, self.p)

    def current(self, v: dict):
        """What the parameters hold between steps: ``x``."""
        return v["x"]
