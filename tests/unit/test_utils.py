"""Running a stage's main (`magtkd.utils.run`; docs/METHOD.md §6): user errors, Ctrl-C and bugs."""

from __future__ import annotations

import pytest

from magtkd import utils
from magtkd.utils import DataError


def test_ctrl_c_in_a_stage_is_one_line_and_exit_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        utils.run(main, [])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: unit/test_utils.py stopped")
    assert "Run it again to restart cleanly" in err


def test_unexpected_failures_keep_their_traceback():
    def broken(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        utils.run(broken, [])

    def user(argv):
        raise DataError("x.csv: row 3: bad")

    with pytest.raises(SystemExit) as exit_:
        utils.run(user, [])
    assert exit_.value.code == 2
    with pytest.raises(DataError):
        utils.run(user, ["--debug"])


# --------------------------------------------------------------------------- the machine's limits, torchrun


def training_main(error: BaseException | None = None):
    """A stage's main: the text stage's parser (its memory knobs), then a failing allocation (a real one of
    torch's CPU allocator when ``error`` is None)."""
    from IEMOCAP.config import IEMOCAP
    from magtkd import cli

    def main(argv):
        cli.training_parser(IEMOCAP, ".", None, epochs=1, batch_size=4, learning_rate=1e-5).parse_args(argv)
        if error is not None:
            raise error
        import torch

        torch.empty(1 << 60, dtype=torch.uint8)

    return main


class OutOfMemoryError(RuntimeError):
    """Named as torch's CUDA one (torch.OutOfMemoryError), which utils tells apart by its name."""


@pytest.mark.parametrize("error, where", [(None, "CPU"), (MemoryError(), "CPU"),
                                          (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "CUDA")])
def test_out_of_memory_is_one_line_naming_the_script_batch_and_knobs(error, where, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        utils.run(training_main(error), ["--save_dir", str(tmp_path), "--batch_size", "8", "--grad_accum", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: unit/test_utils.py ran out of {where} memory at "
                                                   "--batch_size 8 (per process) (")
    assert ("try a smaller --batch_size (e.g. 4 with --grad_accum 6, the same update), --grad_checkpointing True "
            "(recomputes activations in backward), --amp True (bf16 on CUDA). The previous complete outputs are "
            "kept") in err
    with pytest.raises(RuntimeError if error is None else type(error)):
        utils.run(training_main(error), ["--save_dir", str(tmp_path), "--debug"])


def test_a_full_disk_is_one_line_and_other_os_errors_keep_their_traceback(capsys):
    import errno

    with pytest.raises(SystemExit) as exit_:
        utils.run(training_main(OSError(errno.ENOSPC, "No space left on device", "/x/y.bin")), [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: unit/test_utils.py: No space left on device (/x/y.bin): free ")
    with pytest.raises(FileNotFoundError):
        utils.run(training_main(FileNotFoundError(errno.ENOENT, "a bug", "z")), [])


def test_messages_print_as_one_plain_line(capsys):
    assert utils.plain_text("\x1b[1mWeights only\x1b[0m load\n\tfailed\x1b]0;title\x07 ") == "Weights only load failed"

    def main(argv):
        raise DataError("x.csv:\n\x1b[31mrow 3\x1b[0m: bad")

    with pytest.raises(SystemExit):
        utils.run(main, [])
    assert capsys.readouterr().err == "error: x.csv: row 3: bad\n"


def test_under_torchrun_a_refusal_is_printed_once(capsys, monkeypatch, tmp_path):
    """Rank 0 prints it; another rank prints only a line rank 0 has not printed (after a short wait)."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(utils, "RANK0_WAIT_S", 0.2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")

    def refusal(text):
        def main(argv):
            raise DataError(text)
        return main

    printed = {}
    for rank, text in (("0", "same for all"), ("1", "same for all"), ("1", "only rank 1's shard")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            utils.run(refusal(text), [])
        assert exit_.value.code == 2
        printed[(rank, text)] = capsys.readouterr().err
    assert printed == {("0", "same for all"): "error: same for all\n", ("1", "same for all"): "",
                       ("1", "only rank 1's shard"): "[rank 1] error: only rank 1's shard\n"}
