"""Framework-neutral telemetry: per-bucket bytes and residual norms, against direct computations."""
import numpy as np

import horovod_squeeze as hs
from horovod_squeeze.buckets import make_buckets
from horovod_squeeze.exchange import PassBytes, fp32_allreduce_bytes, pass_bytes
from horovod_squeeze.telemetry import bucket_bytes, residual_norms


def test_residual_norms_place_the_server_shard_at_its_offset():
    buckets = make_buckets([("a", (5, 3)), ("b", (9,))], "sharded", min_compress_numel=0)
    (bucket,) = buckets  # reversed registration order: b at offset 0, a at offset 9
    rng = np.random.default_rng(3)
    worker = rng.standard_normal(bucket.worker_numel(2)).astype(np.float32)
    shard = rng.standard_normal(bucket.server_numel(2)).astype(np.float32)  # rank 1 owns 16..31
    norms = residual_norms(buckets, {0: worker}, {0: shard}, rank=1, num_ranks=2)
    placed = np.concatenate([np.zeros(16, np.float32), shard])
    assert norms["b"] == (float(np.linalg.norm(worker[0:9])), float(np.linalg.norm(placed[0:9])))
    assert norms["a"] == (float(np.linalg.norm(worker[9:24])),
                          float(np.linalg.norm(placed[9:24])))
    assert norms["b"][1] == 0.0 and norms["a"][1] > 0


def test_bucket_bytes_plain_or_compressed():
    (bucket,) = make_buckets([("w", (1000,))], "sharded", min_compress_numel=0)
    ring = fp32_allreduce_bytes(1000, 4)
    assert bucket_bytes(hs.ScaledSign(), bucket, 4, compressed=False) == PassBytes(ring, ring, 0, 0)
    assert (bucket_bytes(hs.ScaledSign(), bucket, 4, compressed=True)
            == pass_bytes(hs.ScaledSign(), "sharded", 1000, 4))
    (small,) = make_buckets([("bias", (10,))], "sharded")  # below min_compress_numel: plain
    ring = fp32_allreduce_bytes(10, 4)
    assert bucket_bytes(hs.ScaledSign(), small, 4, compressed=True) == PassBytes(ring, ring, 0, 0)
