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

from horovod_squeeze.decentralized import check_setup, gossip_step, message_nbytes
from horovod_squeeze.neighbors import NeighborExchange, world
from horovod_squeeze.plan import working_precision
from horovod_squeeze.tensorflow import codecs

__all__ = ["Gossip"]


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
                 precision: str | None = None):
        self.variables = [v for v in variables]
        if not self.variables:
            raise ValueError("Gossip: no variables to gossip")
        comm = world(hvd.size()) if comm is None else comm
        if precision is None:
            precision = working_precision(v.dtype.name for v in self.variables)
        self.topology = check_setup(algorithm, topology, comm.Get_size(), precision)
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
        """``mean_i ||x_i - mean_j x_j||^2``: a collective (two Horovod allreduces)."""
        model = tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for v in self.variables], 0)
        average = hvd.allreduce(model, op=hvd.Average, name="squeeze.gossip.average")
        squared = tf.reshape(tf.reduce_sum((model - average) ** 2), [1])
        return float(hvd.allreduce(squared, op=hvd.Average, name="squeeze.gossip.distance")[0])
