"""The dipc command line (click: a well-kept CLI library, so options, help and errors come for free)."""
from __future__ import annotations

import sys

import click

from dipc.errors import DipcError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """dipc: dynamic interleaved pipeline-parallel training for multimodal models."""


@cli.command()
@click.option("--model", type=click.Choice(["vlm", "audio_llm", "t2v"]), default="vlm", show_default=True)
@click.option("--stages", type=int, default=2, show_default=True, help="pipeline ranks")
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "dual_queue"]),
              default="1f1b",
              show_default=True)
@click.option("--chunks", type=int, default=None, help="stages per rank (virtual stages)")
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--microbatches", type=int, default=4, show_default=True)
@click.option("--samples-per-microbatch", type=int, default=2, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--executor", type=click.Choice(["gloo", "local"]), default="gloo", show_default=True,
              help="gloo: one process per rank over torch.distributed; local: all ranks in this process")
def demo(**kwargs) -> None:
    """Train a tiny example model pipelined on CPU: prints the plan, loss and step time."""
    from dipc.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**kwargs))


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), default="profile.json", show_default=True,
              help="where to write the profile JSON")
@click.option("--quick", is_flag=True, help="fewer sizes and repetitions (about 2 s)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="default: cuda if present")
def profile(out: str, quick: bool, device: str | None) -> None:
    """Measure this machine (matmul throughput per dtype, memory bandwidth, per-op overhead) and
    write a SEMU device profile."""
    from dipc.semu.profile_machine import measure_profile

    try:
        prof = measure_profile(out, quick=quick, device=device)
    except OSError as e:
        raise click.ClickException(f"cannot write {out!r}: {e.strerror}. Fix: pick a writable path with --out.")
    dev = prof.device
    click.echo(f"wrote {out}: {dev.name}, " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in dev.peak_flops.items())
               + f", {dev.memory_bandwidth / 1e9:.1f} GB/s, launch {dev.launch_overhead * 1e6:.1f} us")


@cli.command()
def presets() -> None:
    """List the built-in device/cluster profiles."""
    from dipc.semu.profiles import list_presets

    for name in list_presets():
        click.echo(name)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except DipcError as e:
        click.echo(f"dipc: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
