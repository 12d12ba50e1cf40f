"""Report rendering: boxes drawn where box_to_pixels puts them, SVG histogram counts, Markdown table."""
from PIL import Image

from medrega_eval.report import PRED_COLOR, REF_COLOR, _markdown, draw_boxes, iou_histogram_svg


def test_draw_boxes_puts_reference_and_prediction_at_pixel_positions():
    img = Image.new("RGB", (200, 100), "black")
    out = draw_boxes(img, ref=[[0, 0, 499, 999]], pred=[[500, 0, 999, 999]], max_side=200)
    assert out.size == (200, 100)
    # reference box left edge at x=0, prediction box right edge at x=199 (999/999*200 = 200 -> last column)
    assert out.getpixel((1, 50)) == REF_COLOR
    assert out.getpixel((199, 50)) == PRED_COLOR
    assert out.getpixel((150, 50)) == (0, 0, 0)  # inside the predicted box: untouched


def test_iou_histogram_svg_counts_bins():
    svg = iou_histogram_svg([0.05, 0.95, 0.97, 1.0, 0.5])
    assert svg.startswith("<svg") and svg.count("<rect") == 10
    assert "0.9-1.0: 3" in svg and "0.0-0.1: 1" in svg and "0.5-0.6: 1" in svg


def test_markdown_table_lists_metrics_and_counts():
    md = _markdown({"task": "vqa", "benchmark": "slake_en", "bleu1": 0.5, "closed_accuracy": None,
                    "counts": {"records": 2}, "protocol": {"model": "m"}})
    assert "| bleu1 | 0.5000 |" in md and "| closed_accuracy | - |" in md and "| records | 2 |" in md
    assert "model=m" in md
