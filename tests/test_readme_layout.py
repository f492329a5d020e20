"""The README's layout section names the tree as it is: every directory it lists exists, and every package directory
of ours is listed."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "llm", "vision", "evals")


def layout_block(readme: str) -> str:
    return readme.split("## Layout", 1)[1].split("```", 2)[1]


def listed_dirs(block: str) -> set[str]:
    """The first word of each entry line (`llm/model/     ...`), and the `word/` paths named in the text."""
    heads = {m.group(1).rstrip("/") for m in re.finditer(r"^(\S+/)\s", block, re.M)}
    named = {m.group(1).rstrip("/") for m in re.finditer(r"(?<![\w/.])((?:[a-z_]+/)+)(?=[\s,)*])", block)}
    return heads | named


def package_dirs() -> set[str]:
    dirs = set()
    for package in PACKAGES:
        for init in (REPO / package).rglob("__init__.py"):
            dirs.add(init.parent.relative_to(REPO).as_posix())
    return dirs


def test_every_directory_in_the_layout_exists() -> None:
    block = layout_block((REPO / "README.md").read_text())
    missing = []
    for name in sorted(listed_dirs(block)):
        if not any(
            (base / name).is_dir() for base in (REPO, REPO / "runtime", REPO / "llm", REPO / "vision", REPO / "launch")
        ):
            missing.append(name)
    assert not missing, f"README layout names directories that do not exist: {missing}"


def test_every_package_directory_is_in_the_layout() -> None:
    block = layout_block((REPO / "README.md").read_text())
    listed = listed_dirs(block)
    unlisted = sorted(d for d in package_dirs() if d not in listed and d.split("/")[-1] + "/" not in block)
    assert not unlisted, f"package directories missing from the README layout: {unlisted}"


def test_the_checker_sees_a_missing_and_a_stale_entry() -> None:
    block = "\nllm/model/     models, packed/blended\nllm/gone/      removed\n"
    assert "llm/gone" in listed_dirs(block) and not (REPO / "llm/gone").is_dir()
    assert "llm/parallel" not in listed_dirs(block) and "packed" not in listed_dirs(block)
