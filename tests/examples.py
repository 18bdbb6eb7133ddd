"""The `curl` examples of the README and of `docs/`, read as a user reads them, with the
answers the pages show, and run in order in one shell.

A page shows a command's answer in a comment, at the end of its last line or on the lines
after it: `# 201`, `# 200 {"ids": [7, 8]}`, then any words. A fenced `http` block right after
a `sh` block (`HTTP/1.1 201 Created`, headers, the body) or a `json` block (the body) shows
the answer of the last command before it. In a body, `...` stands for more of the same: more
keys (`{"id": 3, ...}`), any object (`{...}`), more items like the first (`[{...}, ...]`).
What is compared is the shape: the status, the headers shown, the keys and the JSON types of
the body; ids, times, counts and the words of a message are free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
BASE_URL = "localhost:8000"
# Marks what the pages elide: any object, or more keys or items than are shown.
MORE = "@more"
NO_BODY = object()


def pages() -> list[Path]:
    """The README, then every page of docs/, in the order a reader meets them."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass
class Shown:
    """What a page shows of an answer."""

    status: int | None = None
    headers: list[str] = field(default_factory=list)
    body: Any = NO_BODY


@dataclass
class Example:
    page: str
    line: int
    command: str
    answer: Shown | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def is_request(self) -> bool:
        return re.search(r"(^|[\s$(|;])curl\s", self.command) is not None


def _scan(text: str) -> tuple[bool, int | None]:
    """Whether `text` ends inside quotes, and where a shell comment on its last line starts
    (None: none)."""
    quote = None
    comment = None
    i = 0
    while i < len(text):
        c = text[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif c == "\\":
            i += 1
        elif quote == '"':
            quote = None if c == '"' else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            end = text.find("\n", i)
            if end == -1:
                comment = i
                break
            i = end
        i += 1
    return quote is not None, comment


def parse_body(text: str) -> Any:
    """The JSON at the start of `text`, with `...` read as MORE; NO_BODY if none starts it."""
    text = text.strip()
    if not text or text[0] not in '{["-0123456789':
        return NO_BODY
    text = re.sub(r"\{\s*\.\.\.\s*\}", '{"' + MORE + '": true}', text)
    text = re.sub(r"\[\s*\.\.\.\s*\]", '["' + MORE + '"]', text)
    text = re.sub(r",\s*\.\.\.\s*\}", ', "' + MORE + '": true}', text)
    text = re.sub(r",\s*\.\.\.\s*\]", ', "' + MORE + '"]', text)
    value, _ = json.JSONDecoder().raw_decode(text)
    return value


def _shown_in_comment(comment: str) -> Shown:
    match = re.match(r"(\d{3})\b(.*)", comment.strip(), re.DOTALL)
    if match is None:
        return Shown()
    return Shown(status=int(match[1]), body=parse_body(match[2]))


def _shown_in_block(lang: str, lines: list[str], shown: Shown) -> None:
    if lang == "json":
        shown.body = parse_body("\n".join(lines))
        return
    status_line, *rest = lines
    shown.status = int(status_line.split()[1])
    blank = rest.index("") if "" in rest else len(rest)
    shown.headers = [h.split(":", 1)[0].strip().lower() for h in rest[:blank]]
    shown.body = parse_body("\n".join(rest[blank:]))


def _blocks(text: str) -> list[tuple[str, int, list[str], int]]:
    """Fenced blocks: (language, first line's number, lines, the closing fence's number)."""
    blocks = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        match = re.match(r"```(\w*)\s*$", lines[i])
        if match is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        blocks.append((match[1], i + 2, lines[i + 1 : end], end + 1))
        i = end + 1
    return blocks


def examples(page: Path) -> list[Example]:
    """The commands of every `sh` block of `page` that sends a request, with their answers."""
    found: list[Example] = []
    blocks = _blocks(page.read_text())
    name = str(page.relative_to(ROOT))
    for n, (lang, first, lines, end) in enumerate(blocks):
        if lang != "sh" or not any("curl " in line for line in lines):
            continue
        block: list[Example] = []
        pending: list[str] = []
        for offset, line in enumerate(lines):
            if not pending and line.lstrip().startswith("#"):
                assert block, f"{name}:{first + offset}: a comment before any command"
                block[-1].comments.append(line.lstrip()[1:].strip())
                continue
            if not pending and not line.strip():
                continue
            pending.append(line)
            text = "\n".join(pending)
            quoted, at = _scan(text)
            if text.endswith("\\") or quoted:
                continue
            example = Example(name, first + offset - len(pending) + 1, text)
            if at is not None:
                example.command = text[:at].rstrip()
                example.comments.append(text[at + 1 :].strip())
            block.append(example)
            pending = []
        assert not pending, f"{name}:{first}: a command that does not end"
        for example in block:
            if example.comments:
                example.answer = _shown_in_comment(" ".join(example.comments))
        if n + 1 < len(blocks):
            next_lang, next_first, next_lines, _ = blocks[n + 1]
            if next_lang in ("http", "json") and next_first - end <= 3 and block:
                last = block[-1]
                last.answer = last.answer or Shown()
                _shown_in_block(next_lang, next_lines, last.answer)
        found.extend(block)
    return found


def mismatch(shown: Any, got: Any, path: str = "") -> str | None:
    """Where `got` is not of the shape `shown` (None: it is)."""
    if isinstance(shown, dict):
        if not isinstance(got, dict):
            return f"{path or 'the body'}: {json.dumps(got)[:80]} is not an object"
        keys = [k for k in shown if k != MORE]
        missing = [k for k in keys if k not in got]
        extra = [] if MORE in shown else [k for k in got if k not in shown]
        if missing or extra:
            return f"{path or 'the body'}: keys missing {missing}, not shown {extra}"
        for k in keys:
            if (problem := mismatch(shown[k], got[k], f"{path}.{k}")) is not None:
                return problem
        return None
    if isinstance(shown, list):
        if not isinstance(got, list):
            return f"{path or 'the body'}: {json.dumps(got)[:80]} is not a list"
        items = [x for x in shown if x != MORE]
        if MORE in shown:
            pairs = [(items[0], g) for g in got] if items else []
        elif len(items) != len(got):
            return f"{path or 'the body'}: {len(got)} items, {len(items)} shown"
        else:
            pairs = list(zip(items, got, strict=True))
        for i, (s, g) in enumerate(pairs):
            if (problem := mismatch(s, g, f"{path}[{i}]")) is not None:
                return problem
        return None
    if _kind(shown) != _kind(got):
        return f"{path or 'the body'}: {json.dumps(got)[:80]} is not a {_kind(shown)}"
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__
