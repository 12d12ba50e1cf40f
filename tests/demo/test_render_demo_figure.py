"""scripts/render_demo_figure.py renders the README figure from the bundled model through the demo's own code path."""
from __future__ import annotations

from PIL import Image

from scripts import render_demo_figure


def test_figure_has_one_panel_per_example_and_captions_name_the_answers(tmp_path, capsys):
    out = tmp_path / "figure.png"
    render_demo_figure.main(["--out", str(out)])
    sheet = Image.open(out)
    n = len(render_demo_figure.figure_examples(render_demo_figure.ROOT / "asset" / "examples")) + 1  # + free form
    assert sheet.width == n * (render_demo_figure.PANEL + 10) + 10
    printed = [line for line in capsys.readouterr().out.splitlines() if "| A: " in line]
    assert len(printed) == n
    # the answers are shown as the page shows them: no raw region tags
    assert not any("<ref>" in line or "<box>" in line for line in printed)
