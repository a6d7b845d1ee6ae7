"""Grid text formats and the Phi-3 chat prompt, on the host.

A grid format spells one grid as lines of text. Every piece of a prompt starts at the beginning of
a line, so a tokenizer that spells digits and newlines as their own tokens encodes a prompt as the
plain concatenation of its pieces' encodings (what `arc_jax.data.encode` does on device).

Formats (arc24 found the shape header with numbered rows best):
    minimal          shape            numbered         shape_numbered
    012              3x3              1 012            3x3
    345              012              2 345            1 012
    678              345              3 678            2 345
                     678                               3 678
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from arc_jax.data.tasks import MAX_SIDE


@dataclasses.dataclass(frozen=True)
class GridFormat:
    """How one grid is spelled: an optional `{h}x{w}` header line, optional `{row} ` prefixes."""

    shape_header: bool = False
    row_numbers: bool = False


GRID_FORMATS = {
    "minimal": GridFormat(),
    "shape": GridFormat(shape_header=True),
    "numbered": GridFormat(row_numbers=True),
    "shape_numbered": GridFormat(shape_header=True, row_numbers=True),
}

LOSS_ON = ("target", "all_outputs")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """The fixed text pieces of a Phi-3 chat prompt; each starts at the beginning of a line.

    text = prefix + [input_label grid output_label grid]* + input_label grid + query_suffix
    answer = grid + answer_suffix          (the assistant turn, what the model must produce)
    """

    prefix: str = "<|user|>\n"
    input_label: str = "input:\n"
    output_label: str = "output:\n"
    query_suffix: str = "<|end|>\n<|assistant|>\n"
    answer_suffix: str = "<|end|>"

    def pieces(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def get_grid_format(name: str) -> GridFormat:
    if name not in GRID_FORMATS:
        raise ValueError(f"unknown grid format {name!r}; known: {sorted(GRID_FORMATS)}")
    return GRID_FORMATS[name]


def grid_to_text(grid: np.ndarray | Sequence[Sequence[int]], fmt: GridFormat) -> str:
    """Spells a grid `[h, w]` of colours 0..9; the text ends with a newline."""
    grid = np.asarray(grid)
    h, w = grid.shape
    lines = [f"{h}x{w}"] if fmt.shape_header else []
    for i, row in enumerate(grid):
        prefix = f"{i + 1} " if fmt.row_numbers else ""
        lines.append(prefix + "".join(str(int(c)) for c in row))
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class ParsedGrid:
    """A grid parsed from model output: `grid` `[h, w]`, or None with `error` saying why."""

    grid: np.ndarray | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.grid is not None


def text_to_grid(text: str, fmt: GridFormat) -> ParsedGrid:
    """Parses the text of one grid (as written by `grid_to_text`), validating shape and colours.

    Never raises on bad text: the returned `ParsedGrid.error` says what was wrong.
    """
    lines = text.strip("\n").split("\n") if text.strip("\n") else []
    if not lines:
        return ParsedGrid(None, "empty output")
    header = None
    if fmt.shape_header:
        head = lines.pop(0).strip()
        parts = head.split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return ParsedGrid(None, f"bad shape header {head!r}, expected '<h>x<w>'")
        header = (int(parts[0]), int(parts[1]))
    rows = []
    for i, line in enumerate(lines):
        if fmt.row_numbers:
            number, sep, line = line.partition(" ")
            if not sep or number != str(i + 1):
                return ParsedGrid(None, f"row {i + 1}: expected row number prefix '{i + 1} '")
        if not line or not all(c in "0123456789" for c in line):
            return ParsedGrid(None, f"row {i + 1}: {line!r} is not a row of colours 0..9")
        rows.append([int(c) for c in line])
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        return ParsedGrid(None, f"rows have different widths {sorted(widths)}")
    grid = np.asarray(rows, dtype=np.int8)
    h, w = grid.shape
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        return ParsedGrid(None, f"shape {h}x{w} outside 1..{MAX_SIDE}")
    if header is not None and header != (h, w):
        return ParsedGrid(None, f"header says {header[0]}x{header[1]} but grid is {h}x{w}")
    return ParsedGrid(grid)


def prompt_text(
    context: Sequence[tuple[np.ndarray, np.ndarray]],
    query: np.ndarray,
    fmt: GridFormat,
    template: PromptTemplate = PromptTemplate(),
) -> str:
    """The user turn: context (input, output) pairs then the query input, ending with the
    assistant header. Grids are `[h, w]`."""
    parts = [template.prefix]
    for grid_in, grid_out in context:
        parts += [template.input_label, grid_to_text(grid_in, fmt)]
        parts += [template.output_label, grid_to_text(grid_out, fmt)]
    parts += [template.input_label, grid_to_text(query, fmt), template.query_suffix]
    return "".join(parts)


def answer_text(
    answer: np.ndarray, fmt: GridFormat, template: PromptTemplate = PromptTemplate()
) -> str:
    """The assistant turn: the output grid `[h, w]` and the end-of-turn marker."""
    return grid_to_text(answer, fmt) + template.answer_suffix


def parse_answer(
    text: str, fmt: GridFormat, template: PromptTemplate = PromptTemplate()
) -> ParsedGrid:
    """Parses generated assistant text (up to the end marker, if any) into a grid."""
    text = text.split(template.answer_suffix, 1)[0]
    return text_to_grid(text, fmt)
