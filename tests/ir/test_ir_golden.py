"""The program dump is stable: compare with checked-in text (regenerate with --update-golden or
DIPC_UPDATE_GOLDEN=1 and review the diff)."""
from __future__ import annotations

import os
from pathlib import Path

from dipc.ir import dump_program, parse_program, validate

from .programs import two_rank_1f1b

GOLDEN = Path(__file__).parent / "golden"


def _update(request) -> bool:
    try:
        flag = request.config.getoption("--update-golden")
    except ValueError:
        flag = False
    return bool(flag) or os.environ.get("DIPC_UPDATE_GOLDEN") == "1"


def test_two_rank_1f1b_golden(request):
    p = two_rank_1f1b()
    validate(p)
    text = dump_program(p)
    path = GOLDEN / "two_rank_1f1b.txt"
    if _update(request):
        path.write_text(text)
    assert text == path.read_text()
    assert parse_program(path.read_text()) == p
