"""The shell commands of README.md's ```bash blocks, for the tests that run them (tests/verl/, tests/cli/)."""

import os
import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """Every command of the README's ```bash blocks as argv words: continuation lines joined, comments dropped, split
    at `&&`, environment variables expanded."""
    blocks = re.findall(r"^\s*```bash\n(.*?)^\s*```", README.read_text(), flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = [os.path.expandvars(w) for w in shlex.split(part, comments=True)]
                if words:
                    commands.append(words)
    return commands
