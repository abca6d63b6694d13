"""What an engine runs, decided once for both frameworks: the checked configuration, the buckets,
each bucket's state layout and bytes, and which exchange a bucket takes at a given step.

The PyTorch and TensorFlow engines each build a :class:`Plan` and only move tensors: allocate the
state it lays out, feed gradients to :meth:`Plan.run`, store what it returns.
"""
from __future__ import annotations

import dataclasses
import math

from horovod_squeeze.algorithms.base import (
    AVERAGED_GRADIENT, GRADIENT, SERVER, Algorithm, StateSpec,
)
from horovod_squeeze.buckets import Bucket, make_buckets
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.exchange import (
    PLAIN, BucketResult, Exchange, PassBytes, Sharded, StepContext, fp32_allreduce_bytes,
    make_exchange, shard_numel,
)
from horovod_squeeze.momentum import WorkerMomentum

__all__ = ["EngineOptions", "Plan", "PRECISIONS", "check_algorithm", "working_precision"]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The options every binding's wrapper takes, with their defaults.

    Tune these:
      exchange: ``"sharded"`` (alltoall + allgather, a server shard per rank), ``"allgather"`` (one
        pass, replicated server) or ``"allreduce"`` (linear compressors), or an ``Exchange``.
      bucket_cap_mb: gradients are fused into buckets of at most this many MB of float32.
      min_compress_numel: tensors with fewer entries are averaged uncompressed, in one bucket.
      warmup_steps: the first steps are averaged uncompressed (the state stays zero).
      log_every: rank 0 logs bytes and timings every this many steps (0: never).
      precision: ``"float32"`` or ``"float64"``, the dtype of the algorithm's arithmetic and state
        and of the uncompressed average. Payloads do not change: a compressor's scales travel in
        float32, and what it decodes is exact in float64. ``None`` (the wrappers' default): float64
        when every parameter is float64 (:func:`working_precision`), so a float64 model keeps
        float64 residuals and reaches float64's accuracy; an engine built directly takes float32.
    """

    exchange: str | Exchange = "sharded"
    bucket_cap_mb: float = 25.0
    min_compress_numel: int = 1024
    warmup_steps: int = 0
    log_every: int = 0
    precision: str | None = None

    def __post_init__(self):
        for field in ("min_compress_numel", "warmup_steps", "log_every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.bucket_cap_mb, (int, float)) and self.bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be positive, got {self.bucket_cap_mb!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, "
                             f"got {self.precision!r}")
        make_exchange(self.exchange)


#: The working precisions an engine computes in.
PRECISIONS = ("float32", "float64")


def working_precision(dtype_names) -> str:
    """The precision for parameters of these dtypes (names such as ``"float64"``): float64 when
    every one is float64, else float32 (float16 and bfloat16 models keep float32 residuals)."""
    names = [str(name).rsplit(".", 1)[-1] for name in dtype_names]
    return "float64" if names and all(name == "float64" for name in names) else "float32"


def check_algorithm(algorithm) -> Algorithm:
    """``algorithm`` if it is one; a clear error for a bare compressor or anything else."""
    if isinstance(algorithm, Compressor):
        raise TypeError(f"compression={algorithm!r} is a compressor; wrap it in an algorithm, "
                        f"e.g. horovod_squeeze.DoubleSqueeze({algorithm!r})")
    if not isinstance(algorithm, Algorithm):
        raise TypeError("compression must be an algorithm such as "
                        "horovod_squeeze.DoubleSqueeze(horovod_squeeze.ScaledSign()), "
                        f"got {algorithm!r}")
    return algorithm


class Plan:
    """An algorithm over an exchange for fixed named shapes on ``size`` ranks."""

    def __init__(self, algorithm: Algorithm, named_shapes, size: int,
                 options: EngineOptions = EngineOptions(), *,
                 momentum: WorkerMomentum | None = None, stacklevel: int = 2):
        self.algorithm = check_algorithm(algorithm)
        self.options = options
        if momentum is not None and algorithm.output != AVERAGED_GRADIENT:
            raise ValueError(f"{algorithm!r} updates the model itself; worker momentum applies "
                             "to algorithms that average gradients")
        #: Worker-side momentum applied before every bucket's exchange after warm-up, or None.
        self.momentum = momentum
        self.exchange = make_exchange(options.exchange)
        self.size = size
        named_shapes = [(name, tuple(int(d) for d in shape)) for name, shape in named_shapes]
        self.exchange.check(self.algorithm)
        largest = max((math.prod(shape) for _, shape in named_shapes), default=1)
        self.algorithm.check(largest, stacklevel=stacklevel + 1)
        self.buckets: list[Bucket] = make_buckets(
            named_shapes, self.exchange, bucket_cap_mb=options.bucket_cap_mb,
            min_compress_numel=options.min_compress_numel)
        self.numel = sum(b.numel for b in self.buckets)
        #: The dtype name of the state and arithmetic: ``"float32"`` or ``"float64"``.
        self.precision = options.precision or "float32"

    def state_specs(self, bucket: Bucket | None = None) -> tuple[StateSpec, ...]:
        """The state ``bucket`` keeps (every bucket's, without one): the worker momentum's, in
        every bucket, then the algorithm's, in compressed buckets."""
        specs = self.momentum.state() if self.momentum is not None else ()
        if bucket is None or bucket.compressed:
            specs += self.algorithm.state()
        return specs

    def state_layout(self, bucket: Bucket) -> dict[str, int]:
        """This rank's state tensors of ``bucket``: name -> length."""
        momentum = self.momentum.state() if self.momentum is not None else ()
        layout = {}
        for spec in self.state_specs(bucket):
            if spec in momentum:  # applied to the whole bucket before the exchange
                layout[spec.name] = bucket.numel
            else:
                layout[spec.name] = bucket.exchange.state_numel(spec.placement, bucket.numel,
                                                                self.size)
        return layout

    def state_span(self, bucket: Bucket, spec: StateSpec, rank: int) -> tuple[int, int]:
        """Where this rank's ``spec`` tensor of ``bucket`` sits in the bucket: ``(start, stop)``,
        covering the tensor's first ``stop - start`` entries (the rest is padding)."""
        if spec.placement == SERVER and isinstance(bucket.exchange, Sharded):
            shard = shard_numel(bucket.numel, self.size)
            start = min(rank * shard, bucket.numel)
            return start, min(start + shard, bucket.numel)
        return 0, bucket.numel

    def gradient_state(self) -> tuple[str, ...]:
        """Names of the state in gradient units: what a learning-rate change rescales."""
        return tuple(s.name for s in self.state_specs() if s.units == GRADIENT)

    def exchange_of(self, bucket: Bucket, warm: bool) -> Exchange:
        """The bucket's exchange this step: plain while warming up."""
        return PLAIN if warm else bucket.exchange

    def run(self, codec, bucket: Bucket, flat, state: dict, *, step, rank: int, warm: bool,
            learning_rate=None, momentum_scale=None):
        """The bucket's step as an exchange generator (see :mod:`horovod_squeeze.driver`): the
        worker momentum (after warm-up; times ``momentum_scale`` if given), then the exchange."""
        context = StepContext(step, rank, self.size, learning_rate, self.precision)
        exchange = self.exchange_of(bucket, warm)
        if self.momentum is None or warm:
            return exchange.run(codec, self.algorithm, bucket, flat, state, context)
        sent, moment = self.momentum.apply(codec.xp, flat, state, momentum_scale)
        return _with_momentum(exchange.run(codec, self.algorithm, bucket, sent, state, context),
                              self.momentum, moment, momentum_scale)

    def step_bytes(self, warm: bool, rank: int = 0) -> PassBytes:
        """Payload bytes rank ``rank`` sends and receives in a step (warm-up: all plain); under
        ``sharded`` ranks differ by the few bytes their shards' segments and padding make."""
        total = PassBytes(0, 0, 0, 0)
        for bucket in self.buckets:
            total += self.exchange_of(bucket, warm).pass_bytes(self.algorithm, bucket, self.size,
                                                                rank)
        return total

    @property
    def fp32_bytes(self) -> int:
        """What an fp32 ring allreduce of the same gradients sends: the baseline."""
        return fp32_allreduce_bytes(self.numel, self.size)


def _with_momentum(steps, momentum: WorkerMomentum, moment: dict, scale):
    """An exchange generator whose result also carries the worker momentum's new state."""
    result = yield from steps
    return BucketResult(result.output,
                        {**result.state, **momentum.settle(result.output, moment, scale)})

