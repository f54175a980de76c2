"""Found by a user's audit of the image commands: counts on the command line that cannot be used
(``--batch-size 0``, ``--workers -1``, ``--threads -1``) are argparse's one error line and exit
status 2 for every task's eval, predict and export, not torch's traceback once the model and
data are loaded."""

from __future__ import annotations

import pytest

from mvitv2.cli import parse

BAD_COUNTS = [
    (["eval", "image", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["eval", "image", "--checkpoint", "x.pt"], "--batch-size", "-3", 1),
    (["eval", "image", "--checkpoint", "x.pt"], "--workers", "-1", 0),
    (["eval", "image", "--checkpoint", "x.pt"], "--threads", "-1", 0),
    (["predict", "image", "a.jpg", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["predict", "image", "a.jpg", "--checkpoint", "x.pt"], "--threads", "-2", 0),
    (["export", "image", "--checkpoint", "x.pt"], "--threads", "-1", 0),
    (["eval", "video", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["predict", "video", "a.mp4", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["eval", "detect", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["eval", "detect", "--checkpoint", "x.pt"], "--workers", "-1", 0),
    (["predict", "detect", "a.png", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["predict", "detect", "a.png", "--checkpoint", "x.pt"], "--threads", "-1", 0),
]


@pytest.mark.parametrize(("argv", "option", "value", "least"), BAD_COUNTS)
def test_an_unusable_count_option_is_one_error_line_and_exit_status_2(
    capsys, argv, option, value, least
):
    with pytest.raises(SystemExit) as e:
        parse([*argv, option, value])
    err = capsys.readouterr().err.splitlines()
    prog = " ".join(["mvitv2", *argv[:2]])
    assert e.value.code == 2
    assert err[-1] == f"{prog}: error: argument {option}: must be at least {least}, got {value}"


def test_usable_counts_and_a_non_number_are_read_as_before(capsys):
    args = parse(["eval", "image", "--checkpoint", "x.pt", "--batch-size", "1", "--workers", "0"])
    assert (args.args.batch_size, args.args.workers, args.args.threads) == (1, 0, 0)
    assert parse(["predict", "image", "a.jpg", "--checkpoint", "x.pt"]).args.batch_size == 16
    with pytest.raises(SystemExit) as e:
        parse(["eval", "image", "--checkpoint", "x.pt", "--batch-size", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mvitv2 eval image: error: argument --batch-size: invalid int value: 'many'"
    )
