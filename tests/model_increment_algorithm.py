"""A toy algorithm whose output is a model increment, for the protocol's tests: the server returns
``-lr * mean_i(g_i)`` exactly, so training with it is plain SGD whatever the wrapped optimizer."""
import dataclasses

from horovod_squeeze.algorithms import (
    MODEL_INCREMENT, Algorithm, ServerOut, WorkerOut, compensate, mean,
)


@dataclasses.dataclass(frozen=True, repr=False)
class SGDIncrement(Algorithm):
    output = MODEL_INCREMENT

    def worker_stage(self, codec, gradient, state, ctx):
        return WorkerOut(compensate(codec, self.worker, gradient, None, ctx).payload, {})

    def server_stage(self, codec, pieces, state, ctx):
        step = mean(pieces) * (-ctx.learning_rate)
        out = compensate(codec, self.server, step, None, ctx)
        return ServerOut(out.payload, out.decoded, {})
