"""Pixel shuffle v1 (column-major token order, V1.2/MedRegA) and v2 (row-major) on hand-computed grids."""
import pytest
import torch

from internvl.model import pixel_shuffle


def _grid(rows: int, cols: int) -> torch.Tensor:
    """[1, rows, cols, 1] with value 10*row + col at each patch, so tokens can be read off by eye."""
    values = torch.tensor([[10 * r + c for c in range(cols)] for r in range(rows)], dtype=torch.float32)
    return values.reshape(1, rows, cols, 1)


def _tokens(x: torch.Tensor) -> list[list[int]]:
    return x.reshape(-1, x.shape[-1]).to(torch.int64).tolist()


def test_v2_is_row_major_over_2x2_blocks():
    out = pixel_shuffle(_grid(4, 4), 0.5, "v2")
    assert out.shape == (1, 2, 2, 4)
    assert _tokens(out) == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]


def test_v1_is_column_major_over_2x2_blocks():
    out = pixel_shuffle(_grid(4, 4), 0.5, "v1")
    assert out.shape == (1, 2, 2, 4)
    # block (0,0), then (1,0) below it, then (0,1), then (1,1)
    assert _tokens(out) == [[0, 1, 10, 11], [20, 21, 30, 31], [2, 3, 12, 13], [22, 23, 32, 33]]


def test_v1_on_a_6x6_grid():
    tokens = _tokens(pixel_shuffle(_grid(6, 6), 0.5, "v1"))
    expected = []
    for block_col in range(3):
        for block_row in range(3):
            r, c = 2 * block_row, 2 * block_col
            expected.append([10 * r + c, 10 * r + c + 1, 10 * (r + 1) + c, 10 * (r + 1) + c + 1])
    assert tokens == expected


def test_channels_of_a_patch_stay_together():
    x = torch.arange(4 * 4 * 3, dtype=torch.float32).reshape(1, 4, 4, 3)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out[0, 0, 0].tolist() == x[0, 0, 0].tolist() + x[0, 0, 1].tolist() + x[0, 1, 0].tolist() + x[0, 1, 1].tolist()


def test_v1_equals_v2_transposed():
    x = torch.randn(3, 8, 8, 5)
    assert torch.equal(pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2").transpose(1, 2))


def test_bad_version_and_grid():
    with pytest.raises(ValueError, match="version"):
        pixel_shuffle(_grid(4, 4), 0.5, "v3")
    with pytest.raises(ValueError, match="divisible"):
        pixel_shuffle(_grid(5, 5), 0.5, "v1")
