"""Contenders: the ways a user could exchange the same gradients, each one training step at a time.

- ``compute only``: the step without any exchange; its time is subtracted from every contender's
  step time to give the exchange time, so overlap of communication with backward is credited the
  same way to everyone;
- Horovod's ``DistributedOptimizer`` with fp32 and fp16 compression;
- PyTorch DDP (gloo) allreduce, and DDP with the PowerSGD hook (its error feedback on);
- this project's ``DistributedOptimizer`` with an algorithm x compressor (one per pass) x exchange;
- this project's ``DecentralizedOptimizer`` (D-PSGD, DeepSqueeze, CHOCO-SGD on a ring): a local
  step, then one message to each neighbour over MPI neighbour collectives, so these contenders
  need Horovod's MPI controller (``--controller mpi``).

``ErrorFeedback`` and ``NoFeedback`` contenders always name their second pass: ``server=ScaledSign``
(compressed without feedback, what the published runs measured) or ``server=Identity`` (the average
returned exactly: what ``ErrorFeedback(C)`` means when no server compressor is named).

Each contender also predicts the payload bytes one step sends and receives per rank (what the
collectives carry, without any header), to put beside the interface counters.
"""
from __future__ import annotations

import dataclasses
import datetime

import torch

__all__ = ["ContenderSpec", "CATALOG", "QUICK", "FULL", "PROBES", "DECENTRALIZED", "Contender",
           "build", "uses_horovod", "needs_mpi", "init_process_groups"]


@dataclasses.dataclass(frozen=True)
class ContenderSpec:
    """A contender by name: its family and the settings that family needs."""

    name: str
    family: str  # "local", "horovod", "ddp", "squeeze" or "gossip"
    compression: str = "none"  # horovod: "none" or "fp16"
    powersgd_rank: int | None = None
    ddp_bucket_cap_mb: float = 25.0
    # squeeze: "DoubleSqueeze", "ErrorFeedback" or "NoFeedback"; gossip: "DPSGD", "DeepSqueeze"
    # or "ChocoSGD"
    algorithm: str = ""
    compressor: str = ""  # squeeze: pass 1's compressor, a key of _compressor(); gossip: the one
    exchange: str = "sharded"  # squeeze: the exchange; gossip: the topology's name
    server: str = ""  # squeeze: pass 2's compressor, a key of _compressor() ("": the default)

    def algorithm_spec(self):
        """The contender's algorithm, e.g. ``DoubleSqueeze(ScaledSign())``."""
        import horovod_squeeze as hs

        cls = getattr(hs, self.algorithm)
        if self.family == "gossip":
            return cls() if not self.compressor else cls(_compressor(self.compressor),
                                                           consensus_step=_CONSENSUS_STEP)
        if not self.server:
            return cls(_compressor(self.compressor))
        return cls(_compressor(self.compressor), server=_compressor(self.server))


def _compressor(key: str):
    import horovod_squeeze as hs

    return {"ScaledSign": hs.ScaledSign(), "TopK(0.01)": hs.TopK(0.01), "QSGD(4)": hs.QSGD(4),
            "Ternary": hs.Ternary(), "Identity": hs.Identity()}[key]


def _squeeze(algorithm: str, compressor: str, exchange: str = "sharded", *,
             server: str = "") -> ContenderSpec:
    passes = compressor + (f", server={server}" if server else "")
    return ContenderSpec(f"{algorithm}({passes}) {exchange}", "squeeze", algorithm=algorithm,
                         compressor=compressor, exchange=exchange, server=server)


def _gossip(algorithm: str, compressor: str = "", topology: str = "ring") -> ContenderSpec:
    label = {"DPSGD": "D-PSGD", "ChocoSGD": "CHOCO-SGD"}.get(algorithm, algorithm)
    name = f"{label}({compressor}) {topology}" if compressor else f"{label} {topology}"
    return ContenderSpec(name, "gossip", algorithm=algorithm, compressor=compressor,
                         exchange=topology)


# The consensus step of the decentralized digits benchmark (it does not change a step's bytes).
_CONSENSUS_STEP = 0.2

# PowerSGD with DDP's default 25 MB buckets aborted on 4 ranks with Gloo ("received data size
# does not match the expected size") once DDP rebuilt its buckets; one large bucket runs.
_POWERSGD_BUCKET_MB = 1000.0

CATALOG: dict[str, ContenderSpec] = {spec.name: spec for spec in [
    ContenderSpec("compute only", "local"),
    ContenderSpec("Horovod fp32", "horovod"),
    ContenderSpec("Horovod fp16", "horovod", compression="fp16"),
    ContenderSpec("DDP allreduce", "ddp"),
    *[ContenderSpec(f"DDP PowerSGD r{rank}", "ddp", powersgd_rank=rank,
                    ddp_bucket_cap_mb=_POWERSGD_BUCKET_MB) for rank in (1, 2, 4)],
    ContenderSpec("DDP PowerSGD r4 (25 MB buckets)", "ddp", powersgd_rank=4),
    _squeeze("DoubleSqueeze", "ScaledSign"),
    _squeeze("DoubleSqueeze", "ScaledSign", "allgather"),
    _squeeze("ErrorFeedback", "ScaledSign", server="ScaledSign"),
    _squeeze("ErrorFeedback", "ScaledSign", server="Identity"),
    _squeeze("NoFeedback", "ScaledSign", server="ScaledSign"),
    _squeeze("NoFeedback", "ScaledSign", server="Identity"),
    _squeeze("DoubleSqueeze", "TopK(0.01)"),
    _squeeze("DoubleSqueeze", "TopK(0.01)", "allgather"),
    _squeeze("DoubleSqueeze", "QSGD(4)"),
    _squeeze("DoubleSqueeze", "Ternary"),
    _gossip("DPSGD"),
    _gossip("DeepSqueeze", "ScaledSign"),
    _gossip("ChocoSGD", "ScaledSign"),
    _gossip("DeepSqueeze", "ScaledSign", "exponential"),
]}

#: The published run's contenders (the catalog's others can be named on the command line).
FULL = ["compute only", "Horovod fp32", "Horovod fp16", "DDP allreduce", "DDP PowerSGD r1",
        "DDP PowerSGD r2", "DDP PowerSGD r4", "DoubleSqueeze(ScaledSign) sharded",
        "DoubleSqueeze(ScaledSign) allgather",
        "ErrorFeedback(ScaledSign, server=ScaledSign) sharded",
        "NoFeedback(ScaledSign, server=ScaledSign) sharded", "DoubleSqueeze(TopK(0.01)) sharded",
        "DoubleSqueeze(QSGD(4)) sharded"]
#: Contenders run in a job of their own because they may abort the whole process group.
PROBES = ["DDP PowerSGD r4 (25 MB buckets)"]
#: Decentralized training beside this project's DoubleSqueeze (``--suite decentralized``).
DECENTRALIZED = ["compute only", "Horovod fp32", "DoubleSqueeze(ScaledSign) sharded",
                 "D-PSGD ring", "DeepSqueeze(ScaledSign) ring", "CHOCO-SGD(ScaledSign) ring"]
QUICK = ["compute only", "Horovod fp32", "Horovod fp16", "DDP allreduce", "DDP PowerSGD r4",
         "DoubleSqueeze(ScaledSign) sharded", "DoubleSqueeze(TopK(0.01)) sharded"]


def _ring_bytes(numel: int, element_size: int, num_ranks: int) -> int:
    """Bytes one rank sends (and receives) in a ring allreduce."""
    return 2 * (num_ranks - 1) * element_size * numel // num_ranks


def _powersgd_numel(model: torch.nn.Module, rank: int, min_compression_rate: float = 2.0) -> int:
    """Entries PowerSGD allreduces per step: P and Q of compressed matrices, the rest as is."""
    total = 0
    for param in model.parameters():
        if param.dim() <= 1:
            total += param.numel()
            continue
        rows, cols = param.shape[0], param.numel() // param.shape[0]
        r = min(rows, cols, rank)
        total += (rows + cols) * r if (rows + cols) * r * min_compression_rate < rows * cols \
            else rows * cols
    return total


class Contender:
    """One contender wrapped around its own copy of the model; ``step`` trains one step."""

    def __init__(self, spec: ContenderSpec, model: torch.nn.Module, lr: float, momentum: float,
                 num_ranks: int, powersgd_start_iter: int):
        self.spec = spec
        self.model = model
        self.num_ranks = num_ranks
        self.steps_done = 0
        self._powersgd_start = powersgd_start_iter
        self.numel = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        self.forward: torch.nn.Module = model
        if spec.family in ("horovod", "squeeze"):
            optimizer = self._horovod_optimizer(optimizer)
        elif spec.family == "gossip":
            optimizer = self._decentralized_optimizer(optimizer)
        elif spec.family == "ddp":
            self.forward = self._ddp()
        self.optimizer = optimizer

    def _horovod_optimizer(self, optimizer):
        import horovod.torch as hvd

        import horovod_squeeze.torch as hst

        spec = self.spec
        if spec.family == "horovod":
            compression = hvd.Compression.fp16 if spec.compression == "fp16" else hvd.Compression.none
            options = {}
        else:
            compression = spec.algorithm_spec()
            options = {"exchange": spec.exchange}
        # Distinct tensor names per contender: contenders share one Horovod job.
        named = [(f"{spec.name}/{name}", p) for name, p in self.model.named_parameters()]
        wrapped = hst.DistributedOptimizer(optimizer, named_parameters=named,
                                           compression=compression, **options)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        return wrapped

    def _decentralized_optimizer(self, optimizer):
        import horovod.torch as hvd

        import horovod_squeeze.torch as hst

        named = [(f"{self.spec.name}/{name}", p) for name, p in self.model.named_parameters()]
        wrapped = hst.DecentralizedOptimizer(optimizer, named_parameters=named,
                                             algorithm=self.spec.algorithm_spec(),
                                             topology=self.spec.exchange)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        return wrapped

    def _ddp(self) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(self.model, bucket_cap_mb=self.spec.ddp_bucket_cap_mb)
        if self.spec.powersgd_rank is not None:
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=self.spec.powersgd_rank,
                start_powerSGD_iter=self._powersgd_start, use_error_feedback=True)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return ddp

    def step(self, batch: tuple[torch.Tensor, ...]) -> dict:
        """One training step; returns the payload bytes it predicts and the project's telemetry."""
        self.optimizer.zero_grad()
        loss = self.forward(*batch)
        loss.backward()
        self.optimizer.step()
        record = {"loss": float(loss.detach()), **self._payload()}
        self.steps_done += 1
        return record

    def _payload(self) -> dict:
        spec, n = self.spec, self.num_ranks
        if spec.family == "local":
            return {"payload_sent": 0, "payload_received": 0}
        if spec.family == "squeeze":
            stats = self.optimizer.compression_stats
            return {"payload_sent": stats.bytes.sent, "payload_received": stats.bytes.received,
                    "telemetry": {"compress_s": stats.compress_seconds,
                                  "communicate_s": stats.communicate_seconds,
                                  "decode_s": stats.decode_seconds,
                                  "fp32_allreduce_bytes": stats.fp32_allreduce_bytes}}
        if spec.family == "gossip":
            # One message to each neighbour, and one from each.
            sent = self.optimizer.bytes_sent_per_step
            return {"payload_sent": sent, "payload_received": sent,
                    "gossip": {"neighbors": len(self.optimizer.neighbors),
                               "message_nbytes": self.optimizer.message_nbytes}}
        if spec.family == "horovod":
            ring = _ring_bytes(self.numel, 2 if spec.compression == "fp16" else 4, n)
        elif spec.powersgd_rank is not None and self.steps_done >= self._powersgd_start:
            ring = _ring_bytes(_powersgd_numel(self.model, spec.powersgd_rank), 4, n)
        else:
            ring = _ring_bytes(self.numel, 4, n)
        return {"payload_sent": ring, "payload_received": ring}


def build(name: str, model: torch.nn.Module, *, lr: float, momentum: float, num_ranks: int,
          powersgd_start_iter: int) -> Contender:
    if name not in CATALOG:
        raise ValueError(f"unknown contender {name!r}; choose from {list(CATALOG)}")
    return Contender(CATALOG[name], model, lr, momentum, num_ranks, powersgd_start_iter)


def uses_horovod(names: list[str]) -> bool:
    """Whether any of these contenders needs Horovod (whose background thread is never silent)."""
    return any(CATALOG[name].family in ("horovod", "squeeze", "gossip") for name in names)


def needs_mpi(names: list[str]) -> list[str]:
    """The contenders that exchange over MPI neighbour collectives (Horovod's MPI controller)."""
    return [name for name in names if CATALOG[name].family == "gossip"]


def init_process_groups(master_addr: str, master_port: int, rank: int, size: int,
                        timeout_s: float, horovod: bool) -> None:
    """``torch.distributed`` (gloo) on every job; Horovod (from its environment) when asked."""
    import torch.distributed as dist

    if horovod:
        import horovod.torch as hvd

        hvd.init()
    dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
