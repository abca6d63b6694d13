"""The three codec implementations behind one small interface, for tests that cover them all."""
import dataclasses
from typing import Any, Callable

import numpy as np

from horovod_squeeze import reference


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    compress: Callable
    decompress: Callable
    tensor: Callable[[np.ndarray], Any]  # numpy array -> native tensor
    numpy: Callable[[Any], np.ndarray]  # native tensor -> numpy array


def numpy_backend():
    return Backend("numpy", reference.compress, reference.decompress, np.asarray, np.asarray)


def torch_backend():
    import torch

    from horovod_squeeze.torch import codecs

    return Backend("torch", codecs.compress, codecs.decompress, torch.from_numpy,
                   lambda t: t.numpy())


def tensorflow_backend():
    import tensorflow as tf

    from horovod_squeeze.tensorflow import codecs

    return Backend("tensorflow", codecs.compress, codecs.decompress, tf.constant,
                   lambda t: t.numpy())


NATIVE = {"torch": torch_backend, "tensorflow": tensorflow_backend}
