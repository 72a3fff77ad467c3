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
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "dual_queue", "dip"]),
              default="dip", show_default=True,
              help="dip: DIP's per-batch search scored by SEMU (calibrated on this CPU at the first batch); "
                   "or a static schedule")
@click.option("--chunks", type=int, default=None, help="stages per rank (virtual stages)")
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--microbatches", type=int, default=4, show_default=True)
@click.option("--samples-per-microbatch", type=int, default=2, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--executor", type=click.Choice(["gloo", "local"]), default="gloo", show_default=True,
              help="gloo: one process per rank over torch.distributed; local: all ranks in this process")
@click.option("--search-s", "search_s", type=float, default=0.0, show_default=True,
              help="with --schedule dip: seconds per batch of phase 1's MCTS over segment priorities")
@click.option("--async-plan/--sync-plan", default=None,
              help="plan batch i+1 on a CPU worker while batch i trains [default: when a core is spare]")
def demo(**kwargs) -> None:
    """Train a tiny example model pipelined on CPU: prints the plan, loss and step time."""
    from dipc.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**kwargs))


@cli.command(context_settings={"show_default": True})
@click.option("--model", type=click.Choice(["vlm", "audio_llm", "t2v"]), default="vlm")
@click.option("--pp", type=int, default=2, help="pipeline ranks; the world size must be a multiple (DP = world / pp)")
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "dual_queue", "dip"]),
              default="1f1b", help="a static schedule, or dip: DIP's per-batch search scored by SEMU")
@click.option("--chunks", type=int, default=None, help="stages per rank (virtual stages)")
@click.option("--steps", type=int, default=20)
@click.option("--microbatches", type=int, default=4, help="per global batch (split over the DP replicas)")
@click.option("--samples-per-microbatch", type=int, default=2)
@click.option("--lr", type=float, default=3e-3)
@click.option("--seed", type=int, default=0)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None)
@click.option("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: never)")
@click.option("--resume", is_flag=True, help="continue from --checkpoint-dir exactly")
@click.option("--async-plan", is_flag=True, help="plan batch i+1 on a CPU worker while batch i trains")
@click.option("--search-s", "search_s", type=float, default=0.0,
              help="with --schedule dip: seconds per batch of phase 1's MCTS over segment priorities")
@click.option("--timeout", "timeout_s", type=float, default=60.0, help="seconds any rank waits for a peer")
@click.option("--nproc", type=int, default=None, help="without torchrun: processes to spawn here [default: pp]")
def run(**kwargs) -> None:
    """Train pipelined (x data parallel) under torchrun: `torchrun --nproc-per-node 4 -m dipc.run --pp 2`."""
    from dipc.run import RunConfig, run as run_job

    try:
        run_job(RunConfig(**kwargs))
    except DipcError as e:
        raise click.ClickException(str(e).splitlines()[0]) from None


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), default="profile.json", show_default=True,
              help="where to write the profile JSON")
@click.option("--quick", is_flag=True, help="fewer sizes and repetitions (about 3 s)")
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
               + f", {dev.memory_bandwidth / 1e9:.1f} GB/s, launch {dev.launch_overhead * 1e6:.1f} us"
               + (f", checkpointing per op: selective {dev.sac_op_overhead * 1e6:.1f} us, "
                  f"full {dev.ckpt_op_overhead * 1e6:.1f} us" if dev.kind == "cpu" else ""))


@cli.command()
@click.option("--model", type=click.Choice(["vlm", "audio_llm", "t2v"]), default="vlm", show_default=True)
@click.option("--stages", type=int, default=4, show_default=True, help="pipeline ranks")
@click.option("--chunks", type=int, default=2, show_default=True,
              help="stages per rank: with 2, every modality's segment is spread over the ranks")
@click.option("--microbatches", type=int, default=8, show_default=True)
@click.option("--profile", default="h800", show_default=True, help="device/cluster preset or profile JSON")
@click.option("--out", type=click.Path(dir_okay=False), default="dipc-trace.png", show_default=True,
              help="Gantt chart PNG; Chrome traces go next to it (<out>.<schedule>.json)")
@click.option("--seed", type=int, default=0, show_default=True)
def trace(model: str, stages: int, chunks: int, microbatches: int, profile: str, out: str, seed: int) -> None:
    """Predicted timeline of one skewed batch: (interleaved) 1F1B next to DIP's dual-queue schedule on the
    same stages (PNG + Chrome traces)."""
    from pathlib import Path

    import dipc
    from dipc.semu.compare import compare_schedules
    from dipc.semu.gantt import plot_gantt
    from dipc.semu.trace import write_chrome_trace
    from examples.data import make_example

    ex = make_example(model, seed=seed)
    mbs = ex.data.microbatches(microbatches, 2)
    for name in ex.data.EDGE_CASES:     # the skew real batches have: empty and huge items
        mbs[len(mbs) // 2] = ex.data.edge_case(name)
    baselines = ("1f1b",) if chunks == 1 else ("interleaved_1f1b",)
    # with chunks > 1 every modality module is spread over all ranks (DIP's placement), so the
    # per-batch schedule can move work between vision and text as the batch demands
    pipe = dipc.compile(ex.model, mbs[0], num_stages=stages, chunks=chunks, schedule=baselines[0],
                        loss_weight=ex.loss_weight, segments="spread" if chunks > 1 else "cost")
    with click.progressbar(length=3, label="planning and simulating") as bar:
        results = compare_schedules(pipe, mbs, baselines, profile=profile)
        bar.update(2)
        png = plot_gantt(results, out, title=f"{model}, {stages} ranks, {microbatches} skewed microbatches, {profile}")
        bar.update(1)
    for label, res in results.items():
        write_chrome_trace(res, Path(out).with_suffix(f".{label.replace(' ', '_')}.json"))
        click.echo(f"{label:>16}: step {res.step_time * 1e3:8.3f} ms  bubble {res.bubble_fraction:6.1%}")
    click.echo(f"wrote {png}")


_MODELS = click.Choice(["vlm", "audio_llm", "t2v"])
_STATIC = ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "dual_queue"]
_SCHEDULES = [*_STATIC, "dip"]   # dip: DIP's per-batch search scored by SEMU


def _example_pipeline(model: str, stages: int, chunks: int | None, schedule: str, microbatches: int, seed: int,
                      sub_microbatches: tuple[str, ...] = ()):
    """A compiled example pipeline and one batch of its skewed synthetic data."""
    import dipc
    from examples.data import make_example

    subs = {}
    for item in sub_microbatches:
        mod, _, n = item.partition("=")
        if not mod or not n.isdigit():
            raise click.BadParameter(f"{item!r}. Fix: write MODALITY=N, e.g. vision=4.",
                                     param_hint="--sub-microbatches")
        subs[mod] = int(n)
    ex = make_example(model, seed=seed)
    mbs = ex.data.microbatches(microbatches, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=stages, chunks=chunks, schedule=schedule,
                        loss_weight=ex.loss_weight, sub_microbatches=subs or None)
    return pipe, mbs


def _example_batch_options(command):
    """The options naming an example model, its pipeline and one batch (plan, dump)."""
    for option in reversed([
        click.option("--model", type=_MODELS, default="vlm", show_default=True),
        click.option("--stages", type=int, default=2, show_default=True, help="pipeline ranks"),
        click.option("--chunks", type=int, default=None, help="stages per rank (virtual stages)"),
        click.option("--schedule", type=click.Choice(_SCHEDULES), default="1f1b", show_default=True),
        click.option("--microbatches", type=int, default=4, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--sub-microbatches", "sub_microbatches", multiple=True, metavar="MODALITY=N",
                     help="split a modality into sub-microbatches of N items (repeatable), e.g. vision=2"),
    ]):
        command = option(command)
    return command


@cli.command()
@_example_batch_options
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="write the program here (.txt text dump and .json next to it); default: print it")
@click.option("--memory-limit-mib", type=float, default=None,
              help="per-rank memory limit on SEMU's model of this machine ($DIPC_PROFILE to name another): "
                   "recompute layers to fit (DIP phase 3)")
def plan(model, stages, chunks, schedule, microbatches, seed, sub_microbatches, out, memory_limit_mib) -> None:
    """Plan one batch of an example model: the validated per-rank instruction streams."""
    from dipc.ir.text import dump_program

    pipe, mbs = _example_pipeline(model, stages, chunks, schedule, microbatches, seed, sub_microbatches)
    program = pipe.plan(mbs, memory_limit=None if memory_limit_mib is None else memory_limit_mib * 2**20)
    if out is None:
        click.echo(dump_program(program), nl=False)
        return
    try:
        path = pipe.dump(program, out)
    except OSError as e:
        raise click.ClickException(f"cannot write {out!r}: {e.strerror}. Fix: pick a writable path with --out.")
    click.echo(f"wrote {path} and {path.with_suffix('.json')}")


@cli.command()
@_example_batch_options
@click.option("--out", type=click.Path(file_okay=False), default="dipc-dump", show_default=True)
@click.option("--measure", is_flag=True,
              help="also run the step here (local executor) and dump its measured timeline "
                   "(measured.json, measured.png)")
def dump(model, stages, chunks, schedule, microbatches, seed, sub_microbatches, out, measure) -> None:
    """Write every dump of one planned batch: program text/JSON, per-rank streams, pipelining CSV,
    partition with SEMU costs, SEMU Chrome trace and Gantt PNG (with --measure: the measured step)."""
    from dipc.dump import dump_step

    pipe, mbs = _example_pipeline(model, stages, chunks, schedule, microbatches, seed, sub_microbatches)
    program = pipe.plan(mbs)
    measured = pipe.step(mbs, program, record_timeline=True).timeline if measure else None
    try:
        directory = dump_step(pipe, program, mbs, out, measured=measured)
    except DipcError as e:
        raise click.ClickException(str(e)) from None
    for f in sorted(directory.iterdir()):
        click.echo(str(f))
    if measured is not None:
        click.echo(measured.summary())


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def show(path: str) -> None:
    """Read a program dump (.txt or .json), validate it, check it against NCCL's ordered P2P
    streams as the GPU runtime launches it, and print the rank x step grid."""
    from pathlib import Path

    from dipc.ir.jsonio import loads
    from dipc.ir.stream_order import stream_wait_cycle
    from dipc.ir.text import format_grid, parse_program
    from dipc.ir.validate import validate

    text = Path(path).read_text()
    program = loads(text) if path.endswith(".json") else parse_program(text)
    validate(program)
    click.echo(f"{path}: valid, schedule {program.schedule}, {program.num_ranks} ranks, "
               f"{program.num_microbatches} microbatches, {sum(len(s) for s in program.streams)} instructions")
    # the GPU runtime's policy: one process group per message direction, receives one compute ahead
    cycle = stream_wait_cycle(program, lookahead=1, peer_ordered=True, streams="direction")
    click.echo("NCCL streams (one per message direction): no wait cycle" if cycle is None else
               "NCCL streams (one per message direction): WAIT CYCLE, this program would hang on GPUs:\n  "
               + "\n  ".join(cycle))
    click.echo(format_grid(program))


@cli.command()
@click.option("--model", type=_MODELS, default="vlm", show_default=True)
@click.option("--stages", type=int, default=4, show_default=True, help="pipeline ranks")
@click.option("--chunks", type=int, default=1, show_default=True, help="stages per rank (virtual stages)")
@click.option("--schedules", default="gpipe,1f1b,zb_h1", show_default=True, help="comma-separated baselines")
@click.option("--microbatches", type=int, default=8, show_default=True)
@click.option("--batches", type=int, default=5, show_default=True, help="skewed batches to average over")
@click.option("--profile", default="h800", show_default=True, help="device/cluster preset or profile JSON")
@click.option("--seed", type=int, default=0, show_default=True)
def simulate(model, stages, chunks, schedules, microbatches, batches, profile, seed) -> None:
    """Compare schedules on SEMU for an example model over several skewed batches (DIP included)."""
    import statistics

    import dipc
    from dipc.semu.compare import compare_schedules
    from examples.data import make_example

    names = [s.strip() for s in schedules.split(",") if s.strip()]
    unknown = [s for s in names if s not in _STATIC]   # DIP's plan is always in the table
    if unknown:
        raise click.ClickException(f"unknown schedule(s) {unknown}. Fix: choose from {', '.join(_STATIC)}.")
    ex = make_example(model, seed=seed)
    first = ex.data.microbatches(1, 2)[0]
    pipe = dipc.compile(ex.model, first, num_stages=stages, chunks=chunks, schedule="gpipe",
                        loss_weight=ex.loss_weight, segments="spread" if chunks > 1 else "cost")
    times: dict[str, list[float]] = {}
    with click.progressbar(range(batches), label="simulating") as bar:
        for _ in bar:
            results = compare_schedules(pipe, ex.data.microbatches(microbatches, 2), names, profile=profile)
            for label, res in results.items():
                times.setdefault(label.split(":")[0], []).append(res.step_time)
    base = times.get("1f1b") or next(iter(times.values()))
    click.echo(f"{'schedule':<20}{'mean step (ms)':>16}{'vs 1f1b':>10}")
    for label, ts in times.items():
        click.echo(f"{label:<20}{statistics.mean(ts) * 1e3:>16.3f}"
                   f"{statistics.mean(b / t for b, t in zip(base, ts)):>9.2f}x")


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
