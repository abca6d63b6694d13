"""PyTorch implementation of the codecs' :class:`~horovod_squeeze._codecs.ArrayOps`, on one device.

Every tensor an operation creates (constants, indices, lookup tables) is made on that device, so a
codec for ``cuda:0`` never moves data through the host.
"""
from __future__ import annotations

import torch

from horovod_squeeze._codecs import ArrayOps

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
_INT_BYTES = {"int32": 4, "uint32": 4, "uint16": 2, "uint8": 1}
_FLOAT_WIRE = {"float32": torch.float32, "float16": torch.float16}
_CHUNK = 1 << 16


def _power64(x, power):
    x = x.to(torch.float64)
    return x if power == 0 else x.abs() if power == 1 else x.square()


class TorchOps(ArrayOps):
    def __init__(self, device=None):
        self.device = torch.device("cpu" if device is None else device)
        self._bit_shifts = torch.arange(8, dtype=torch.uint8, device=self.device)
        # Row b: the signs of byte b's bits, least significant first (+1 set, -1 clear).
        self._sign_table = ((torch.arange(256, device=self.device).reshape(-1, 1)
                             >> torch.arange(8, device=self.device)) & 1).to(torch.float32) * 2 - 1

    def _zeros(self, numel, dtype):
        return torch.zeros(numel, dtype=dtype, device=self.device)

    def flat_float32(self, x, name):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: compressors take floating-point tensors, got dtype {x.dtype}")
        return x.detach().reshape(-1).to(torch.float32)

    def cast(self, x, kind):
        return x.to(_DTYPES[kind])

    def constant(self, values, kind):
        return torch.tensor(values, dtype=_DTYPES[kind], device=self.device)

    def arange(self, n):
        return torch.arange(n, dtype=torch.int64, device=self.device)

    def abs(self, x):
        return x.abs()

    def floor(self, x):
        return x.floor()

    def sqrt(self, x):
        return x.sqrt()

    def minimum(self, x, y):
        return torch.minimum(x, y)

    def clip(self, x, bound):
        return x.clamp(-bound, bound)

    def where(self, condition, x, y):
        return torch.where(condition, x, y)

    def sum64(self, x, axis=None):
        return self._reduce64(x, 0, axis)

    def power_sum64(self, x, p, axis=None):
        return self._reduce64(x, p, axis)

    def _reduce64(self, x, power, axis):
        # Works through cache-sized chunks: a float64 copy of a large tensor costs more in page
        # faults than the whole reduction.
        rows = x.reshape(1, -1) if axis is None else x
        if rows.shape[1] >= _CHUNK:
            out = torch.stack([sum(_power64(c, power).sum() for c in row.split(_CHUNK))
                               for row in rows])
        else:
            group = max(1, _CHUNK // max(rows.shape[1], 1))
            out = torch.cat([_power64(g, power).sum(dim=1) for g in rows.split(group)])
        return out.reshape(()) if axis is None else out

    def signed(self, positive, magnitude):
        # 0/1 -> -1/+1 -> times the magnitude, in place: each new large tensor costs page faults.
        out = positive.to(torch.float32)
        if magnitude.numel() == 1:
            return out.mul_(2 * magnitude).sub_(magnitude)
        return out.mul_(2).sub_(1).mul_(magnitude)

    def signed_bits(self, data, count, magnitude):
        # Look each byte up in a table of its 8 signs (one magnitude: already scaled by it); a
        # magnitude per entry (per-tensor scales) multiplies the +-1 afterwards, exactly.
        one = magnitude.numel() == 1
        table = self._sign_table * magnitude.to(torch.float32) if one else self._sign_table
        signs = table.index_select(0, data.to(torch.int32)).reshape(-1)[:count]
        return signs if one else signs.mul_(magnitude)

    def max(self, x, axis=None):
        return x.amax() if axis is None else x.amax(dim=axis)

    def count(self, mask):
        return mask.sum()

    def cumsum(self, mask):
        return mask.cumsum(0)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def pad(self, x, numel):
        return torch.nn.functional.pad(x, (0, numel - x.numel()))

    def repeat(self, x, repeats):
        return x.repeat_interleave(repeats)

    def slice(self, x, start, stop, step=1):
        return x[start:stop:step]

    def kth_largest(self, x, k):
        return torch.topk(x, k, sorted=False).values.min()

    def k_smallest_indices(self, keys, k):
        return torch.topk(keys, k, largest=False, sorted=False).indices

    def sort(self, x):
        return torch.sort(x).values

    def nonzero(self, mask):
        return torch.nonzero(mask).reshape(-1)

    def gather(self, x, indices):
        return x[indices]

    def scatter(self, numel, indices, values):
        return self._zeros(numel, torch.float32).index_put_((indices,), values)

    def concat(self, parts):
        return torch.cat(parts) if parts else self._zeros(0, torch.uint8)

    def float32_bits(self, x):
        return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF

    def float32_from_bits(self, bits):
        return bits.to(torch.int32).view(torch.float32)

    def to_bytes(self, x, kind):
        if x.numel() == 0:  # views of empty tensors have stride 0 and cannot be reinterpreted
            return self._zeros(0, torch.uint8)
        if kind in _FLOAT_WIRE:
            return x.to(_FLOAT_WIRE[kind]).contiguous().view(torch.uint8)
        # Little-endian: the low bytes of each int64 are the narrower integer.
        return x.to(torch.int64).reshape(-1, 1).view(torch.uint8)[:, :_INT_BYTES[kind]].reshape(-1)

    def from_bytes(self, data, kind):
        if data.numel() == 0:
            return self._zeros(0, torch.float32 if kind in _FLOAT_WIRE else torch.int64)
        if kind in _FLOAT_WIRE:
            dtype = _FLOAT_WIRE[kind]
            if data.storage_offset() % dtype.itemsize:  # sections need not start aligned
                data = data.clone()
            return data.contiguous().view(dtype).to(torch.float32)
        width = _INT_BYTES[kind]
        wide = torch.zeros((data.numel() // width, 8), dtype=torch.uint8, device=self.device)
        wide[:, :width] = data.reshape(-1, width)
        return wide.view(torch.int64).reshape(-1)

    def pack_bits(self, codes, width):
        if width == 1:
            bits = codes.view(torch.uint8) if codes.dtype == torch.bool else codes.to(torch.uint8)
        else:
            shifts = self.arange(width)
            bits = ((codes.reshape(-1, 1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        if bits.numel() % 8:
            bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8))
        rows = bits.reshape(-1, 8)
        packed = rows[:, 0].clone()
        for j in range(1, 8):
            packed |= rows[:, j] << j
        return packed

    def unpack_bits(self, data, width, count):
        bits = data.reshape(-1, 1) >> self._bit_shifts
        bits &= 1
        bits = bits.reshape(-1)[:count * width]
        if width == 1:
            return bits.view(torch.bool)
        shifts = self.arange(width)
        return (bits.reshape(count, width).to(torch.int64) << shifts).sum(dim=1)

    def payload_size(self, payload):
        if not isinstance(payload, torch.Tensor):
            return type(payload).__name__, ()
        return str(payload.dtype).replace("torch.", ""), tuple(payload.shape)

    def check(self, condition, error):
        if not bool(condition):
            raise error()

    def cond(self, predicate, if_true, if_false):
        return if_true() if bool(predicate) else if_false()
