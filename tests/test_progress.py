"""Progress output: tqdm's bar on a terminal; clean lines in a log (what horovodrun captures)."""
import io

from horovod_squeeze.progress import keras_verbose, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_one_clean_line_per_item():
    log = io.StringIO()
    bar = progress(range(3), desc="epochs", stream=log)
    for epoch in bar:
        bar.set_postfix(loss=f"{1.0 / (epoch + 1):.4f}")
    lines = log.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "epochs 1/3 loss=1.0000", "epochs 2/3 loss=0.5000", "epochs 3/3 loss=0.3333"]
    assert "\r" not in log.getvalue()


def test_min_interval_keeps_the_last_line_and_ranks_but_0_print_nothing():
    log = io.StringIO()
    bar = progress(iter(range(100)), desc="steps", stream=log, min_interval=3600)
    assert list(bar) == list(range(100))
    assert log.getvalue().startswith("steps 1 (")  # no total: the first line, then hourly
    quiet = io.StringIO()
    bar = progress(range(5), desc="steps", enabled=False, stream=quiet)
    bar.write("validation")
    assert list(bar) == list(range(5)) and quiet.getvalue() == ""
    log = io.StringIO()
    assert list(progress(range(50), desc="steps", stream=log, min_interval=3600)) == list(range(50))
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()] == [
        "steps 1/50", "steps 50/50"]


def test_a_terminal_gets_tqdm_and_keras_its_verbosity():
    from tqdm import tqdm

    assert isinstance(progress(range(2), desc="epochs", stream=Terminal()), tqdm)
    assert keras_verbose(True, Terminal()) == 1
    assert keras_verbose(True, io.StringIO()) == 2
    assert keras_verbose(False, Terminal()) == 0
