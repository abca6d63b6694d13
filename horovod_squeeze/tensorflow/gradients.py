"""The function that replaces Horovod's ``_allreduce_grads`` in its tape and Keras optimizer.

Horovod's ``DistributedGradientTape`` and Keras ``DistributedOptimizer`` both average gradients by
calling ``self._allreduce_grads(grads, vars)``. :class:`SqueezeGradients` has that signature and
sends the gradients through a :class:`~horovod_squeeze.tensorflow.engine.SqueezeEngine` instead,
keyed by the variables: one engine per list of variables, built on first use (outside any graph
being traced) and reused on every later call and retrace.

For an algorithm whose output is a model increment, the engine gets the wrapped optimizer's learning
rate; the Keras optimizer adds the increments to the variables, and the tape returns them as the
gradients plain SGD steps by (``-increment / lr``).
"""
from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf

from horovod_squeeze.algorithms import Algorithm
from horovod_squeeze.plan import EngineOptions, working_precision
from horovod_squeeze.tensorflow.collectives import HorovodCollectives
from horovod_squeeze.tensorflow.engine import SqueezeEngine

__all__ = ["SqueezeGradients"]


class SqueezeGradients:
    """``(grads, vars) -> averaged grads`` through a compressed exchange (Horovod's signature).

    ``learning_rate``: a zero-argument callable giving the optimizer's rate this step (a float32
    scalar), for algorithms that update the model. With ``increment_as_gradient``, their increments
    come back as ``-increment / learning_rate``: what plain SGD with that rate steps by.
    """

    def __init__(self, algorithm: Algorithm, *, op_is_sum: bool, gradient_predivide_factor: float,
                 process_set, options: EngineOptions, on_build=None, momentum=None,
                 momentum_source=None, momentum_scale=None, learning_rate=None,
                 increment_as_gradient=False):
        self.algorithm = algorithm
        self.options = options
        self.learning_rate = learning_rate
        self.increment_as_gradient = increment_as_gradient
        # Worker momentum (horovod_squeeze.momentum), and for each, variables -> (variable -> its
        # tensor): where the momentum starts (the optimizer's), what it is sent times.
        self.momentum = momentum
        self.momentum_source, self.momentum_scale = momentum_source, momentum_scale
        self.collectives = HorovodCollectives(process_set)
        # Average is what the algorithms compute; Sum is the same times the number of ranks.
        self.prescale = 1.0 / gradient_predivide_factor
        self.postscale = gradient_predivide_factor * (self.collectives.size if op_is_sum else 1.0)
        self.on_build = on_build
        self._pending: list = []
        self.engines: dict[tuple, SqueezeEngine] = {}
        self._compiled: dict[tuple, tf.types.experimental.GenericFunction] = {}

    @property
    def engine(self) -> SqueezeEngine | None:
        """The engine, once gradients went through (``None`` before; an error if several lists of
        variables did: then use :attr:`engines`)."""
        if len(self.engines) > 1:
            raise RuntimeError(f"{len(self.engines)} lists of variables went through this wrapper, "
                               "each with its own engine: see .engines")
        return next(iter(self.engines.values()), None)

    def build(self, variables) -> SqueezeEngine:
        """The engine for ``variables`` (created once, with zero residuals)."""
        variables = list(variables)
        key = tuple(v.ref() for v in variables)
        if key not in self.engines:
            with tf.init_scope():  # variables and callbacks' actions run eagerly, once
                named = _named_shapes(variables)
                by_name = {name: variable for (name, _), variable in zip(named, variables)}
                sources = {}  # the engine's name-keyed callables, from the variable-keyed ones
                for argument, factory in (("momentum_source", self.momentum_source),
                                          ("momentum_scale", self.momentum_scale)):
                    if factory is not None:
                        of_variable = factory(variables)
                        sources[argument] = lambda name, of=of_variable: of(by_name[name])
                options = dataclasses.asdict(self.options)
                if options["precision"] is None:
                    options["precision"] = working_precision(v.dtype.name for v in variables)
                engine = SqueezeEngine(self.algorithm, named, collectives=self.collectives,
                                       device=variables[0].device if variables else None,
                                       learning_rate=self.learning_rate, momentum=self.momentum,
                                       **sources, **options)
                engine.agree()  # every rank builds its engine at the same point
                self.engines[key] = engine
                self._compiled[key] = tf.function(functools.partial(self._exchange, engine),
                                                  autograph=False)
                if self.on_build is not None:
                    self.on_build(engine)
                pending, self._pending = self._pending, []
                for action in pending:
                    action(engine)
        return self.engines[key]

    def when_built(self, action) -> None:
        """Runs ``action(engine)`` now if the engine exists, else right after it is built (eagerly,
        before its first exchange): how Keras callbacks reach a model that is not built yet."""
        engine = self.engine
        if engine is None:
            self._pending.append(action)
        else:
            action(engine)

    def __call__(self, grads, variables, use_generic_names=False):
        del use_generic_names  # collectives are named by engine and bucket
        if variables is None:
            raise ValueError("compressed exchanges key residuals by variable: pass the variables")
        grads, variables = list(grads), list(variables)
        engine = self.build(variables)
        grads = [g if g is None or self.prescale == 1.0 else g * self.prescale for g in grads]
        if tf.executing_eagerly():  # as Horovod does: run the exchange as a graph
            return self._compiled[tuple(v.ref() for v in variables)](grads)
        return self._exchange(engine, grads)

    def _exchange(self, engine: SqueezeEngine, grads: list) -> list:
        out = [a if a is None or self.postscale == 1.0 else a * self.postscale
               for a in engine(grads)]
        if not self.increment_as_gradient:
            return out
        rate = self.learning_rate()
        return [a if a is None else -(a / tf.cast(rate, a.dtype)) for a in out]


def _named_shapes(variables) -> list[tuple[str, tuple[int, ...]]]:
    """Unique names (variables may share one, e.g. ``Variable:0``) and static shapes."""
    named, seen = [], {}
    for variable in variables:
        if not variable.shape.is_fully_defined():
            raise ValueError(f"{variable.name}: compressed exchanges need static shapes, got "
                             f"{variable.shape}")
        name = variable.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name] - 1}"
        named.append((name, tuple(variable.shape.as_list())))
    return named
