"""``mvitv2 export video`` of a user's checkpoint at a size the user asks for."""

from __future__ import annotations

import pytest

from mvitv2.cli import main
from test_predictor import make_video_checkpoint


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_export_at_a_size_the_model_cannot_take_is_one_line_naming_the_sizes(tmp_path, capsys, fmt):
    """``mvitv2 export video --input-size 30 30`` (not a multiple of the patch stride 4): the
    model's own message as one ``error:`` line, exit status 2, no torch.export traceback and no
    file written."""
    ckpt = make_video_checkpoint(tmp_path / "v.pt")
    out = tmp_path / "v.out"
    argv = ["export", "video", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out)]
    rc = main([*argv, "--input-size", "30", "30"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.strip() == (
        "mvitv2 export video: error: input height and width must be multiples of 4 and at "
        "least 32, got (30, 30)"
    )
    assert not out.exists()
