"""Run the seed documents' code as written: extract their fenced blocks, rewrite ONLY the import lines that name the
seed's package (``IMPORTS``, the whole mapping), and execute the text. Used by test_seeds.py."""
from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

OPEN, CLOSE = re.compile(r"^\s*```(\w*)\s*$"), re.compile(r"^\s*```\s*$")

# The seed's import -> peftlab's (README, "Coming from ..."). Nothing else in a block is changed.
IMPORTS = {
    "import loralib as lora": "import peftlab.adapters.gplora as lora",
    "from loralib import": "from peftlab.adapters.gplora import",
    "from geolora.config import": "from peftlab.geolora import",
    "from geolora.models import": "from peftlab.geolora import",
    "from geolora.training import": "from peftlab.geolora import",
    "from geolora.data import": "from peftlab.geolora import",
    "from nexus.models.compression.peft import": "from peftlab.adapters import",
    "from rotational_pissa_unified import": "from peftlab.adapters.rotational_pissa import",
}


@dataclass
class Block:
    seed: str   # the file's prefix, "000" .. "004"
    index: int  # 0-based among the file's fenced blocks
    line: int   # 1-based line of the opening fence
    lang: str
    code: str


def seed_dir() -> Path | None:
    """$PEFTLAB_SEEDS, else the first shared/seeds above the repository (../shared/seeds from a checkout)."""
    if os.environ.get("PEFTLAB_SEEDS"):
        return Path(os.environ["PEFTLAB_SEEDS"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "seeds").is_dir():
            return parent / "shared" / "seeds"
    return None


def seed_file(seed: str) -> Path:
    (path,) = sorted(seed_dir().glob(f"{seed}_*.txt"))
    return path


def blocks(seed: str) -> list[Block]:
    """Every fenced block of the seed file, in order (an unterminated fence at the end of a file counts, empty)."""
    lines = seed_file(seed).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not CLOSE.match(lines[j]):
            j += 1
        out.append(Block(seed, len(out), i + 1, m.group(1), "\n".join(lines[i + 1:j])))
        i = j + 1
    return out


def rewrite_imports(code: str) -> str:
    """Replace the seed's package in import lines by peftlab's; an unmapped import of the seed's packages fails."""
    out = []
    for line in code.splitlines():
        stripped = line.lstrip()
        for old, new in IMPORTS.items():
            if stripped.startswith(old):
                line = line[:len(line) - len(stripped)] + new + stripped[len(old):]
                break
        else:
            if re.match(r"(from|import)\s+(loralib|geolora|nexus|rotational_pissa_unified)\b", stripped):
                raise AssertionError(f"no mapping for the seed import {stripped!r}: add it to IMPORTS")
        out.append(line)
    return "\n".join(out)


def sections(code: str) -> dict[str, str]:
    """A block written as '# ORIGINAL...:' code then '# MODIFIED...:' code (the Rotational PiSSA port) by section."""
    parts, key = {}, None
    for line in code.splitlines():
        m = re.match(r"#\s*(ORIGINAL|MODIFIED)\b.*:\s*$", line.strip())
        if m:
            key = m.group(1)
            parts[key] = []
        elif key:
            parts[key].append(line)
    return {k: "\n".join(v).strip("\n") for k, v in parts.items()}


def run(code: str, ns: dict, where: str) -> dict:
    """Execute the text (imports rewritten) in ns; tracebacks name the seed block."""
    exec(compile(rewrite_imports(code), where, "exec"), ns)
    return ns


def run_block(block: Block, ns: dict, section: str | None = None, wrap: str | None = None) -> dict:
    """Run a block (or one of its sections), optionally as the indented body of ``wrap`` (e.g. a for header)."""
    code = sections(block.code)[section] if section else block.code
    if wrap:
        code = wrap + "\n" + textwrap.indent(code, "    ")
    return run(code, ns, f"<seed {block.seed} block {block.index} (line {block.line})>")


def shell_commands(text: str) -> list[str]:
    """Shell lines of a block, continuation backslashes joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\s*\n", " ", text)
    return [" ".join(l.split()) for l in joined.splitlines() if l.strip() and not l.strip().startswith("#")]
