"""SLURM helpers for the launch scripts: `python -m llm.train.slurm hostnames 'gpu[01-03,07]'` prints one host a line
(what `scontrol show hostnames` does, for machines without scontrol and for tests)."""

from __future__ import annotations

import re
import sys


def expand_nodelist(nodelist: str) -> list[str]:
    """'a[01-02],b3,c[7,9-10]' -> ['a01', 'a02', 'b3', 'c7', 'c9', 'c10']."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "hostnames":
        print("usage: python -m llm.train.slurm hostnames NODELIST", file=sys.stderr)
        return 2
    print("\n".join(expand_nodelist(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
