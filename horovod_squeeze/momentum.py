"""Worker-side momentum: each worker's momentum, not its gradient, travels through the exchange.

Momentum applied *after* a lossy exchange amplifies the mass that error feedback hands back late.
The systems that compress well with momentum apply it on the worker first (dist-EF-SGDM, BytePS),
and 1-bit Adam does the same with Adam's first moment once its variance is frozen. On worker ``i``,
before the exchange::

    m_i = beta * m_i + (1 - dampening) * g_i      # SGD: dampening 0;  Adam: beta = dampening = beta1
    send  m_i          (Nesterov: g_i + beta * m_i)

The wrapped optimizer applies the average of what was sent as its gradient, with its own momentum
off. Averaging commutes with these linear updates, so without compression this *is* momentum SGD
(and Adam's first moment) on the averaged gradient; with compression, the algorithm's error feedback
returns what compressing the momentum dropped.

Adam after its exact warm-up (steps ``1..T0``) freezes the variance ``v``, the same on every rank.
What travels is the momentum already divided by it, ``s * m_i`` with
``s = 1 / (sqrt(v / (1 - beta2^T0)) + eps)``: a fixed, shared diagonal scaling, so the average is
still exact without compression, while a 1-bit compressor now sees Adam's update direction, whose
entries have comparable magnitudes, instead of moments that span orders of magnitude (a sign with
the moments' mean scale, divided by a tiny ``sqrt(v)``, would blow up).

A frozen variance can be far too small for an entry whose gradients only start after warm-up (a
ReLU unit that was dead, a rare token's embedding): ``s * m_i`` is then unbounded, although exact
Adam, whose variance would follow, never moves an entry that far. So each entry of ``s * m_i`` is
clipped to the largest value exact Adam's ``m_t / sqrt(v_t / (1 - beta2^t))`` reaches on any
gradients at any step (Cauchy-Schwarz on the two moving averages, for ``beta1^2 < beta2``)::

    B = (1 - beta1) / sqrt((1 - beta2) * (1 - beta1^2 / beta2))      # 7.27 for (0.9, 0.999)

Exact Adam's direction is never clipped; without the clip, 1-bit error feedback hands such an
entry's growing mass back through a shared scale and diverges.

Adam's momentum is then a *consensus*, as in 1-bit Adam: after the exchange every worker's ``m_i``
becomes the exchanged average divided by ``s``, so next step the workers send
``s * (beta1 * m + (1 - beta1) * g_i)``, which differ only by this step's gradients. Kept local,
each ``m_i`` carries its worker's accumulated noise, the workers' signs disagree, and a 1-bit
second pass (DoubleSqueeze's server) turns that disagreement into noise. Without compression both
are exact Adam's first moment. SGD's momentum stays local (dist-EF-SGDM), where it is measured
to match fp32. At step ``t``, with ``u`` the exchanged direction::

    p = p * (1 - lr * wd)                      # AdamW only
    p = p - lr * u / (1 - beta1^t)

(plain Adam's L2 term ``wd * p`` joins ``g_i`` before the momentum, as Adam adds it to the gradient).
The rules are written once here, against a codec's array operations, for every framework.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from horovod_squeeze.algorithms.base import MOMENT, WORKER, StateSpec

__all__ = ["WorkerMomentum", "adam_scale", "adam_direction_bound", "frozen_adam_update",
           "ADAM_WARMUP_STEPS", "warmup_steps_for"]

Tensor = Any

#: Exact Adam steps before its variance is frozen, unless ``warmup_steps`` says otherwise.
ADAM_WARMUP_STEPS = 100


def warmup_steps_for(kind: str | None, warmup_steps: int | None) -> int:
    """The warm-up a wrapper runs: ``warmup_steps`` if given, else 0, or :data:`ADAM_WARMUP_STEPS`
    for Adam with worker momentum (``kind == "adam"``), which needs at least one exact step."""
    if warmup_steps is None:
        return ADAM_WARMUP_STEPS if kind == "adam" else 0
    if kind == "adam" and warmup_steps == 0:
        raise ValueError("Adam with worker momentum freezes its variance after exact warm-up "
                         f"steps, so warmup_steps must be at least 1 (default "
                         f"{ADAM_WARMUP_STEPS}); or pass worker_momentum=False")
    return warmup_steps


@dataclasses.dataclass(frozen=True)
class WorkerMomentum:
    """``m_i = beta m_i + (1 - dampening) g_i`` on each worker; sends ``m_i`` (Nesterov:
    ``g_i + beta m_i``), times a scale if one is given, each entry clipped to ``±bound`` if one is
    set (Adam: :func:`adam_direction_bound`). With ``consensus``, every worker's momentum then
    becomes the exchanged average divided by the scale (1-bit Adam's rule). One ``momentum`` state
    tensor per worker, kept as is when the learning rate changes (as the optimizers keep theirs)."""

    beta: float
    dampening: float = 0.0
    nesterov: bool = False
    bound: float | None = None
    consensus: bool = False

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta < 1.0):
            raise ValueError(f"worker momentum must be in (0, 1), got {self.beta!r}")
        if not (isinstance(self.dampening, (int, float)) and 0.0 <= self.dampening < 1.0):
            raise ValueError(f"momentum dampening must be in [0, 1), got {self.dampening!r}")
        if self.nesterov and self.dampening:
            raise ValueError("Nesterov momentum requires zero dampening (as torch.optim.SGD)")
        if self.consensus and self.nesterov:
            raise ValueError("a consensus momentum cannot be recovered from an exchanged "
                             "Nesterov step (g + beta m)")
        if self.bound is not None and not self.bound > 0.0:
            raise ValueError(f"the bound on what is sent must be positive, got {self.bound!r}")

    @classmethod
    def adam(cls, beta1: float, beta2: float) -> "WorkerMomentum":
        """Adam's first moment after warm-up (1-bit Adam's rule, see the module): ``beta1`` with
        its ``1 - beta1`` weight, the preconditioned moment clipped to
        :func:`adam_direction_bound`, a consensus after every exchange."""
        return cls(beta1, dampening=beta1, bound=adam_direction_bound(beta1, beta2),
                   consensus=True)

    def state(self) -> tuple[StateSpec, ...]:
        return (StateSpec("momentum", WORKER, MOMENT, doc="m_i: this worker's momentum"),)

    def apply(self, xp, gradient: Tensor, state: dict, scale: Tensor | None = None
              ) -> tuple[Tensor, dict]:
        """What this worker sends (times ``scale``, Adam's frozen preconditioner, if given) and
        its new state (pure: ``state`` is not written); ``xp``: the codec's array operations."""
        momentum = state["momentum"] * self.beta + gradient * (1.0 - self.dampening)
        sent = gradient + momentum * self.beta if self.nesterov else momentum
        if scale is not None:
            sent = sent * scale
        if self.bound is not None:
            sent = xp.clip(sent, self.bound)
        return sent, {"momentum": momentum}

    def settle(self, exchanged: Tensor, momentum: dict, scale: Tensor | None = None) -> dict:
        """The momentum state after the exchange: this worker's own (``momentum``, from
        :meth:`apply`), or with ``consensus`` the exchanged average, unscaled."""
        if not self.consensus:
            return momentum
        return {"momentum": exchanged if scale is None else exchanged / scale}


def adam_direction_bound(beta1: float, beta2: float) -> float | None:
    """``(1 - beta1) / sqrt((1 - beta2) (1 - beta1^2 / beta2))``: no entry of exact Adam's
    ``m_t / sqrt(v_t / (1 - beta2^t))`` ever exceeds it; None where ``beta1^2 >= beta2`` (no
    bound exists)."""
    if beta1 ** 2 >= beta2:
        return None
    return (1.0 - beta1) / ((1.0 - beta2) * (1.0 - beta1 ** 2 / beta2)) ** 0.5


def adam_scale(xp, variance: Tensor, *, variance_step, beta2: float, eps: float) -> Tensor:
    """``s = 1 / (sqrt(v / (1 - beta2^T0)) + eps)``: Adam's preconditioner with the variance frozen
    after step ``variance_step`` (``T0 >= 1``; a Python number or a scalar tensor)."""
    variance_correction = (1.0 - beta2 ** variance_step) ** 0.5
    return 1.0 / (xp.sqrt(variance) / variance_correction + eps)


def frozen_adam_update(param: Tensor, direction: Tensor, *, step, learning_rate, beta1: float,
                       weight_decay: float = 0.0, decoupled: bool = True) -> Tensor:
    """Adam's (AdamW's: ``decoupled``) new parameter at ``step`` from the exchanged direction
    ``u = mean_i(s * m_i)``. Steps and the learning rate may be scalar tensors (in a graph)."""
    if decoupled and weight_decay:
        param = param * (1.0 - learning_rate * weight_decay)
    return param - direction * (learning_rate / (1.0 - beta1 ** step))
