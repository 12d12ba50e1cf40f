"""The counts over every generated try of tests/robust_io (this file runs last): tries, clear errors or counted
skips, accepted controls, tracebacks, silent-wrong, false refusals and data loss. Run the whole folder for the
full figures; ``-s`` is not needed, the line is printed through ``capsys.disabled()``."""
from __future__ import annotations

from robust_io.hostile_cases import TALLY


def test_tally(capsys) -> None:
    with capsys.disabled():
        print("\nrobust-io tally:", dict(sorted(TALLY.items())))
    assert TALLY["traceback"] == 0 and TALLY["silent_wrong"] == 0 and TALLY["data_loss"] == 0
    assert TALLY["false_refusal"] == 0
