"""``Gossip``: one rank's decentralized gossip over TensorFlow variables, after its local step.

The TensorFlow twin of :func:`horovod_squeeze.torch.DecentralizedOptimizer`'s gossip: call it after
each local optimizer step (``optimizer.apply_gradients`` on this rank's own gradients, no averaging)
and it compresses the variables, laid end to end, sends them to this rank's neighbours over MPI
neighbour collectives and mixes what they sent into the variables. It runs eagerly (the exchange is
an MPI call); Keras ``model.fit`` gets it through
:class:`horovod_squeeze.tensorflow.keras.callbacks.DecentralizedCallback`.
"""
from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import logging

from horovod_squeeze.decentralized import (
    agree_on_restore, check_setup, checkpoint, gossip_step, message_nbytes, restorable,
)
from horovod_squeeze.neighbors import NeighborExchange, world
from horovod_squeeze.plan import working_precision
from horovod_squeeze.tensorflow import codecs

__all__ = ["Gossip"]

_log = logging.getLogger("horovod_squeeze")


class Gossip:
    """Gossip over ``variables`` with ``algorithm`` in ``topology`` (see
    :func:`horovod_squeeze.torch.DecentralizedOptimizer` for the arguments).

    Example::

        import horovod.tensorflow as hvd
        import horovod_squeeze as hs
        from horovod_squeeze.tensorflow import Gossip

        hvd.init()
        gossip = Gossip(model.trainable_variables,
                        hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.2), topology="ring")
        for x, y in batches:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                          model.trainable_variables))
            gossip()
    """

    def __init__(self, variables, algorithm, topology="ring", *, comm=None,
                 precision: str | None = None, consensus_every: int = 0):
        self.variables = [v for v in variables]
        if not self.variables:
            raise ValueError("Gossip: no variables to gossip")
        comm = world(hvd.size()) if comm is None else comm
        if precision is None:
            precision = working_precision(v.dtype.name for v in self.variables)
        self.topology = check_setup(algorithm, topology, comm.Get_size(), precision,
                                    consensus_every)
        self.consensus_every = consensus_every
        self.last_consensus_distance: float | None = None
        self._pending = None
        self.algorithm = algorithm
        self.precision = precision
        self._dtype = tf.as_dtype(precision)
        self._sizes = tuple(int(np.prod(v.shape)) for v in self.variables)
        size = sum(self._sizes)
        algorithm.check(max(self._sizes))
        self._state = {name: tf.zeros([size], self._dtype) for name in algorithm.state_names()}
        self._exchange = NeighborExchange(self.topology, comm)
        self.step = 0
        self.message_nbytes = message_nbytes(algorithm, size, self._sizes)
        self.absent_neighbors: tuple[int, ...] = ()
        self._exchange.agree(algorithm=repr(algorithm), precision=precision, sizes=self._sizes,
                             names=[v.name.split(":")[0] for v in self.variables],
                             message_nbytes=self.message_nbytes)

    def __call__(self) -> None:
        """One gossip step: the variables (after the local step) mixed with the neighbours'."""
        if self._pending is not None:
            self._restore()
        model = tf.concat([tf.reshape(tf.cast(v, self._dtype), [-1]) for v in self.variables], 0)
        result = gossip_step(
            self.algorithm, codecs.on(), model, self._state, topology=self.topology,
            rank=self._exchange.rank, step=self.step,
            finite=bool(tf.reduce_all(tf.math.is_finite(model))), exchange=self._send,
            segments=self._sizes, precision=self.precision)
        for variable, value in zip(self.variables, tf.split(result.model, self._sizes)):
            variable.assign(tf.cast(tf.reshape(value, variable.shape), variable.dtype))
        self._state = result.state
        self.absent_neighbors = result.absent
        self.step += 1
        if self.consensus_every and self.step % self.consensus_every == 0:
            self.last_consensus_distance = self.consensus_distance()
            _log.info("gossip step %d: consensus distance %.4g", self.step,
                      self.last_consensus_distance)

    def _send(self, message):
        return [tf.constant(row) for row in self._exchange.allgather(message.numpy())]

    @property
    def neighbors(self) -> tuple[int, ...]:
        return self._exchange.neighbors

    @property
    def bytes_sent_per_step(self) -> int:
        """Bytes this rank sends per step: one message to each neighbour."""
        return self.message_nbytes * len(self.neighbors)

    def state_norms(self) -> dict[str, float]:
        return {name: float(tf.norm(tf.cast(value, tf.float64)))
                for name, value in self._state.items()}

    def consensus_distance(self) -> float:
        """``mean_i ||x_i - mean_j x_j||^2``, as ``mean_i ||x_i||^2 - ||mean_i x_i||^2`` in
        float64: one Horovod allreduce, a collective."""
        model = tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for v in self.variables], 0)
        averaged = hvd.allreduce(tf.concat([model, [tf.reduce_sum(model ** 2)]], 0),
                                 op=hvd.Average, name="squeeze.gossip.consensus")
        return max(0.0, float(averaged[-1] - tf.reduce_sum(averaged[:-1] ** 2)))

    def state_dict(self) -> dict:
        """This rank's gossip state and step (:func:`horovod_squeeze.decentralized.checkpoint`);
        each rank saves its own (its model differs from the others')."""
        return checkpoint(self.algorithm, self.topology, self._exchange.rank, self.step,
                          self._sizes, {name: value.numpy() for name, value in self._state.items()})

    def load_state_dict(self, saved: dict) -> None:
        """Checked now (``ValueError`` for another algorithm or model), applied at the next step
        alike on every rank: each rank's own state if every rank loaded its own, else zero state
        at the largest saved step."""
        restorable(saved, self.algorithm, self.topology, self._exchange.rank, self._sizes)
        self._pending = saved

    def _restore(self) -> None:
        saved, self._pending = self._pending, None
        state, self.step = agree_on_restore(saved, self.algorithm, self.topology, self._exchange,
                                            self._sizes)
        self._state = {name: (tf.zeros_like(value) if state is None
                              else tf.constant(state[name], self._dtype))
                       for name, value in self._state.items()}
