"""README.md is a user's guide and RESULTS.md a results page: each under its size, and no sentence of their
prose over 40 words (tables, code, headings and pictures are not prose)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"README.md": 10_000, "RESULTS.md": 30_000}  # bytes
MAX_WORDS = 40


def sentences(markdown):
    """The prose sentences of a Markdown text: paragraphs and list items, split after . ! or ? before a capital,
    a backtick, a bracket or an asterisk."""
    text = re.sub(r"```.*?```", "\n\n", markdown, flags=re.S)
    units, current = [], []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        starts_item = re.match(r"(- |\d+\. )", stripped)
        if not stripped or stripped.startswith(("#", "|", "![")) or starts_item:
            if current:
                units.append(" ".join(current))
            current = [stripped[starts_item.end():]] if starts_item else []
            continue
        current.append(stripped)
    return [s for unit in units for s in re.split(r'(?<=[.!?])\s+(?=[A-Z`(*\["])', unit) if s.strip()]


def test_sentences_splits_prose_and_leaves_out_tables_and_code():
    text = "# Title\n\nOne two. Three `four` five.\n\n| a | b |\n\n```bash\nx y z\n```\n- item one\n  goes on. Next"
    assert sentences(text) == ["One two.", "Three `four` five.", "item one goes on.", "Next"]


@pytest.mark.parametrize("name", LIMITS)
def test_the_page_is_short_and_its_sentences_too(name):
    text = (ROOT / name).read_text()
    assert len(text.encode()) < LIMITS[name], f"{name}: {len(text.encode())} bytes"
    longest = max(sentences(text), key=lambda s: len(s.split()))
    assert len(longest.split()) <= MAX_WORDS, f"{name}: {len(longest.split())} words: {longest}"
