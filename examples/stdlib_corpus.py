"""A byte-level text corpus built from the Python standard library's own source files.

    .venv/bin/python examples/stdlib_corpus.py --max-mb 4      # sizes, split and baselines

No download: the text is the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (third-party
``site-packages`` excluded), read as raw bytes in sorted relative-path order until the size cap, so
the same Python installation always gives the same bytes. Every ``holdout_every``-th file of that
list is held out for validation; whole files, so no validation text also sits in the training set.
The vocabulary is the 256 byte values. The corpus depends on the Python version: record
:data:`PYTHON_VERSION` with any result measured on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import platform
import sysconfig

import numpy as np

VOCAB_SIZE = 256
PYTHON_VERSION = platform.python_version()
DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_HOLDOUT_EVERY = 10
# Installed third-party packages live under the stdlib directory but are not part of it, and differ
# from one machine to the next.
_EXCLUDED_DIRECTORIES = {"site-packages", "dist-packages"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training and validation bytes, and where they came from."""

    train: np.ndarray       # uint8
    validation: np.ndarray  # uint8
    train_files: tuple[str, ...]       # paths relative to the stdlib directory
    validation_files: tuple[str, ...]
    python_version: str = PYTHON_VERSION

    def describe(self) -> dict:
        """What a metrics file records about the corpus."""
        return {"python_version": self.python_version, "train_bytes": int(self.train.size),
                "validation_bytes": int(self.validation.size),
                "train_files": len(self.train_files),
                "validation_files": len(self.validation_files)}


def stdlib_directory() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard library's ``*.py`` files, sorted by path relative to ``root``."""
    root = root or stdlib_directory()
    files = (path for path in root.rglob("*.py")
             if path.is_file() and not _EXCLUDED_DIRECTORIES & set(path.relative_to(root).parts))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def build_corpus(max_bytes: int = DEFAULT_MAX_BYTES, holdout_every: int = DEFAULT_HOLDOUT_EVERY,
                 root: pathlib.Path | None = None) -> Corpus:
    """Read files in sorted order until ``max_bytes`` in all (the last one cut to fit); file ``i``
    of those goes to validation when ``i % holdout_every == holdout_every - 1``."""
    if max_bytes <= 0 or holdout_every < 2:
        raise ValueError("max_bytes must be > 0 and holdout_every >= 2")
    root = root or stdlib_directory()
    train, validation, train_files, validation_files = [], [], [], []
    total = 0
    for index, path in enumerate(stdlib_sources(root)):
        if total >= max_bytes:
            break
        data = path.read_bytes()[:max_bytes - total]
        if not data:
            continue
        total += len(data)
        held_out = index % holdout_every == holdout_every - 1
        (validation if held_out else train).append(data)
        (validation_files if held_out else train_files).append(path.relative_to(root).as_posix())
    if not validation:
        raise ValueError(f"max_bytes={max_bytes} holds fewer than {holdout_every} files: "
                         "no validation file")
    as_array = lambda chunks: np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return Corpus(as_array(train), as_array(validation), tuple(train_files),
                  tuple(validation_files))


def unigram_cross_entropy(train: np.ndarray, validation: np.ndarray) -> float:
    """Nats per byte on ``validation`` of the byte frequencies of ``train`` (add-one smoothed): the
    loss of a model that has learnt nothing but which bytes are common."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[validation].mean())


def bigram_cross_entropy(train: np.ndarray, validation: np.ndarray) -> float:
    """Nats per byte on ``validation`` (from its second byte) of the next-byte frequencies of
    ``train`` given the previous byte (add-one smoothed)."""
    counts = np.ones((VOCAB_SIZE, VOCAB_SIZE))
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    log_probs = np.log(counts / counts.sum(axis=1, keepdims=True))
    return float(-log_probs[validation[:-1], validation[1:]].mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 1e6)
    parser.add_argument("--holdout-every", type=int, default=DEFAULT_HOLDOUT_EVERY)
    args = parser.parse_args()
    corpus = build_corpus(int(args.max_mb * 1e6), args.holdout_every)
    print(f"Python {corpus.python_version} standard library at {stdlib_directory()}")
    print(f"train: {corpus.train.size} bytes from {len(corpus.train_files)} files "
          f"({corpus.train_files[0]} ... {corpus.train_files[-1]})")
    print(f"validation: {corpus.validation.size} bytes from {len(corpus.validation_files)} files")
    print(f"unigram cross-entropy on validation: "
          f"{unigram_cross_entropy(corpus.train, corpus.validation):.3f} nats/byte")
    print(f"bigram cross-entropy on validation: "
          f"{bigram_cross_entropy(corpus.train, corpus.validation):.3f} nats/byte")


if __name__ == "__main__":
    main()
