"""`fedsim list <kind>` shows every plug-in's keys with their types and defaults."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field

from fedsim.cli import LISTABLE
from fedsim.plugin_doc import type_text
from tests.conftest import run_cli


def _block(out: str, name: str) -> list[str]:
    """The key lines printed under plug-in `name`."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:1] == [name])
    rest = []
    for ln in lines[start + 1:]:
        if not ln.startswith(" "):
            break
        rest.append(ln.strip())
    return rest


def test_list_datasets_shows_keys(capsys) -> None:
    code, out, _ = run_cli(["list", "datasets"], capsys)
    assert code == 0
    hf = _block(out, "hf")
    assert "path: str (required)" in hf
    assert "test_split: str | None = 'test'" in hf
    assert "test_fraction: float >= 0, < 1 = 0.0" in hf
    assert "image_mode: keep | L | RGB = 'keep'" in hf
    assert "num_classes: int > 0 | None = None" in hf
    assert "num_clients" not in out and "seed:" not in out  # runtime arguments are not keys
    assert "input_shape: list[int > 0] | None = None" in _block(out, "leaf")


def test_list_partitions_shows_common_holdout(capsys) -> None:
    code, out, _ = run_cli(["list", "partitions"], capsys)
    assert code == 0
    assert "alpha: float > 0 (required)" in _block(out, "dirichlet")
    for kind in ("iid", "dirichlet", "shards", "natural", "flwr-dirichlet"):
        assert "holdout: float >= 0, < 1 = 0.0" in _block(out, kind)
    assert "select: all | first | random = 'all'" in _block(out, "natural")


@pytest.mark.parametrize("what", LISTABLE)
def test_every_kind_lists(capsys, what: str) -> None:
    code, out, err = run_cli(["list", what], capsys)
    assert code == 0 and out.strip() and not err


def test_type_text() -> None:
    assert type_text(Annotated[int, Field(ge=1)]) == "int >= 1"
    assert type_text(Annotated[float, Field(gt=0, le=1)] | None) == "float > 0, <= 1 | None"
    assert type_text(Literal["a", "b"]) == "a | b"
    assert type_text(list[Annotated[int, Field(gt=0)]]) == "list[int > 0]"
    assert type_text(dict[str, float]) == "dict[str, float]"
