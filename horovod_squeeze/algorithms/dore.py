"""DORE, double residual compression (Liu, Li, Tang, Yan, AISTATS 2020).

Workers compress the residual of their gradient against a learned shift (DIANA's idea); the server
takes the SGD step and compresses the residual of the *model* with error compensation. For n
workers, compressors ``Q_w`` (pass 1) and ``Q_s`` (pass 2, the same as ``Q_w`` unless named),
learning rate ``gamma``::

    worker i:  d_i = Q_w(g_i - h_i);          h_i = h_i + alpha * d_i       # pass 1: send d_i
    server:    d = mean_i(d_i);  g = h + d;    h = h + alpha * d
               q = -gamma * g + eta * e;       c = Q_s(q);   e = q - c      # pass 2: send c
    every worker:  x = x + beta * c

``-gamma * g`` is the server's model step ``x_new - x``; every rank holds the same ``x`` and
applies the same ``beta * c``, so models never drift apart. Symbols to arguments: ``g_i`` is
``gradient``, ``d_i`` the decoded ``pieces``, ``h_i``, ``h`` and ``e`` the state
``worker_shift``, ``server_shift`` and ``model_error``; ``gamma`` is the wrapped optimizer's
learning rate (plain SGD; the algorithm takes its step).

Both compression errors vanish at the optimum: ``g_i - h_i -> 0`` as the shifts learn the local
gradients there (which differ between workers, so DoubleSqueeze's residuals never vanish), and the
model step goes to 0. So with full gradients on a strongly convex problem DORE converges linearly
to the exact optimum. The rules behind the checks (``docs/algorithms.md``):

- ``alpha <= 1 / (omega_w + 1)`` for an unbiased ``Q_w`` of variance ``omega_w``: the shifts converge.
  ``g = h + d`` estimates the mean gradient without bias only for an unbiased ``Q_w``; a biased,
  contractive one needs ``alpha = 1`` (then ``g = mean_i h_i``: EF21's rule).
- For an unbiased ``Q_s`` of variance ``omega_s``, the model error ``e = q - Q_s(q)`` with
  ``q = step + eta * e`` stays bounded if ``eta^2 omega_s < 1`` (``E||e'||^2 <= omega_s ||q||^2``),
  or, with ``eta = 1``, if ``beta <= 1 / (omega_s + 1)``. A contractive ``Q_s`` works as error
  feedback, ``beta = eta = 1``.

Example::

    import horovod_squeeze as hs
    hs.DORE(hs.Ternary())                                  # the paper's: ternary both ways
    hs.DORE(hs.Ternary(), server=hs.ScaledSign(), beta=1.0, eta=1.0)  # error feedback down
"""
from __future__ import annotations

import dataclasses
import warnings

from horovod_squeeze.algorithms.base import (
    MODEL, MODEL_INCREMENT, MOMENT, SERVER, WORKER, Algorithm, ServerOut, StateSpec, WorkerOut,
    compensate, mean,
)

__all__ = ["DORE"]


@dataclasses.dataclass(frozen=True, repr=False)
class DORE(Algorithm):
    """Learned gradient shifts up, an error-compensated model residual down; applies ``beta * c``.

    Args:
      worker, server: ``Q_w`` and ``Q_s`` (``server`` defaults to ``worker``).
      alpha: the shifts' step, in (0, 1] (0.1 is inside the rule for ``Ternary()``, whose
        ``omega`` is 7.5).
      beta: the model step, in (0, 1].
      eta: the weight of the model error carried to the next step, in [0, 1] (0.1 is inside the
        rule for ``Ternary()`` with ``beta = 1``).
    """

    alpha: float = 0.1
    beta: float = 1.0
    eta: float = 0.1

    output = MODEL_INCREMENT

    def __post_init__(self):
        super().__post_init__()
        for field, low, closed in (("alpha", 0.0, False), ("beta", 0.0, False),
                                   ("eta", 0.0, True)):
            value = getattr(self, field)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not (low <= value <= 1.0 if closed else low < value <= 1.0)):
                raise ValueError(f"DORE: {field} must be in {'[' if closed else '('}{low:g}, 1], "
                                 f"got {value!r}")

    def default_server(self):
        return self.worker

    def state(self):
        return (StateSpec("worker_shift", WORKER, units=MOMENT,
                          doc="h_i: what worker i's gradient is compressed against"),
                StateSpec("server_shift", SERVER, units=MOMENT, doc="h: the mean of the h_i"),
                StateSpec("model_error", SERVER, units=MODEL,
                          doc="e: what the model pass has not sent yet"))

    def worker_stage(self, codec, gradient, state, ctx):
        shift = state["worker_shift"]
        residual = compensate(codec, self.worker, gradient - shift, None, ctx)
        return WorkerOut(residual.payload,
                         {"worker_shift": shift + residual.decoded * self.alpha})

    def server_stage(self, codec, pieces, state, ctx):
        residual, shift = mean(pieces), state["server_shift"]
        model_step = (shift + residual) * (-ctx.learning_rate)
        out = compensate(codec, self.server, model_step, state["model_error"] * self.eta, ctx)
        return ServerOut(out.payload, out.decoded,
                         {"server_shift": shift + residual * self.alpha,
                          "model_error": out.residual})

    def output_stage(self, codec, decoded, ctx):
        return decoded * self.beta

    def check(self, largest_numel, *, stacklevel=2):
        worker = self.worker.contract(max(largest_numel, 1))
        if worker.kind == "unbiased" and self.alpha > 1.0 / (worker.omega + 1.0):
            warnings.warn(
                f"{self!r}: the shift step must satisfy alpha <= 1 / (omega + 1) = "
                f"{1.0 / (worker.omega + 1.0):.3g} for {self.worker!r} (omega = "
                f"{worker.omega:.3g} on {largest_numel} entries), or the shifts can diverge",
                stacklevel=stacklevel + 1)
        elif worker.kind != "unbiased" and worker.error_bound > 0 and self.alpha != 1.0:
            raise ValueError(
                f"{self!r}: the gradient estimate h + mean_i Q(g_i - h_i) is unbiased only for an "
                f"unbiased compressor, and {self.worker!r} is {worker.kind}; use an unbiased one "
                "(Ternary, QSGD, RandK(unbiased=True)) or alpha=1, where the estimate is "
                "mean_i h_i (EF21's rule)")
        server = self.server.contract(max(largest_numel, 1))
        if server.kind == "unbiased":
            omega = server.omega
            if self.beta > 1.0 / (omega + 1.0) and self.eta ** 2 * omega >= 1.0:
                warnings.warn(
                    f"{self!r}: the model error grows unless beta <= 1 / (omega + 1) = "
                    f"{1.0 / (omega + 1.0):.3g} or eta < 1 / sqrt(omega) = "
                    f"{omega ** -0.5:.3g}, for {self.server!r} (omega = {omega:.3g} on "
                    f"{largest_numel} entries)", stacklevel=stacklevel + 1)
        elif server.error_bound > 0 and (server.kind == "biased"
                                         or (self.beta, self.eta) != (1.0, 1.0)):
            raise ValueError(
                f"{self!r}: the model compressor {self.server!r} is {server.kind}, so only error "
                "feedback corrects it, which needs a contractive compressor with beta=1 and eta=1")
