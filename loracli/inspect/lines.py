"""Problem and warning lines of a report, folded so that one line says what many layers share.

Contract: pure string functions. `merge_layer_lines` folds lines that differ only by their layer
number ("layer 3 q_proj: ..." or a tensor key "...layers.3...."), keeping the order of first
appearance; every other line is kept once, as it is.
"""

from __future__ import annotations

import re

_LAYER_NUMBER = re.compile(r"^layer (\d+) |layers\.(\d+)\.")


def layer_span(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def merge_layer_lines(lines: list[str]) -> list[str]:
    """Fold lines that differ only by their layer number, in order of first appearance:

    "layer 0 q_proj: x", "layer 1 q_proj: x" -> "layers 0-1 q_proj: x";
    "tensor a.layers.0.b: x", "tensor a.layers.1.b: x" -> "tensor a.layers.{0-1}.b: x".
    """
    groups: dict[tuple[str, str, str], list[int]] = {}
    for line in lines:
        m = _LAYER_NUMBER.search(line)
        if m is None:
            groups.setdefault((line, "", ""), [])
            continue
        style = "prose" if m[1] is not None else "key"
        groups.setdefault((line[: m.start()], style, line[m.end() :]), []).append(int(m[1] or m[2]))
    return [_folded(head, style, tail, layers) for (head, style, tail), layers in groups.items()]


def _folded(head: str, style: str, tail: str, layers: list[int]) -> str:
    if not layers:
        return head
    span = layer_span(layers)
    if style == "prose":
        return f"{head}layer{'s' if len(layers) > 1 else ''} {span} {tail}"
    return f"{head}layers.{span if len(layers) == 1 else '{' + span + '}'}.{tail}"
