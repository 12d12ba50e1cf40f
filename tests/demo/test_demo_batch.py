"""--batch mode: record reading (relative/absolute/DICOM images, FILE:LINE errors), sharding, gathering, writing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl.demo.batch import BatchError, gather_results, read_batch_file, regions_json, run_batch, write_results


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _record(i: int, image: str, answer: str = "<ref>liver</ref><box>[[1, 2, 300, 400]]</box>") -> dict:
    return {"id": i, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nPlease locate <ref>liver</ref> in this CT scan."},
        {"from": "gpt", "value": answer}]}


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    return tmp_path


def test_reads_relative_absolute_and_dicom_images(batch_dir: Path) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    dcm = pydicom_data.get_testdata_file("CT_small.dcm", download=False)
    f = _write(batch_dir / "b.jsonl", [_record(0, "imgs/a.png"), _record(1, str(batch_dir / "imgs" / "a.png")),
                                       _record(2, dcm)])
    items = read_batch_file(f)
    assert [it.image for it in items] == [batch_dir / "imgs" / "a.png"] * 2 + [Path(dcm)]
    assert items[0].gt_answer.startswith("<ref>liver") and items[0].question.startswith("<image>\n")


def test_bad_records_name_file_and_line(batch_dir: Path) -> None:
    f = _write(batch_dir / "b.jsonl", [_record(0, "imgs/a.png"), _record(1, "imgs/missing.png")])
    with pytest.raises(BatchError, match=r"b.jsonl:2: .*missing.png"):
        read_batch_file(f)
    g = batch_dir / "c.jsonl"
    g.write_text(json.dumps(_record(0, "imgs/a.png")) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(BatchError, match=r"c.jsonl:2"):
        read_batch_file(g)
    (batch_dir / "imgs" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk" * 20)
    h = _write(batch_dir / "d.jsonl", [_record(0, "imgs/bad.dcm")])
    with pytest.raises(BatchError, match=r"d.jsonl:1: .*bad.dcm"):
        read_batch_file(h)


def test_each_rank_decodes_its_share_and_every_rank_stops_at_any_ranks_bad_image(batch_dir: Path, monkeypatch) -> None:
    """With two ranks, rank 1 decodes only items 1, 3, ... (rank 0 decodes the rest), and a bad image found by one
    rank is raised on every rank (shared with all_gather_object), naming its FILE:LINE."""
    import internvl.demo.batch as batch

    (batch_dir / "imgs" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk" * 20)
    f = _write(batch_dir / "b.jsonl", [_record(0, "imgs/bad.dcm"), _record(1, "imgs/a.png")])
    shared: list = []

    def gather(out, mine):  # rank 1 of 2: what the ranks would share
        shared.append(mine)
        out[:] = [peer, mine]

    monkeypatch.setattr(batch.dist, "all_gather_object", gather)
    peer = None  # rank 0 found nothing: rank 1 never decoded the bad image on line 1 itself
    assert [it.index for it in read_batch_file(f, rank=1, world_size=2)] == [0, 1] and shared == [None]
    peer = f"{f}:1: cannot decode imgs/bad.dcm"  # rank 0's problem stops rank 1 too
    with pytest.raises(BatchError, match=r"b.jsonl:1: cannot decode"):
        read_batch_file(f, rank=1, world_size=2)


class _EchoGenerator:
    """Stands in for internvl.inference.Generator: answers with the request id inside a box answer."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def iter_generate(self, requests):
        self.seen += [r.id for r in requests]
        yield [(i, f"liver[[{int(r.id)}, 0, 999, 999]]") for i, r in enumerate(requests)]


def test_sharding_gathering_and_output(batch_dir: Path, tmp_path: Path) -> None:
    f = _write(batch_dir / "b.jsonl", [_record(i, "imgs/a.png") for i in range(5)])
    items = read_batch_file(f)
    gens = [_EchoGenerator(), _EchoGenerator()]
    parts = [run_batch(gens[r], items, rank=r, world_size=2) for r in range(2)]
    assert gens[0].seen == ["0", "2", "4"] and gens[1].seen == ["1", "3"]
    merged = gather_results(parts[1] + parts[0], world_size=1)
    assert [r["question_id"] for r in merged] == [0, 1, 2, 3, 4]
    path = write_results(merged, tmp_path / "out")
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert path.name.startswith("demo_") and len(rows) == 5
    assert set(rows[0]) == {"question", "question_id", "pred_answer", "gt_answer", "pred_regions", "gt_regions",
                            "image"}
    assert rows[3]["pred_regions"] == [{"name": "liver", "boxes": [[3, 0, 999, 999]]}]
    assert rows[3]["gt_regions"] == [{"name": "liver", "boxes": [[1, 2, 300, 400]]}]


def test_regions_json_ignores_malformed_parts() -> None:
    assert regions_json("no boxes here") == []
    assert regions_json("<ref>a</ref><box>[[1, 2, 3, 4]]</box>, b[[5, 6, 7]]")[0] == {"name": "a",
                                                                                    "boxes": [[1, 2, 3, 4]]}


@pytest.mark.parametrize("key,value,message", [("slice_index", -1, "whole number"), ("frame", True, "whole number"),
                                               ("axis", "up", "one of axial"), ("window", [40], "center, width")])
def test_bad_image_options_name_file_and_line(batch_dir: Path, key: str, value, message: str) -> None:
    f = _write(batch_dir / "b.jsonl", [_record(0, "imgs/a.png"), {**_record(1, "imgs/a.png"), key: value}])
    with pytest.raises(BatchError, match=rf"b.jsonl:2: '{key}' must be .*{message}"):
        read_batch_file(f)
    good = _write(batch_dir / "g.jsonl", [{**_record(0, "imgs/a.png"), "window": [40, 400], "axis": "coronal"}])
    assert read_batch_file(good)[0].image_kwargs == {"window": (40, 400), "axis": "coronal"}
