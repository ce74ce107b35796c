"""``iddpm bench group_norm`` (alias ``groupnorm``): one row per impl × layout × pass, the fused op
and the reference composition side by side (plus torch's mixed-dtype group_norm in bf16), and a
clear error for a bad --layouts value."""

import json

import pytest

from helpers.training import argv
from iddpm_ext import bench

pytestmark = pytest.mark.kernels


def test_rows_for_every_impl_layout_and_pass(tmp_path, capsys):
    out = tmp_path / "g.json"
    words = argv(
        "groupnorm --device cpu --threads 1 --warmup 0 --iters 1 --cases 2x32x4x4 --dtype float32,bfloat16 "
        "--json {json}",
        json=str(out),
    )
    assert bench.main(words) == 0
    recs = json.loads(out.read_text())["records"]
    rows = {(r["op"], r["impl"], r["dtype"]) for r in recs}
    for pss in ("fwd", "fwd+bwd"):
        for layout in ("nchw", "channels_last"):
            for dtype in ("float32", "bfloat16"):
                for impl in ("eager (reference)", "iddpm (fused)"):
                    assert (f"group_norm_act {pss}", f"{impl} {layout}", dtype) in rows
            assert (f"group_norm_act {pss}", f"torch mixed {layout}", "bfloat16") in rows
            assert (f"group_norm_act {pss}", f"torch mixed {layout}", "float32") not in rows
    assert all(r["ms"] > 0 and r["shape"] == [2, 32, 4, 4] for r in recs)
    assert "iddpm bench group_norm" in capsys.readouterr().out


def test_bad_layout_is_one_line_error(capsys):
    assert bench.main(["group_norm", "--device", "cpu", "--layouts", "nhwc"]) == 2
    assert "--layouts: expected names from ['nchw', 'channels_last'], got 'nhwc'" in capsys.readouterr().err
