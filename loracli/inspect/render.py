"""`render(report, console, flags=...)`: the human form of an `InspectReport`, printed with rich.

Contract: one adapter gets a detailed view (config, weights, per-module norms, engine cost,
compatibility), a folder gets one table row per adapter; problems (✗) and warnings (!) follow,
one line each. Configuration fields named in the output (`max_lora_rank`, `model`, and those of
`adapters.MESSAGE_FIELDS` inside problem lines) are spelled through `flags`, a field -> text
mapping the caller passes (the CLI: its flags); a field it leaves out is shown by name. Nothing
is computed here beyond formatting; rich is imported when rendering.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..adapters import spell_fields
from ..config import MAX_LORA_RANK_LIMIT
from ..sizes import format_bytes
from .report import AdapterReport, EngineInfo, InspectReport, WeightsInfo

_STATUS_STYLE = {"ok": "green", "warning": "yellow", "incompatible": "red", "error": "bold red"}


def render(report: InspectReport, console, *, flags: Mapping[str, str] | None = None) -> None:
    """Print the human report with rich: a detailed view for one adapter, a table for a folder."""
    flags = flags or {}
    if report.mode == "adapter":
        _render_adapter(report, report.adapters[0], console, flags)
    else:
        _render_folder(report, console, flags)


def _fmt_num(x: float) -> str:
    return f"{x:.4g}"


def _field(name: str, flags: Mapping[str, str]) -> str:
    return flags.get(name, name)


def _kv_table():
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    return table


def _config_rows(table, cfg: dict) -> None:
    table.add_row("PEFT type", f"{cfg['peft_type']} (task {cfg['task_type'] or '-'})")
    table.add_row("base model", str(cfg["base_model"] or "-"))
    table.add_row(
        "rank / alpha",
        f"r={cfg['r']}, lora_alpha={_fmt_num(cfg['lora_alpha'])}, "
        f"scale {_fmt_num(cfg['scale'])} ({cfg['scale_formula']})",
    )
    table.add_row("targets", ", ".join(cfg["target_modules"]) or "-")
    table.add_row("dropout / bias", f"{_fmt_num(cfg['lora_dropout'])} / {cfg['bias']}")
    for key in ("use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if cfg[key]:
            table.add_row(key, str(cfg[key]))


def _modules_table(weights: WeightsInfo):
    from rich.table import Table

    table = Table(title="‖scale·B·A‖_F per module over layers", title_justify="left", box=None, padding=(0, 1))
    for col in ("shapes", "scale", "min", "median", "max"):
        table.add_column(col, justify="left" if col == "shapes" else "right")
    for m in weights.modules:
        shapes = "\n".join(
            f"{len(g.layers)} layer{'s' if len(g.layers) > 1 else ''} × {m.module} A {g.a_shape}, B {g.b_shape}"
            for g in m.shapes
        )
        norms = [_fmt_num(m.delta_norm[k]) for k in ("min", "median", "max")] if m.delta_norm else ["-"] * 3
        table.add_row(shapes, ", ".join(_fmt_num(s) for s in m.scales), *norms)
    return table


def _issues(console, adapter_reports: list[AdapterReport], prefix: bool, flags: Mapping[str, str]) -> None:
    from rich.markup import escape

    for a in adapter_reports:
        head = f"{escape(a.name)}: " if prefix else ""
        for mark, lines in (("[red]✗[/red]", a.problems), ("[yellow]![/yellow]", a.warnings)):
            for line in lines:
                console.print(f"  {mark} {head}{escape(spell_fields(line, flags))}", highlight=False, soft_wrap=True)


def _render_adapter(report: InspectReport, a: AdapterReport, console, flags: Mapping[str, str]) -> None:
    from rich.markup import escape

    style = _STATUS_STYLE[a.status]
    console.print(f"[bold]{escape(a.name)}[/bold]  {escape(a.path)}  [{style}]{a.status}[/{style}]", highlight=False)
    table = _kv_table()
    if a.config:
        _config_rows(table, a.config)
    w = a.weights
    if w:
        table.add_row("weights", f"{escape(Path(w.file).name)}, {format_bytes(w.file_bytes)} on disk")
        table.add_row("tensors", f"{w.tensor_count} tensors, {w.parameter_count:,} parameters, {', '.join(w.dtypes)}")
    console.print(table)
    if w and w.modules:
        console.print(_modules_table(w))
    if a.cost:
        console.print("[bold]engine cost[/bold]")
        console.print(_cost_table(a, report.engine, flags))
    _model_line(report, console, flags)
    _issues(console, [a], prefix=False, flags=flags)


_EXTRA_LABELS = {"lora_magnitude_vector": "DoRA magnitudes", "lora_B.bias": "lora_B biases", "bias": "trained biases"}


def _cost_table(a: AdapterReport, e: EngineInfo, flags: Mapping[str, str]):
    c = a.cost
    cost = _kv_table()
    cost.add_row("own weights", f"{format_bytes(c.own_weights_bytes)} at rank {c.rank} ({e.dtype})")
    fits = c.smallest_max_lora_rank
    rank_field = _field("max_lora_rank", flags)
    cost.add_row("fits", f"{rank_field} >= {fits}" if fits else f"rank above {MAX_LORA_RANK_LIMIT}")
    if c.slot_bytes_at_rank is not None:
        cost.add_row(f"slot at rank {c.rank}", format_bytes(c.slot_bytes_at_rank))
    if a.weights and a.weights.extras and c is not None:
        held = ", ".join(f"{n} {_EXTRA_LABELS.get(kind, kind)}" for kind, n in sorted(a.weights.extras.items()))
        cost.add_row("DoRA / bias vectors", f"{held}: {format_bytes(c.extras_bytes)} (float32)")
    if a.weights and a.weights.vocab:
        for p in a.weights.vocab:
            cost.add_row(f"{p.module} {p.kind}", f"{p.shape}: {format_bytes(p.bytes)}")
        cost.add_row("embedding / lm_head parts", f"{format_bytes(c.vocab_bytes)} outside the slots (at most)")
    _slot_rows(cost, e, flags)
    return cost


def _slot_rows(table, e: EngineInfo, flags: Mapping[str, str]) -> None:
    if e.slot_bytes is None:
        table.add_row(f"slot at rank {e.max_lora_rank}", f"needs {_field('model', flags)} (a slot spans every module)")
        return
    tables = f", of which {format_bytes(e.slot_table_bytes)} DoRA / bias tables" if e.slot_table_bytes else ""
    table.add_row(f"slot at rank {e.max_lora_rank}", f"{format_bytes(e.slot_bytes)} ({e.dtype}{tables})")
    table.add_row("slots in budget", f"{e.slots_in_budget} in {format_bytes(e.memory_budget_bytes)}")


def _model_line(report: InspectReport, console, flags: Mapping[str, str]) -> None:
    from rich.markup import escape

    m = report.model
    if m is None:
        model = escape(_field("model", flags))
        console.print(f"[dim]not checked against a model: pass {model} PATH (or {model} default)[/dim]")
        return
    model = f"{escape(m.source)} ({m.model_type}, {m.num_layers} layers)"
    if report.mode == "folder":
        good = sum(a.status in ("ok", "warning") for a in report.adapters)
        console.print(f"{good} of {len(report.adapters)} adapters compatible with {model}", highlight=False)
    elif report.ok:
        console.print(f"[green]compatible[/green] with {model}", highlight=False)
    else:
        console.print(f"[red]not compatible[/red] with {model}", highlight=False)


def _render_folder(report: InspectReport, console, flags: Mapping[str, str]) -> None:
    from rich.table import Table

    table = Table(title=report.path, title_justify="left")
    for col in ("adapter", "r", "alpha", "targets", "params", "size", "status"):
        table.add_column(col, justify="right" if col in ("r", "alpha", "params", "size") else "left")
    for a in report.adapters:
        cfg, w = a.config or {}, a.weights
        style = _STATUS_STYLE[a.status]
        table.add_row(
            a.name,
            str(cfg.get("r", "-")),
            _fmt_num(cfg["lora_alpha"]) if cfg else "-",
            ", ".join(cfg.get("target_modules", [])) or "-",
            f"{w.parameter_count:,}" if w else "-",
            format_bytes(w.file_bytes) if w else "-",
            f"[{style}]{a.status}[/{style}]",
        )
    console.print(table)
    _issues(console, report.adapters, prefix=True, flags=flags)
    cost = _kv_table()
    _slot_rows(cost, report.engine, flags)
    console.print(cost)
    _model_line(report, console, flags)
