"""The language-model example: its standard-library corpus, and a short 2-rank run end to end.

    .venv/bin/python -m pytest tests/test_lm_example.py
"""
import json
import math
import pathlib
import sys

import numpy as np
import pytest

from horovod_squeeze.testing import run_on_ranks

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the example imports its siblings; ranks inherit sys.path

import stdlib_corpus  # noqa: E402

SMALL_CORPUS = 300_000


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus.build_corpus(SMALL_CORPUS)


def test_corpus_is_deterministic_and_capped(corpus):
    first = corpus
    second = stdlib_corpus.build_corpus(SMALL_CORPUS)
    assert first.train.dtype == np.uint8 and first.validation.dtype == np.uint8
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.validation, second.validation)
    assert first.train_files == second.train_files
    assert first.train.size + first.validation.size == SMALL_CORPUS
    assert first.describe()["python_version"] == stdlib_corpus.PYTHON_VERSION


def test_every_tenth_file_is_held_out_whole(corpus):
    root = stdlib_corpus.stdlib_directory()
    read = len(corpus.train_files) + len(corpus.validation_files)
    names = [path.relative_to(root).as_posix() for path in stdlib_corpus.stdlib_sources()][:read]
    assert corpus.validation_files == tuple(names[9::10])
    assert corpus.train_files == tuple(n for i, n in enumerate(names) if i % 10 != 9)
    assert not any("site-packages" in name for name in names)
    # Validation text is those files' bytes, in order, nothing from the training files.
    held_out = b"".join((root / name).read_bytes() for name in corpus.validation_files)
    assert corpus.validation.tobytes() == held_out[:corpus.validation.size]


def test_byte_baselines_are_sensible(corpus):
    unigram = stdlib_corpus.unigram_cross_entropy(corpus.train, corpus.validation)
    bigram = stdlib_corpus.bigram_cross_entropy(corpus.train, corpus.validation)
    assert 0 < bigram < unigram < math.log(stdlib_corpus.VOCAB_SIZE)


def _train_briefly(argv):
    """Rank body: the example's main() with a tiny model; rank 0 returns its metrics file."""
    import pytorch_transformer_lm

    metrics = pytorch_transformer_lm.main(argv)
    return None if metrics is None else json.loads(pathlib.Path(argv[-1]).read_text())


TINY = ["--steps", "8", "--batch-size", "4", "--layers", "1", "--d-model", "32", "--heads", "2",
        "--context", "32", "--corpus-mb", "0.3", "--eval-windows", "16", "--eval-every", "4",
        "--log-every", "4", "--lr-warmup-steps", "2"]


@pytest.mark.parametrize("flags", [
    ["--algorithm", "none"],
    # Compressed after 3 exact steps, with the averaged update clipped.
    ["--algorithm", "doublesqueeze", "--compressor", "scaledsign", "--warmup-steps", "3",
     "--clip-norm", "1.0"],
], ids=["fp32", "doublesqueeze"])
def test_two_rank_run_writes_finite_metrics(tmp_path, flags):
    out = tmp_path / "metrics.json"
    results = run_on_ranks(_train_briefly, 2, "gloo", args=(TINY + flags + ["--json", str(out)],),
                           timeout=90)
    metrics = results[0]
    assert results[1] is None
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])
    assert metrics["val_loss"] < math.log(256) + 1  # not diverged
    assert [step for step, _ in metrics["val_history"]] == [4, 8]
    assert metrics["steps"] == 8 and metrics["ranks"] == 2
    if flags[1] == "none":
        assert metrics["compression"] == "fp32 allreduce"
        assert metrics["bytes_sent_per_step"] == metrics["fp32_allreduce_bytes_per_step"]
    else:
        assert metrics["compression"] == "DoubleSqueeze(ScaledSign())"
        assert metrics["bytes_sent_per_step"] < metrics["fp32_allreduce_bytes_per_step"] / 4
