"""The optimizers an algorithm that updates the model supports, said once for every binding.

An algorithm whose output is a model increment (DORE, synchronous double quantization) takes the
model step itself: every rank adds the increment to its parameters, and the wrapped optimizer only
lends its learning rate. Anything the optimizer's own step would add (momentum, Nesterov, an
adaptive rule, clipping) would silently not happen, so such an algorithm supports plain SGD only.
"""
from __future__ import annotations

from typing import Mapping

from horovod_squeeze.algorithms.base import MODEL_INCREMENT, Algorithm

__all__ = ["check_plain_sgd"]


def check_plain_sgd(algorithm: Algorithm, optimizer, *, is_sgd: bool,
                    settings: Mapping[str, object], plain_sgd: str) -> None:
    """Raises ``ValueError`` if ``algorithm`` updates the model and ``optimizer`` is not plain SGD.

    Args:
      is_sgd: whether ``optimizer`` is the framework's SGD.
      settings: the optimizer's settings that plain SGD leaves off, name -> value; a true value is
        refused.
      plain_sgd: the framework's plain SGD, e.g. ``"torch.optim.SGD with momentum=0"``.
    """
    if algorithm.output != MODEL_INCREMENT:
        return
    kind = type(optimizer)
    if is_sgd:
        offending = [f"{name}={value!r}" for name, value in settings.items() if value]
        if not offending:
            return
        got = f"{kind.__name__} with {', '.join(offending)}"
    else:  # in full: another framework's (or Keras's legacy) SGD is no SGD here
        got = f"{kind.__module__}.{kind.__qualname__}"
    raise ValueError(f"{algorithm!r} takes the model step itself (it outputs a model increment), "
                     f"so it supports plain SGD only: {plain_sgd}; got {got}")
