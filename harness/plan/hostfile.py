"""DeepSpeed's hostfile format, read in one place: `host slots=N` lines, `#` starts a comment.
The plan's checks report what DeepSpeed's launcher would refuse (with line numbers); the launch
side reads the hosts in node-rank order and writes hostfiles for host lists and allocations."""
from __future__ import annotations

import re
from pathlib import Path

from harness.plan.fields import HOST_PATTERN

# A host, then slots=N (its GPUs, or CPU ranks).
HOSTFILE_LINE = re.compile(rf"({HOST_PATTERN})\s+slots=([1-9]\d*)")


def hostfile_text(hosts: list[str], slots: int) -> str:
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def hostfile_hosts(text: str) -> list[str]:
    """Host names of a hostfile, in order (node rank order); lines that are not `host slots=N` are
    skipped (hostfile_problems reports them before anything launches)."""
    hosts = []
    for line in text.splitlines():
        match = HOSTFILE_LINE.fullmatch(line.split("#")[0].strip())
        if match is not None:
            hosts.append(match[1])
    return hosts


def hostfile_problems(path: Path) -> list[str]:
    """What DeepSpeed's launcher would refuse in a hostfile, or a shell would read as more than a
    host name, each with its line number."""
    if not path.is_file():
        return [f"an existing hostfile ({path} is not a file)"]
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return [f"a readable text file ({path}: {error})"]
    problems, first_line = [], {}
    for n, line in enumerate(lines, 1):
        text = line.split("#")[0].strip()
        if not text:
            continue
        match = HOSTFILE_LINE.fullmatch(text)
        if match is None:
            problems.append(f"line {n} of {path}: {line.strip()!r} is not 'host slots=N' (N >= 1; # starts a comment)")
        elif match[1] in first_line:
            problems.append(f"line {n} of {path}: host {match[1]} is listed again (first on line {first_line[match[1]]})")
        else:
            first_line[match[1]] = n
    if not first_line and not problems:
        problems.append(f"{path} lists no host: one 'host slots=N' line per node")
    return problems
