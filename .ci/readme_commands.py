"""Print the shell lines of README.md that a newcomer runs: ``install`` or ``setup``.

``install``: the ``bash`` code block of the "Install" section; ``setup``: the ``bash`` code blocks of
the "Set-up commands" section, in order. Comments and blank lines are dropped. Exits non-zero when
a section or its code is missing, so that a README that loses them fails CI.
"""

import re
import sys
from pathlib import Path

SECTIONS = {"install": "Install", "setup": "Set-up commands"}


def commands(readme: str, heading: str) -> list[str]:
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if match is None:
        sys.exit(f"README.md: no section '## {heading}'")
    blocks = re.findall(r"^```bash\n(.*?)^```", match.group(1), re.M | re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        sys.exit(f"README.md: the section '## {heading}' has no bash command")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SECTIONS:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(SECTIONS)}}}")
    print("\n".join(commands(Path("README.md").read_text(), SECTIONS[sys.argv[1]])))
