"""`loractl memory BASE ADAPTER`: predicted (and optionally measured) peak memory of a merge, both ways."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from lora_cli.cli._common import resolve_adapters
from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import AdapterRevisionOpt, AllowEmptyOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, RevisionOpt
from lora_cli.cli._output import Output, human_bytes
from lora_cli.errors import InputError

if TYPE_CHECKING:
    from lora_cli.memory import MemoryReport

MEMORY_EXAMPLES = """
Examples:

  loractl memory meta-llama/Llama-3.2-1B ./my-lora

  loractl memory ./base ./my-lora --measure                  (run the merge into a temp folder and sample RAM)

  loractl memory ./base ./my-lora --measure --measure-reference --json

  loractl memory ./base ./my-lora --device cuda
"""


def render_memory(output: Output, report: MemoryReport) -> None:
    from rich.table import Table

    output.json(report)
    predicted = report.predicted
    table = Table(title=f"predicted peak memory: {report.base} + {', '.join(report.adapters)}", title_justify="left")
    for column in ("path", "host RAM", "GPU", "fits in available RAM"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for path in predicted.paths:
        gpu = human_bytes(path.gpu_bytes) if path.gpu_bytes is not None else "-"
        table.add_row(path.name, human_bytes(path.peak_bytes), gpu, "yes" if path.fits else "NO")
    output.table(table)
    output.line(
        f"this machine: {human_bytes(predicted.total_ram_bytes)} RAM, {human_bytes(predicted.available_ram_bytes)} "
        f"available; base {human_bytes(predicted.base_bytes)}, adapter {human_bytes(predicted.adapter_bytes)}, "
        f"{predicted.tensors_edited} tensors edited (largest working set: {predicted.largest_edited_tensor})"
    )
    for path in predicted.paths:
        terms = ", ".join(f"{name} {human_bytes(value)}" for name, value in path.terms.items() if value)
        output.line(f"  {path.name} = {terms}")
    for key, measured in report.measured.items():
        if measured.error:
            output.warn(f"{measured.path} failed: {measured.error}")
            continue
        timeline = Table(title=f"measured: {measured.path}", title_justify="left")
        for column in ("phase", "seconds", "peak anonymous", "peak file-backed"):
            timeline.add_column(column, justify="left" if column == "phase" else "right")
        for phase in measured.phases:
            timeline.add_row(
                phase.phase,
                f"{phase.seconds:.2f}",
                human_bytes(phase.peak_anon_bytes),
                human_bytes(phase.peak_file_bytes),
            )
        output.table(timeline)
        guess = predicted.streaming_peak_bytes if key == "streaming" else None
        if key.startswith("in_memory"):
            guess = predicted.in_memory_fp32_peak_bytes if "float32" in key else predicted.in_memory_peak_bytes
        if key == "streaming":
            line = f"peak anonymous {human_bytes(measured.peak_anon_bytes)} vs predicted {human_bytes(guess)}"
        else:
            line = f"peak resident {human_bytes(measured.peak_rss_bytes)} vs predicted {human_bytes(guess)}"
        output.line(f"{measured.path}: {line} ({measured.seconds:.1f} s)")
        if measured.peak_gpu_bytes is not None:
            output.line(
                f"  peak GPU memory {human_bytes(measured.peak_gpu_bytes)} vs predicted "
                f"{human_bytes(predicted.streaming_gpu_bytes)}"
            )


def memory_command(
    base: Annotated[str, typer.Argument(help="Base model: a local folder or a Hub repo id.", show_default=False)],
    adapter: Annotated[
        list[str], typer.Argument(help="Adapter(s): folders or Hub ids, each optionally ADAPTER@WEIGHT.")
    ],
    device: DeviceOpt = "auto",
    measure: Annotated[
        bool, typer.Option("--measure", help="Run loractl's merge into a temporary folder and sample RAM by phase.")
    ] = False,
    measure_reference: Annotated[
        bool,
        typer.Option(
            "--measure-reference",
            help="Also run transformers + PEFT (load, merge_and_unload, save) in a subprocess, in the base's dtype "
            "and in float32 (needs peft).",
        ),
    ] = False,
    revision: RevisionOpt = None,
    adapter_revision: AdapterRevisionOpt = None,
    allow_empty: AllowEmptyOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Predict the peak memory of merging ADAPTER into BASE, the usual way and with loractl, before running anything.

    The usual way (transformers loads the whole base, PEFT merge_and_unload, save) needs the whole model in
    memory, in its dtype or upcast to float32; loractl's streaming merge needs this process plus a few tensors
    (the largest edited tensor in fp32, and the pipeline's read-ahead and write-behind). Both are shown against
    this machine's total and available RAM. --measure runs the merge and prints RAM by phase, anonymous memory
    apart from file-backed pages (page cache of the shards, which the kernel can reclaim).
    """
    from lora_cli.memory import memory_report, reference_available
    from lora_cli.resolve import resolve

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug, json_output=json_output, done="the report had been made"):
        if device == "auto":  # a GPU prediction (and measurement) where one is present, as the merge would use it
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if measure_reference and not reference_available():
            raise InputError("--measure-reference needs peft and transformers", fix="pip install peft")
        if measure_reference and len(adapter) != 1:
            raise InputError("--measure-reference takes exactly one adapter")
        base_source = resolve(base, role="base", revision=revision)
        specs = resolve_adapters(adapter, adapter_revision, allow_empty)
        report = memory_report(
            base_source,
            specs,
            device=device,
            measure=measure,
            measure_reference_dtypes=("auto", "float32") if measure_reference else (),
        )
    render_memory(output, report)
