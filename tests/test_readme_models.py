"""The README's Models table says what `python -m llm.model.summary` computes, row by row, to the digits it shows."""

from __future__ import annotations

import re
from pathlib import Path

from llm.model.presets import list_presets
from llm.model.summary import summarize

README = Path(__file__).resolve().parents[1] / "README.md"
SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}
ROW = re.compile(
    r"^\| `([a-z0-9-]+)`[^|]*\| ([\d.]+[KMG]?) \| ([\d.]+[KMG]?) \| ([\d.]+[KMG]?)(?: \(x([\d.]+)\))? \| (\d+) \|$"
)


def shown(text: str) -> tuple[float, float]:
    """'936.4M' -> (936.4e6, half a unit of its last digit: what rounding may hide)."""
    number, suffix = re.fullmatch(r"([\d.]+)([KMG]?)", text).groups()
    decimals = len(number.split(".")[1]) if "." in number else 0
    return float(number) * SUFFIX[suffix], 0.5 * 10**-decimals * SUFFIX[suffix]


def table_rows() -> list[re.Match]:
    section = README.read_text().split("## Models", 1)[1].split("\n## ", 1)[0]
    return [m for line in section.splitlines() if (m := ROW.match(line))]


def test_every_models_table_row_matches_the_summary() -> None:
    rows = table_rows()
    assert {"llama-1b", "parameternet-llama-1b", "llama-small", "parameternet-llama-small"} <= {r[1] for r in rows}
    for row in rows:
        name, total, active, flops, ratio, seq = row.groups()
        assert name in list_presets(), name
        got = summarize(name, int(seq))
        for text, key in ((total, "total_params"), (active, "active_params"), (flops, "forward_flops_per_token")):
            value, tolerance = shown(text)
            assert abs(got[key] - value) <= tolerance, (name, key, text, got[key])
        if ratio is not None:
            assert abs(got["flops_vs_vanilla"] - float(ratio)) <= 0.5 * 10 ** -len(ratio.split(".")[1]), (name, ratio)
