"""dipc's distributed runtime vs ``torch.distributed.pipelining`` on the same model, partition and batches.

Measured on CPU with gloo (2 processes, one thread each), in one run:

1. **static**: a LLaMA-style text chain (embedding -> N ``LlamaBlock`` -> RMSNorm -> head, cross-entropy
   loss), every microbatch the same shape, schedules 1F1B and interleaved 1F1B (2 chunks per rank):
   steps/s of dipc and of ``PipelineStage`` + ``Schedule1F1B`` / ``ScheduleInterleaved1F1B``.
2. **skewed**: one sequence per microbatch, lengths drawn from a lognormal distribution (different
   per microbatch and per step). dipc runs them unpadded (its per-batch plan carries every message's
   shape); torch.distributed.pipelining needs one shape per step, so every microbatch is padded to
   the batch's longest (labels -100 on padding), and a new ``PipelineStage`` + schedule is built
   whenever that length changes (static metadata via ``input_args``/``output_args``, cached per
   length). Steps/s and real tokens/s.
3. **overhead**: dipc's interpreter time per executed instruction outside the stage modules' forward,
   autograd backward, P2P waits and the optimizer step (instrumented run, see ``_instrumented``), and
   next to it the same measurement of torch.distributed.pipelining's runtime (Schedule1F1B): its
   ``schedule.step`` time outside forward, loss, autograd, P2P posting and waits, per action (stage
   forward, ``backward_one_chunk``, ``isend``, ``irecv``), from the same two processes alternating
   step by step with dipc's (see ``_TorchProbe``); both with and without releasing finished graphs.

Both systems run in the same two processes, alternating step by step and taking turns going
first (so machine noise and any order effect hit both alike), from the same initial weights (same
seed), with SGD, on identical batches; the loss is the token-weighted mean in both (dipc's default
loss weights; torch's ``loss_fn`` sums and divides by the batch's real-token count,
``scale_grads=False``), and the benchmark checks that both report the same loss every step. The
first ``--warmup`` steps are excluded; medians over ``--steps`` steps. A step's time is the slower
rank's, between a barrier and the step's return (for dipc: planning,
interpreter, loss all-reduce; for torch: stage/schedule set-up when the shape changed, the
schedule and the optimizer step). The ratio is given three ways: of the two median step times; of
the two total times over the timed steps (the throughput over the same batches), with a paired
bootstrap 95% interval, on which the targets are judged; and the median of the per-step ratios
(each batch ran on both systems back to back, so drift of the shared machine cancels), with its
interval.

Usage::

    python benchmarks/runtime_vs_torch_pipelining.py [--steps 12] [--layers 8] [--profile]
    python benchmarks/runtime_vs_torch_pipelining.py --overhead-only --overhead-modes distributed --steps 9

Prints a table and writes ``benchmarks/results/runtime_vs_torch_pipelining.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dipc  # noqa: E402
from dipc.runtime.launch import spawn  # noqa: E402
from examples.models.layers import LlamaBlock, RMSNorm, RotaryEmbedding  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_vs_torch_pipelining.json"
SEED = 0
LR = 1e-3


# -- model, batches, partition -------------------------------------------------------------------
class TinyLlama(nn.Module):
    """LLaMA-style text-only chain: embedding -> blocks -> RMSNorm -> LM head; returns the mean
    cross-entropy over label tokens (-100 = ignored)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, inter: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.rotary_emb = RotaryEmbedding(dim // heads)
        self.layers = nn.ModuleList([LlamaBlock(dim, heads, kv_heads, inter) for _ in range(layers)])
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(torch.arange(input_ids.shape[1], device=input_ids.device))
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


class ChainStage(nn.Module):
    """The torch.distributed.pipelining stage for a contiguous run of TinyLlama's layers (the same
    layer paths as dipc's stage; parameters shared with the model, not copied)."""

    def __init__(self, model: TinyLlama, paths: list[str]):
        super().__init__()
        order = ["embed_tokens"] + [f"layers.{i}" for i in range(len(model.layers))] + ["norm", "lm_head"]
        idx = [order.index(p) for p in paths]
        assert idx == list(range(idx[0], idx[0] + len(idx))), f"stage layers {paths} are not a contiguous run"
        self.embed = model.embed_tokens if "embed_tokens" in paths else None
        self.rotary = model.rotary_emb
        self.blocks = nn.ModuleList([model.get_submodule(p) for p in paths if p.startswith("layers.")])
        self.final_norm = model.norm if "norm" in paths else None
        self.head = model.lm_head if "lm_head" in paths else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device))
        for block in self.blocks:
            h = block(h, cos, sin)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.head is not None:
            h = self.head(h)
        return h


def build_model(cfg: dict) -> TinyLlama:
    torch.manual_seed(SEED)
    return TinyLlama(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["inter"])


def make_batches(cfg: dict, scenario: str, num_steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, the microbatches as (input_ids [b, L], labels [b, L]), unpadded. Deterministic."""
    g = torch.Generator().manual_seed(1234 if scenario == "static" else 4321)
    steps = []
    for _ in range(num_steps):
        mbs = []
        for _ in range(cfg["microbatches"]):
            if scenario == "static":
                b, length = cfg["static_mb_size"], cfg["static_seq"]
            else:
                b = 1
                z = float(torch.randn((), generator=g))
                length = int(round(math.exp(math.log(cfg["skew_median"]) + cfg["skew_sigma"] * z)))
                length = max(cfg["skew_min"], min(cfg["skew_max"], length))
            ids = torch.randint(0, cfg["vocab"], (b, length), generator=g)
            labels = torch.randint(0, cfg["vocab"], (b, length), generator=g)
            mbs.append((ids, labels))
        steps.append(mbs)
    return steps


def padded_batch(mbs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What a torch.distributed.pipelining user feeds: the whole batch padded to its longest sequence
    (pad token 0, label -100). Returns (input_ids [M*b, Lmax], labels, Lmax)."""
    lmax = max(ids.shape[1] for ids, _ in mbs)
    ids = torch.cat([F.pad(i, (0, lmax - i.shape[1]), value=0) for i, _ in mbs])
    labels = torch.cat([F.pad(l, (0, lmax - l.shape[1]), value=-100) for _, l in mbs])
    return ids, labels, lmax


def compile_dipc(model: nn.Module, cfg: dict, schedule: str):
    ex_ids = torch.zeros(cfg["static_mb_size"], cfg["static_seq"], dtype=torch.long)
    layers = ["embed_tokens"] + [f"layers.{i}" for i in range(cfg["layers"])] + ["norm", "lm_head"]
    return dipc.compile(model, {"input_ids": ex_ids, "labels": ex_ids}, num_stages=2, schedule=schedule,
                        layers=layers, optimizer=lambda ps: torch.optim.SGD(ps, lr=LR))


# -- torch.distributed.pipelining side ------------------------------------------------------------
class TorchPipeline:
    """PipelineStage(s) + Schedule1F1B / ScheduleInterleaved1F1B over the given stage layer split;
    one (stages, schedule) per padded sequence length, built on first use."""

    def __init__(self, model: TinyLlama, cfg: dict, rank: int, stage_layers: list[list[str]], schedule: str):
        self.model, self.cfg, self.rank, self.schedule = model, cfg, rank, schedule
        self.num_stages = len(stage_layers)
        self.my_stages = [s for s in range(self.num_stages) if s % 2 == rank]
        self.modules = {s: ChainStage(model, stage_layers[s]) for s in self.my_stages}
        params = [p for s in self.my_stages for p in self.modules[s].parameters()]
        self.optimizer = torch.optim.SGD(list(dict.fromkeys(params)), lr=LR)
        self.cache: dict[int, Any] = {}
        self.denominator = 1.0   # real label tokens of the current batch
        self.setup_s = 0.0

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                               reduction="sum") / self.denominator

    def _schedule_for(self, mb_size: int, length: int):
        key = (mb_size, length)
        if key not in self.cache:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

            t0 = time.perf_counter()
            c = self.cfg
            stages = []
            for s in self.my_stages:
                # requires_grad on the float activations: that is how static metadata tells the
                # stage that gradients flow back across the boundary
                hidden = torch.empty(mb_size, length, c["dim"], requires_grad=True)
                inp = torch.zeros(mb_size, length, dtype=torch.long) if s == 0 else hidden
                out = torch.empty(mb_size, length, c["vocab"]) if s == self.num_stages - 1 else hidden
                stages.append(PipelineStage(self.modules[s], s, self.num_stages, torch.device("cpu"),
                                            input_args=(inp,), output_args=(out,)))
            m = c["microbatches"]
            if self.schedule == "1f1b":
                sched = Schedule1F1B(stages[0], n_microbatches=m, loss_fn=self.loss_fn, scale_grads=False)
            else:
                sched = ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=self.loss_fn, scale_grads=False)
            self.cache[key] = sched
            self.setup_s += time.perf_counter() - t0
        return self.cache[key]

    def step(self, ids: torch.Tensor, labels: torch.Tensor, denominator: float) -> float | None:
        self.denominator = denominator
        sched = self._schedule_for(ids.shape[0] // self.cfg["microbatches"], ids.shape[1])
        first, last = 0 in self.my_stages, self.num_stages - 1 in self.my_stages
        losses: list[torch.Tensor] = []
        args = (ids,) if first else ()
        if last:
            sched.step(*args, target=labels, losses=losses, return_outputs=False)
        else:
            sched.step(*args, return_outputs=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(sum(l.detach() for l in losses)) if last else None


# -- the per-process benchmark ---------------------------------------------------------------------
def _bench(rank: int, world: int, cfg: dict, scenario: str, schedule: str, num_steps: int, warmup: int,
           profile: bool, profile_clock: str = "wall") -> dict:
    """Both systems in this process, alternating step by step on identical batches."""
    import torch.distributed as dist

    from dipc.runtime.distributed import run_step_distributed

    from dipc.runtime.async_plan import broadcast_program

    torch.set_num_threads(1)
    batches = make_batches(cfg, scenario, warmup + num_steps)
    dipc_model, torch_model = build_model(cfg), build_model(cfg)
    pipe = compile_dipc(dipc_model, cfg, schedule)
    stage_layers = [list(s.layers) for s in pipe.stages]
    dip = schedule == "dip"
    if dip:   # torch's side runs the static schedule of the same layout: 2 chunks per rank, round robin
        assert [s.rank for s in pipe.stages] == [s % 2 for s in range(len(pipe.stages))], "layout differs from torch's"
    tp = TorchPipeline(torch_model, cfg, rank, stage_layers, "interleaved_1f1b" if dip else schedule)
    if dip:   # SEMU fitted to this pipeline's local steps on rank 0, then to gloo steps on both ranks
        calib = [[{"input_ids": i, "labels": l} for i, l in mbs] for mbs in batches[:2]]
        if rank == 0:
            pipe.calibrate(calib[:1])
        if not os.environ.get("DIPC_NO_GLOO_CALIBRATION"):
            pipe.calibrate_distributed(calib)
    out: dict[str, Any] = {"stage_layers": stage_layers, "dipc": [], "torch": [], "dipc_loss": [], "torch_loss": [],
                           "instructions": [], "plan_ms": [], "torch_setup_s": [], "dip_plan_s": [],
                           "dip_picked": [], "first": []}
    # "cpu": this thread's CPU clock, so time spent descheduled or blocked in a wait drops out
    new_prof = (lambda: cProfile.Profile(time.thread_time)) if profile_clock == "cpu" else cProfile.Profile
    profs = {"dipc": new_prof(), "torch": new_prof()} if profile else {}
    for k, mbs in enumerate(batches):
        dipc_mbs = [{"input_ids": i, "labels": l} for i, l in mbs]
        denom = float(sum((l != -100).sum() for _, l in mbs))
        ids, labels, _ = padded_batch(mbs)

        program = None
        if dip:
            # DIP's plan, made on rank 0 (its SEMU profile calibrated on its own steps at the first
            # plan) and broadcast, as `dipc run` does; timed apart from the step (see run_case)
            t0 = time.perf_counter()
            program = broadcast_program(pipe.plan(dipc_mbs) if rank == 0 else None)
            out["dip_plan_s"].append(time.perf_counter() - t0)
            out["dip_picked"].append(program.schedule)
        def dipc_step() -> None:
            dist.barrier()
            if profs and k >= warmup:
                profs["dipc"].enable()
            t0 = time.perf_counter()
            res = run_step_distributed(pipe, dipc_mbs, program=program, timeout_s=120)
            t1 = time.perf_counter()
            if profs:
                profs["dipc"].disable()
            out["dipc"].append(t1 - t0)
            out["dipc_loss"].append(res.loss)
            out["plan_ms"].append(pipe.history[-1][2])
            out["instructions"].append(len(res.program.streams[rank]))

        def torch_step() -> None:
            dist.barrier()
            setup0 = tp.setup_s
            if profs and k >= warmup:
                profs["torch"].enable()
            t0 = time.perf_counter()
            loss = tp.step(ids, labels, denom)
            t1 = time.perf_counter()
            if profs:
                profs["torch"].disable()
            out["torch"].append(t1 - t0)
            out["torch_setup_s"].append(tp.setup_s - setup0)
            out["torch_loss"].append(loss)

        # the two systems take turns going first, so an order effect (running right after the
        # other system's step) falls on both alike; with dipc always first, two runs gave static
        # 1F1B 0.96x and a turn-taking run 1.09x: step times drift 5-10% on a shared VM
        first = "dipc" if k % 2 == 0 else "torch"
        out["first"].append(first)
        for run in ((dipc_step, torch_step) if first == "dipc" else (torch_step, dipc_step)):
            run()
    for name, prof in profs.items():
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s); st.sort_stats("tottime").print_stats(20)
        st.print_stats("dipc/" if name == "dipc" else "distributed/", 40)   # each runtime's own functions
        s.write("tottime by origin, ms per step: " + ", ".join(
            f"{k} {v / num_steps * 1e3:.2f}" for k, v in _tottime_by_origin(st).items()) + "\n")
        out[f"profile_{name}"] = s.getvalue()
    return out


def _tottime_by_origin(st: pstats.Stats) -> dict[str, float]:
    """A profile's own time (tottime) summed by where the code lives: tells a runtime's Python
    (what the overhead figures count) from compute, autograd and communication. cProfile charges
    what a frame's locals free on return to the caller: the graph a torch ``backward_one_chunk``
    drops shows up as ``_step_microbatches``' own time (first stage; the last stage's losses hold
    theirs past the step)."""
    out: dict[str, float] = {}
    for (path, _, name), (_, _, tottime, _, _) in st.stats.items():  # type: ignore[attr-defined]
        if "torch/distributed/pipelining/" in path:
            k = "torch.distributed.pipelining python"
        elif "/dipc/" in path:
            k = "dipc python"
        elif "torch/distributed/" in path:
            k = "torch.distributed (c10d) python"
        elif path == "~" and "run_backward" in name:
            k = "autograd engine"
        elif path == "~" and "_distributed_c10d" in name:
            k = "process group calls (send/recv/wait)"
        elif path == "~":
            k = "other C calls (tensor ops, builtins)"
        elif "torch/nn/" in path or "examples/models/" in path or path.endswith("runtime_vs_torch_pipelining.py"):
            k = "model, loss and nn.Module python"
        else:
            k = "other python"
        out[k] = out.get(k, 0.0) + tottime
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- interpreter overhead (instrumented) ------------------------------------------------------------
PARTS = ("init", "run", "fwd", "autograd", "wait", "post", "optim", "free")


@contextlib.contextmanager
def _clocked(wall: dict, cpu: dict, key: str):
    """Add the block's wall and thread CPU time to ``wall[key]`` / ``cpu[key]``."""
    w0, c0 = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        wall[key] += time.perf_counter() - w0
        cpu[key] += time.thread_time() - c0


def _outermost_timer(wall: dict, cpu: dict, active: list[bool], counts: dict | None = None):
    """``timed(fn, key, count=None)``: ``fn`` wrapped to add its wall and thread CPU time to
    ``wall[key]`` / ``cpu[key]`` while ``active[0]``, outermost timed region only (an isend inside
    batch_isend_irecv, autograd inside a wait: counted once), and, with ``count``, to bump
    ``counts[count]`` on every active call, nested or not."""
    depth = [0]

    def timed(fn, key: str, count: str | None = None):
        def wrapper(*a, **kw):
            if not active[0]:
                return fn(*a, **kw)
            if count is not None:
                counts[count] += 1
            if depth[0]:
                return fn(*a, **kw)
            depth[0] += 1
            try:
                with _clocked(wall, cpu, key):
                    return fn(*a, **kw)
            finally:
                depth[0] -= 1
        return wrapper
    return timed


def _instrumented(rank: int, world: int, cfg: dict, scenario: str, num_steps: int, warmup: int,
                  mode: str = "distributed", with_torch: bool = False) -> dict:
    """dipc's real distributed step (``mode="local"``: the local executor, both ranks' streams in
    this one process, no P2P and no second process competing for the cores) with timers around everything that is *not* the interpreter:
    stage forward (each stage module's call, timed from outside), ``torch.autograd.backward``/``grad`` (patched), posting P2P
    (the process group's send/recv, ``DistributedTransport._isend``/``_irecv``, and the
    copy packing a multi-value message into one buffer, ``transport._pack``; for the local executor
    its message copy, ``LocalTransport._copy``), every P2P wait (``DistributedTransport._wait``, and the
plan check's all-gather, ``ProgramCheck.wait``, which the first message waits for) and the
    optimizer step. Interpreter overhead = ``RankInterpreter.__init__`` + ``run()`` minus those, per
    executed instruction, on the wall clock and on this thread's CPU clock (``time.thread_time``:
    immune to being descheduled, which happens with 2 processes + gloo threads on 2 cores).

    Releasing a finished microbatch's autograd graph and tensors (``RankInterpreter._release``,
    timed as ``free``) counts as overhead; ``*_excl_free`` rows give the figure without it (any
    eager runtime, torch.distributed.pipelining included, frees the same graph). The per-opcode
    breakdown wraps every handler in timers of its own, so it is taken on alternate steps and the
    totals on the others: the breakdown's timers do not inflate the totals.

    ``with_torch`` (distributed only): after each dipc step, torch.distributed.pipelining's 1F1B
    step on the same batch, measured by ``_TorchProbe`` (its rows come back as ``torch_rows``):
    both runtimes alternate in the same processes, so load on the machine hits both alike."""
    import torch.distributed as dist

    import dipc.runtime.distributed as dd
    from dipc.runtime.interpreter import RankInterpreter
    import dipc.runtime.transport as dt
    from dipc.runtime.transport import DistributedTransport, LocalTransport

    torch.set_num_threads(1)
    probe = _TorchProbe() if with_torch else None   # its patches first: dipc's timers wrap them
    wall = dict.fromkeys(PARTS, 0.0)
    cpu = dict.fromkeys(PARTS, 0.0)
    active = [False]   # only inside RankInterpreter.run (planning also runs the stage modules)
    timed = _outermost_timer(wall, cpu, active)

    # the transports' data movement counts with P2P posting: the local executor's message copy,
    # and the copy that packs a multi-value message into one buffer per dtype for gloo
    LocalTransport._copy = staticmethod(timed(LocalTransport._copy, "post"))
    dt._pack = timed(dt._pack, "post")

    class TimedTransport(DistributedTransport):
        _wait = timed(DistributedTransport._wait, "wait")
        _isend = timed(DistributedTransport._isend, "post")   # the process group's send/recv calls
        _irecv = timed(DistributedTransport._irecv, "post")

    by_op: dict[str, list[float]] = {}   # op -> [calls, wall residual, cpu residual]
    breakdown = [False]   # this step wraps every handler (alternate steps; see the docstring)
    inner = ("fwd", "autograd", "wait", "post", "optim")

    def per_op(op: str, handler):
        def wrapper(instr):
            w_in, c_in = sum(wall[p] for p in inner), sum(cpu[p] for p in inner)
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return handler(instr)
            finally:
                acc = by_op.setdefault(op, [0, 0.0, 0.0])
                acc[0] += 1
                acc[1] += time.perf_counter() - w0 - (sum(wall[p] for p in inner) - w_in)
                acc[2] += time.thread_time() - c0 - (sum(cpu[p] for p in inner) - c_in)
        return wrapper

    class TimedInterpreter(RankInterpreter):
        def __init__(self, *a, **kw):
            w0, c0 = time.perf_counter(), time.thread_time()
            super().__init__(*a, **kw)
            wall["init"] += time.perf_counter() - w0
            cpu["init"] += time.thread_time() - c0
            # residual time per opcode (the timers above subtracted), on breakdown steps only
            if breakdown[0]:
                self.handlers = {op: per_op(op.value, h) for op, h in self.handlers.items()}

        def run(self, until_blocked: bool = False) -> bool:
            w0, c0 = time.perf_counter(), time.thread_time()
            active[0] = True
            try:
                return super().run(until_blocked)
            finally:
                active[0] = False
                wall["run"] += time.perf_counter() - w0
                cpu["run"] += time.thread_time() - c0

    import dipc.runtime.local as dl

    dd.DistributedTransport, dd.RankInterpreter, dl.RankInterpreter = TimedTransport, TimedInterpreter, TimedInterpreter
    RankInterpreter._release = staticmethod(timed(RankInterpreter._release, "free"))
    # the plan check's all-gather, waited at the rank's first message (the transport's gate): a wait
    dd.ProgramCheck.wait = timed(dd.ProgramCheck.wait, "wait")
    torch.autograd.backward = timed(torch.autograd.backward, "autograd")
    torch.autograd.grad = timed(torch.autograd.grad, "autograd")

    pipe = compile_dipc(build_model(cfg), cfg, "1f1b")
    pipe.step_optimizer = timed(pipe.step_optimizer, "optim")
    for st in pipe.stages:
        # the stage GraphModule's whole call, timed from the outside. Module hooks would force
        # nn.Module's slow call path (hook dispatch, compile checks) and leave part of it outside
        # their timer, where it counted as interpreter overhead (~15-25 us per FWD measured).
        cls = type(st.module)   # torch.fx gives every GraphModule a class of its own
        cls.__call__ = timed(cls.__call__, "fwd")
    if probe is not None:
        probe.build(cfg, rank, [list(s.layers) for s in pipe.stages])

    rows, breakdowns = [], []
    for k, mbs in enumerate(make_batches(cfg, scenario, warmup + num_steps)):
        breakdown[0] = k >= warmup and (k - warmup) % 2 == 1
        dist.barrier()
        for d in (wall, cpu):
            d.update(dict.fromkeys(PARTS, 0.0))
        by_op.clear()
        w0 = time.perf_counter()
        batch = [{"input_ids": i, "labels": l} for i, l in mbs]
        res = dd.run_step_distributed(pipe, batch, timeout_s=120) if mode == "distributed" else pipe.step(batch)
        step = time.perf_counter() - w0
        if probe is not None:
            dist.barrier()
            probe.step(mbs, record=k >= warmup)
        if k < warmup:
            continue
        if breakdown[0]:
            handlers_wall = sum(w for _, w, _ in by_op.values())
            breakdowns.append({
                "by_op": {op: {"calls": c, "wall": w / c * 1e6, "cpu": u / c * 1e6} for op, (c, w, u) in sorted(by_op.items())},
                "loop_and_init_wall_s": wall["init"] + wall["run"] - handlers_wall - sum(wall[p] for p in inner)})
            continue
        n = len(res.program.streams[rank]) if mode == "distributed" else sum(map(len, res.program.streams))
        row = {"step_s": step, "instructions": n, "plan_ms": pipe.history[-1][2],
               "outside_interpreter_s": step - wall["init"] - wall["run"]}
        for name, t in (("wall", wall), ("cpu", cpu)):
            interp = t["init"] + t["run"] - t["fwd"] - t["autograd"] - t["wait"] - t["post"] - t["optim"]
            row.update({f"{name}_{p}_s": t[p] for p in PARTS})
            row[f"{name}_interp_overhead_s"] = interp
            row[f"{name}_per_instruction_us"] = interp / n * 1e6
            row[f"{name}_per_instruction_excl_free_us"] = (interp - t["free"]) / n * 1e6
            row[f"{name}_per_instruction_incl_p2p_post_us"] = (interp + t["post"]) / n * 1e6
        rows.append(row)
    return {"rows": rows, "breakdowns": breakdowns, "torch_rows": probe.rows if probe is not None else []}


# -- torch.distributed.pipelining's runtime overhead (instrumented) --------------------------------
TORCH_PARTS = ("step", "setup", "fwd", "loss", "autograd", "wait", "post", "free", "split")
TORCH_ACTIONS = ("fwd", "bwd", "send", "recv")


class _TorchProbe:
    """torch.distributed.pipelining's runtime overhead per action, measured as ``_instrumented``
    measures dipc's interpreter: ``TorchPipeline.step`` with timers (outermost region only) around
    all that is not the schedule's own Python: the stage modules' forward (``ChainStage.__call__``,
    timed from the outside as dipc's stage modules are), the loss function,
    ``torch.autograd.backward``/``grad`` (``stage_backward``'s calls), P2P posting
    (``torch.distributed.isend``/``irecv``/``batch_isend_irecv``, patched in ``torch.distributed``
    and in ``distributed_c10d``: ``P2POp`` and ``_batch_p2p`` look them up at call time, and
    ``_check_op`` compares against the latter) and P2P waits (``schedules._wait_batch_p2p``, every
    wait in Schedule1F1B and the interleaved runtime). Total = the ``schedule.step`` call less the
    per-shape set-up it runs on a new schedule's first step (``_initialize_pp_stages``: P2P
    warm-up vote, recv buffers; timed as ``setup``); overhead = total - timed parts: schedule
    bookkeeping, ``P2POp`` creation, input chunking, metadata look-ups. Building a new shape's
    stages (``_schedule_for``) and the optimizer step run outside ``schedule.step``.

    Graph release: left alone, ``backward_one_chunk`` drops a chunk's graph when its frame ends
    (the ``fwd_cache`` entry it popped), the schedule's ``output`` local can hold the newest one a
    while longer, and on the last stage the loss tensors hold theirs until the caller drops the
    ``losses`` list, after the step. So ``backward_one_chunk`` is wrapped to keep the chunk's graph
    roots (stage outputs, loss) across the call and then detach them in place (what pipelining
    does to the last stage's outputs), timed as ``free``: all graph destruction happens at one
    timed point inside the step, as in dipc's ``_release``. ``*_excl_free`` compares with dipc's
    figure without releasing graphs, the other with its default one.

    Actions this rank executed = stage forwards + ``backward_one_chunk`` calls + P2P ops (every
    ``isend`` and ``irecv``, also those issued inside ``batch_isend_irecv``), counted at run time.

    The patches are process-wide. Install the probe before dipc's timers, so that those wrap
    these: in a dipc step these wrappers then run inside dipc's timed regions, and in a torch step
    dipc's inactive wrappers add a pass-through call (~0.1 us, a few per action) to torch's figure."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        import torch.distributed.pipelining.schedules as ps
        from torch.distributed.pipelining.stage import _PipelineStageBase

        self.wall = dict.fromkeys(TORCH_PARTS, 0.0)
        self.cpu = dict.fromkeys(TORCH_PARTS, 0.0)
        self.counts = dict.fromkeys(TORCH_ACTIONS, 0)
        self.rows: list[dict] = []
        self.pipeline: TorchPipeline | None = None
        wall, cpu, counts = self.wall, self.cpu, self.counts
        active = [False]   # only inside schedule.step, outside its per-shape set-up
        timed = _outermost_timer(wall, cpu, active, counts)

        def region(fn, key: str, on: bool):
            """The whole step (``on``: timers active inside) or its set-up (``not on``: nothing
            inside is timed or counted as an action)."""
            def wrapper(*a, **kw):
                if active[0] == on:   # outside any step, or nested
                    return fn(*a, **kw)
                active[0] = on
                try:
                    with _clocked(wall, cpu, key):
                        return fn(*a, **kw)
                finally:
                    active[0] = not on
            return wrapper

        def hold(stage, chunk: int, loss) -> list[torch.Tensor]:
            """The chunk's graph roots, kept past ``backward_one_chunk`` so the graph dies in ``release``."""
            roots = [t for t in stage.fwd_cache[chunk][0] if isinstance(t, torch.Tensor)]
            return roots + [loss] if isinstance(loss, torch.Tensor) else roots

        def release(roots: list[torch.Tensor]) -> None:
            for t in roots:
                if t.grad_fn is not None and not t._is_view():
                    t.detach_()
            roots.clear()

        hold_t, release_t = timed(hold, "free"), timed(release, "free")
        backward_one_chunk = _PipelineStageBase.backward_one_chunk

        def timed_backward(stage, bwd_chunk_id: int, loss=None, full_backward: bool = True,
                           last_backward: bool = False):
            if not active[0]:
                return backward_one_chunk(stage, bwd_chunk_id, loss, full_backward, last_backward)
            counts["bwd"] += 1
            roots = hold_t(stage, bwd_chunk_id, loss)
            try:
                return backward_one_chunk(stage, bwd_chunk_id, loss, full_backward, last_backward)
            finally:
                release_t(roots)

        _PipelineStageBase.backward_one_chunk = timed_backward
        for name, count in (("isend", "send"), ("irecv", "recv"), ("batch_isend_irecv", None)):
            fn = timed(getattr(c10d, name), "post", count)   # one object in both, so `op.op is isend` holds
            setattr(dist, name, fn)
            setattr(c10d, name, fn)
        ps._wait_batch_p2p = timed(ps._wait_batch_p2p, "wait")
        ps._split_tensor = timed(ps._split_tensor, "split")   # input chunking: overhead, shown apart
        ps._PipelineSchedule._split_inputs = timed(ps._PipelineSchedule._split_inputs, "split")
        ps._PipelineSchedule._initialize_pp_stages = region(ps._PipelineSchedule._initialize_pp_stages, "setup", False)
        for cls in (ps.PipelineScheduleSingle, ps.PipelineScheduleMulti):
            cls.step = region(cls.step, "step", True)
        torch.autograd.backward = timed(torch.autograd.backward, "autograd")
        torch.autograd.grad = timed(torch.autograd.grad, "autograd")
        # the stage module's whole call, timed from the outside (as dipc's: no module hooks)
        ChainStage.__call__ = timed(ChainStage.__call__, "fwd", "fwd")
        self._timed = timed

    def build(self, cfg: dict, rank: int, stage_layers: list[list[str]], schedule: str = "1f1b") -> None:
        """The pipeline to measure (own model, same initial weights); after ``__init__``'s patches."""
        tp = TorchPipeline(build_model(cfg), cfg, rank, stage_layers, schedule)
        tp.loss_fn = self._timed(tp.loss_fn, "loss")   # schedules take it when built: before any is
        self.pipeline = tp

    def step(self, mbs: list[tuple[torch.Tensor, torch.Tensor]], record: bool) -> None:
        """One ``TorchPipeline.step`` on the batch; with ``record``, its row is kept."""
        tp, wall, cpu, counts = self.pipeline, self.wall, self.cpu, self.counts
        denom = float(sum((l != -100).sum() for _, l in mbs))
        ids, labels, _ = padded_batch(mbs)
        for d in (wall, cpu):
            d.update(dict.fromkeys(TORCH_PARTS, 0.0))
        counts.update(dict.fromkeys(TORCH_ACTIONS, 0))
        w0 = time.perf_counter()
        tp.step(ids, labels, denom)
        step = time.perf_counter() - w0
        if not record:
            return
        m = tp.cfg["microbatches"] * len(tp.my_stages)
        assert counts["fwd"] == counts["bwd"] == m, f"expected {m} forwards and backwards, counted {counts}"
        n, fb = sum(counts.values()), counts["fwd"] + counts["bwd"]
        row = {"step_s": step, "actions": n, **{f"n_{a}": c for a, c in counts.items()},
               "outside_schedule_step_s": step - wall["step"]}
        for name, t in (("wall", wall), ("cpu", cpu)):
            total = t["step"] - t["setup"]
            parts = t["fwd"] + t["loss"] + t["autograd"] + t["wait"] + t["post"]
            # outermost regions only: the timed parts cannot exceed the step they are in
            assert parts + t["free"] <= total + 1e-6, f"{name}: timed parts exceed the step: {t}"
            over = total - parts   # graph release included, as in dipc's default figure
            row.update({f"{name}_{p}_s": t[p] for p in TORCH_PARTS})
            row[f"{name}_total_s"] = total
            row[f"{name}_overhead_s"] = over
            row[f"{name}_per_action_us"] = over / n * 1e6
            row[f"{name}_per_action_excl_free_us"] = (over - t["free"]) / n * 1e6
            row[f"{name}_per_action_incl_p2p_post_us"] = (over + t["post"]) / n * 1e6
            row[f"{name}_per_fb_us"] = over / fb * 1e6
            row[f"{name}_per_fb_excl_free_us"] = (over - t["free"]) / fb * 1e6
        self.rows.append(row)


# -- driver ----------------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def _compare_overheads(overhead: dict, torch_overhead: dict) -> list[dict]:
    """dipc's and torch's overhead side by side, per scenario and rank, on common units: per the
    runtime's own unit (instruction / action), per forward + backward, per step."""
    rows = []
    for sc in ("static", "skewed"):
        if f"{sc} distributed" not in overhead or f"{sc} 1f1b" not in torch_overhead:
            continue
        for r in range(2):
            d, t = overhead[f"{sc} distributed"][f"rank{r}"], torch_overhead[f"{sc} 1f1b"][f"rank{r}"]
            d_mix = {op: v["calls"] for op, v in d["residual_us_per_call_by_op"].items()}
            t_mix = {"F": round(t["n_fwd"]), "B": round(t["n_bwd"]), "send": round(t["n_send"]), "recv": round(t["n_recv"])}
            row: dict[str, Any] = {"scenario": sc, "rank": r}
            for who, x, n, fb, mix, over, unit in (
                    ("dipc", d, d["instructions"], d_mix.get("FWD", 0) + d_mix.get("BWD", 0), d_mix, "interp_overhead",
                     "instruction"),
                    ("torch", t, round(t["actions"]), t_mix["F"] + t_mix["B"], t_mix, "overhead", "action")):
                row[who] = {"unit": unit, "units": n, "fb": fb, "op_mix": mix}
                for clock in ("wall", "cpu"):
                    o, f = x[f"{clock}_{over}_s"], x[f"{clock}_free_s"]
                    row[who][clock] = {"per_unit_us": o / n * 1e6, "per_unit_excl_free_us": (o - f) / n * 1e6,
                                       "per_fb_us": o / fb * 1e6, "per_fb_excl_free_us": (o - f) / fb * 1e6,
                                       "per_step_ms": o * 1e3, "per_step_excl_free_ms": (o - f) * 1e3}
            rows.append(row)
    return rows


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], resamples: int = 2000,
                 seed: int = 0) -> tuple[float, list[float]]:
    """Median of the per-step ratios ``numerator[k] / denominator[k]`` and its bootstrap 95%
    interval (percentiles of the median over ``resamples`` resamplings of the steps)."""
    import numpy as np

    ratios = np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(ratios, size=(resamples, len(ratios))), axis=1)
    return float(np.median(ratios)), [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def ratio_of_totals(numerator: Sequence[float], denominator: Sequence[float], resamples: int = 2000,
                    seed: int = 0) -> tuple[float, list[float]]:
    """``sum(numerator) / sum(denominator)``: the throughput ratio over the run's batches (a long
    step weighs as much as it takes), and its paired bootstrap 95% interval (steps resampled
    with both systems' times together)."""
    import numpy as np

    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    boots = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    return float(num.sum() / den.sum()), [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def run_case(cfg: dict, scenario: str, schedule: str, args) -> dict:
    per_rank = spawn(_bench, 2, cfg, scenario, schedule, args.steps, args.warmup, args.profile, args.profile_clock,
                     timeout_s=900)
    w = args.warmup
    dipc_t = [max(a, b) for a, b in zip(per_rank[0]["dipc"], per_rank[1]["dipc"])][w:]
    torch_t = [max(a, b) for a, b in zip(per_rank[0]["torch"], per_rank[1]["torch"])][w:]
    setup = [max(a, b) for a, b in zip(per_rank[0]["torch_setup_s"], per_rank[1]["torch_setup_s"])][w:]
    last = 1  # the rank holding the last stage (loss) in both schedules
    dl, tl = per_rank[0]["dipc_loss"], per_rank[last]["torch_loss"]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(dl, tl))
    batches = make_batches(cfg, scenario, w + args.steps)[w:]
    real = [sum(int((l != -100).sum()) for _, l in mbs) for mbs in batches]
    padded = [padded_batch(mbs)[1].numel() for mbs in batches]
    torch_no_setup = [t - s for t, s in zip(torch_t, setup)]
    r = {
        "scenario": scenario, "schedule": schedule, "stage_layers": per_rank[0]["stage_layers"],
        "steps_timed": len(dipc_t),
        "dipc_step_s": dipc_t, "torch_step_s": torch_t, "torch_setup_s": setup,
        "dipc_steps_per_s": 1 / med(dipc_t), "torch_steps_per_s": 1 / med(torch_t),
        "torch_steps_per_s_excl_setup": 1 / med(torch_no_setup),
        "dipc_tokens_per_s": med([n / t for n, t in zip(real, dipc_t)]),
        "torch_tokens_per_s": med([n / t for n, t in zip(real, torch_t)]),
        "real_tokens_per_step_median": med(real), "torch_padded_tokens_per_step_median": med(padded),
        "padding_fraction_torch": 1 - sum(real) / sum(padded),
        "dipc_plan_ms_median": med(per_rank[0]["plan_ms"][w:]),
        "instructions_per_step_rank0": per_rank[0]["instructions"][-1],
        "instructions_per_step_rank1": per_rank[1]["instructions"][-1],
        "max_rel_loss_diff_dipc_vs_torch": loss_diff,
        "dipc_losses": dl, "torch_losses": tl,
    }
    # the order effect the turn-taking cancels: each system's median step when it ran first / second
    first = per_rank[0]["first"][w:]
    for name, ts in (("dipc", dipc_t), ("torch", torch_t)):
        for pos, want in (("first", True), ("second", False)):
            picked = [t for t, f in zip(ts, first) if (f == name) == want]
            r[f"{name}_step_s_median_when_{pos}"] = med(picked) if picked else None
    if schedule == "dip":
        # planning is asynchronous in training (`dipc run`: a CPU worker plans batch k+1 while k
        # trains), so the step figures above leave it out; here it is, and the ratio with every plan
        # made inline on the critical path (on this 2-core machine no core is spare for the worker)
        plan_s = [max(a, b) for a, b in zip(per_rank[0]["dip_plan_s"], per_rank[1]["dip_plan_s"])][w:]
        r["dip_plan_ms_median"] = med(plan_s) * 1e3
        r["dip_picked"] = dict(Counter(per_rank[0]["dip_picked"][w:]))
        r["dipc_steps_per_s_incl_inline_plan"] = 1 / med([d + p for d, p in zip(dipc_t, plan_s)])
        r["ratio_dipc_over_torch_incl_inline_plan"] = r["dipc_steps_per_s_incl_inline_plan"] / r["torch_steps_per_s"]
    r["ratio_dipc_over_torch"] = r["dipc_steps_per_s"] / r["torch_steps_per_s"]
    # both systems run each batch back to back, so the per-step ratio cancels the machine's drift
    # (a slow minute hits both); its median, with a bootstrap 95% interval, says how sure the ratio is
    r["ratio_paired_median"], r["ratio_paired_ci95"] = paired_ratio(torch_t, dipc_t)
    r["ratio_of_totals"], r["ratio_of_totals_ci95"] = ratio_of_totals(torch_t, dipc_t)
    r["ratio_dipc_over_torch_excl_setup"] = r["dipc_steps_per_s"] / r["torch_steps_per_s_excl_setup"]
    if args.profile:
        r["profiles"] = {f"{name} rank {rank}": per_rank[rank][f"profile_{name}"]
                         for name in ("dipc", "torch") for rank in range(2)}
    return r


def run_overhead(cfg: dict, scenario: str, args, mode: str, with_torch: bool = False) -> tuple[dict, dict]:
    """dipc's interpreter overhead (per rank, medians) and, ``with_torch``, torch.distributed.pipelining's
    runtime overhead from the same processes (``{}`` without)."""
    per_rank = spawn(_instrumented, 2 if mode == "distributed" else 1, cfg, scenario, args.steps, args.warmup, mode,
                     with_torch, timeout_s=900)
    out: dict[str, Any] = {}
    for rank, res in enumerate(per_rank):
        rows, parts = res["rows"], res["breakdowns"]
        out[f"rank{rank}"] = {"instructions": rows[-1]["instructions"],
                              **{k: med([r[k] for r in rows]) for k in rows[0] if k != "instructions"}}
        out[f"rank{rank}"]["residual_us_per_call_by_op"] = {
            op: {"calls": v["calls"], **{c: med([b["by_op"][op][c] for b in parts]) for c in ("wall", "cpu")}}
            for op, v in parts[-1]["by_op"].items()}
        out[f"rank{rank}"]["loop_and_init_wall_s"] = med([b["loop_and_init_wall_s"] for b in parts])
    for clock in ("wall", "cpu"):
        for what in ("", "_excl_free"):
            out[f"{clock}_per_instruction{what}_us_max_rank"] = max(
                out[f"rank{r}"][f"{clock}_per_instruction{what}_us"] for r in range(len(per_rank)))
    tout: dict[str, Any] = {}
    if with_torch:
        for rank, res in enumerate(per_rank):
            rows = res["torch_rows"]
            tout[f"rank{rank}"] = {k: med([r[k] for r in rows]) for k in rows[0]}
        for clock in ("wall", "cpu"):
            for what in ("", "_excl_free"):
                for unit in ("action", "fb"):
                    key = f"{clock}_per_{unit}{what}_us"
                    tout[f"{key}_max_rank"] = max(tout[f"rank{r}"][key] for r in range(len(per_rank)))
    return out, tout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15, help="timed steps per case (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--static-seq", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="cProfile both runtimes' timed steps on each rank; print the top")
    ap.add_argument("--profile-clock", choices=("wall", "cpu"), default="wall",
                    help="--profile's clock; cpu (thread CPU time) leaves out waits and time other processes held the core")
    ap.add_argument("--cases",
                    default="static:1f1b,static:interleaved_1f1b,skewed:1f1b,skewed:interleaved_1f1b,skewed:dip")
    ap.add_argument("--no-overhead", action="store_true", help="skip the instrumented overhead runs")
    ap.add_argument("--overhead-only", action="store_true", help="skip the throughput cases (--cases)")
    ap.add_argument("--overhead-modes", default="distributed,local",
                    help="dipc's instrumented runs: its distributed runtime and/or the local executor")
    ap.add_argument("--no-torch-overhead", action="store_true",
                    help="dipc's distributed overhead runs without torch.distributed.pipelining's steps in between")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cfg = dict(vocab=1024, dim=args.dim, layers=args.layers, heads=4, kv_heads=2, inter=int(args.dim * 8 / 3) // 8 * 8,
               microbatches=args.microbatches, static_mb_size=1, static_seq=args.static_seq,
               skew_median=48, skew_sigma=0.8, skew_min=8, skew_max=512)

    t_all = time.perf_counter()
    load_start = os.getloadavg()
    cases = [] if args.overhead_only else [run_case(cfg, *c.split(":"), args) for c in args.cases.split(",")]
    modes = [m for m in args.overhead_modes.split(",") if m]
    overhead: dict[str, dict] = {}
    torch_overhead: dict[str, dict] = {}   # "<scenario> 1f1b": from the same processes as dipc's distributed row
    for mode in [] if args.no_overhead else modes:
        for sc in ("static", "skewed"):
            with_torch = mode == "distributed" and not args.no_torch_overhead
            overhead[f"{sc} {mode}"], t = run_overhead(cfg, sc, args, mode, with_torch)
            if t:
                torch_overhead[f"{sc} 1f1b"] = t

    env = {"device": "CPU", "backend": "gloo", "processes": 2, "threads_per_process": 1, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.processor() or platform.machine(),
           # other work on the machine skews wall clocks (wall >> thread CPU time in the overhead rows)
           "loadavg_1m_start_end": [load_start[0], os.getloadavg()[0]]}
    print(f"dipc runtime vs torch.distributed.pipelining -- measured on CPU, gloo, 2 processes x 1 thread "
          f"(torch {torch.__version__}, {os.cpu_count()} cores, load avg {env['loadavg_1m_start_end'][0]:.1f} -> "
          f"{env['loadavg_1m_start_end'][1]:.1f})")
    print(f"model: TinyLlama vocab={cfg['vocab']} dim={cfg['dim']} layers={cfg['layers']} heads={cfg['heads']}/"
          f"{cfg['kv_heads']} ffn={cfg['inter']}; {cfg['microbatches']} microbatches/step; SGD; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    for c in {c["schedule"]: c for c in cases}.values():
        print(f"partition ({c['schedule']}): " + " | ".join(f"stage {i}: {', '.join(s)}"
                                                          for i, s in enumerate(c["stage_layers"])))
    hdr = (f"{'case':26s} {'dipc st/s':>9s} {'torch st/s':>10s} {'ratio':>6s} {'dipc tok/s':>10s} "
           f"{'torch tok/s':>11s} {'torch pad':>9s} {'loss rel diff':>13s}")
    if cases:
        print(hdr)
        print("-" * len(hdr))
    for c in cases:
        print(f"{c['scenario'] + ' ' + c['schedule']:26s} {c['dipc_steps_per_s']:9.2f} {c['torch_steps_per_s']:10.2f} "
              f"{c['ratio_dipc_over_torch']:5.2f}x {c['dipc_tokens_per_s']:10.0f} {c['torch_tokens_per_s']:11.0f} "
              f"{c['padding_fraction_torch']:8.0%} {c['max_rel_loss_diff_dipc_vs_torch']:13.1e}")
        lo, hi = c["ratio_of_totals_ci95"]
        plo, phi = c["ratio_paired_ci95"]
        print(f"{'':26s} total time ratio {c['ratio_of_totals']:.3f}x (95% interval {lo:.3f}-{hi:.3f}); per-step "
              f"ratios: median {c['ratio_paired_median']:.3f}x ({plo:.3f}-{phi:.3f})")
        if c["scenario"] == "skewed":
            print(f"{'':26s} torch without its per-shape set-up: {c['torch_steps_per_s_excl_setup']:.2f} st/s, "
                  f"ratio {c['ratio_dipc_over_torch_excl_setup']:.2f}x")
        if c["schedule"] == "dip":
            print(f"{'':26s} (torch: interleaved 1F1B on the same layout) DIP plan {c['dip_plan_ms_median']:.0f} ms "
                  f"median, picked {c['dip_picked']}; with every plan inline: "
                  f"{c['dipc_steps_per_s_incl_inline_plan']:.2f} st/s, ratio "
                  f"{c['ratio_dipc_over_torch_incl_inline_plan']:.2f}x")
    if overhead:
        print("\ndipc interpreter overhead per instruction = (RankInterpreter init + run) - stage forward - autograd"
              " - P2P post (process group send/recv + message packing; local executor: its message copy) - P2P waits"
              " - optimizer step;"
              " 1f1b, medians; wall clock / thread CPU clock:")
        for sc, o in overhead.items():
            for r in range(2 if "distributed" in sc else 1):
                x = o[f"rank{r}"]
                print(f"  {sc:19s} {'rank ' + str(r) if 'distributed' in sc else 'ranks 0+1'}: {x['wall_per_instruction_us']:6.1f} / {x['cpu_per_instruction_us']:5.1f} us "
                      f"per instr over {x['instructions']} instr (without releasing finished graphs: "
                      f"{x['wall_per_instruction_excl_free_us']:.1f} / {x['cpu_per_instruction_excl_free_us']:.1f} us; "
                      f"incl. P2P posting: "
                      f"{x['wall_per_instruction_incl_p2p_post_us']:.1f} / {x['cpu_per_instruction_incl_p2p_post_us']:.1f} us)"
                      f" | step {x['step_s'] * 1e3:.1f} ms = fwd {x['wall_fwd_s'] * 1e3:.1f} + autograd "
                      f"{x['wall_autograd_s'] * 1e3:.1f} + wait {x['wall_wait_s'] * 1e3:.1f} + post "
                      f"{x['wall_post_s'] * 1e3:.1f} + optim {x['wall_optim_s'] * 1e3:.1f} + interp (incl. free "
                      f"{x['wall_free_s'] * 1e3:.2f}) "
                      f"{x['wall_interp_overhead_s'] * 1e3:.2f} + outside run() {x['outside_interpreter_s'] * 1e3:.1f}"
                      f" (plan {x['plan_ms']:.2f}) ms")
                print("      residual per call (wall/cpu us): " + ", ".join(
                    f"{op} {v['wall']:.0f}/{v['cpu']:.0f}" for op, v in x["residual_us_per_call_by_op"].items())
                    + f"; dispatch loop + init {x['loop_and_init_wall_s'] * 1e3:.2f} ms")
    if torch_overhead:
        print("\ntorch.distributed.pipelining runtime overhead per action = schedule.step - per-shape stage set-up "
              "(_initialize_pp_stages) - stage forward - loss_fn - autograd - P2P post (dist.isend/irecv/"
              "batch_isend_irecv) - P2P waits (_wait_batch_p2p); actions = this rank's stage forwards + "
              "backward_one_chunk calls + isend + irecv ops; releasing a chunk's graph (its roots detached right "
              "after backward_one_chunk) timed as free; medians; wall clock / thread CPU clock:")
        for sc, o in torch_overhead.items():
            for r in range(2):
                x = o[f"rank{r}"]
                print(f"  {sc:19s} rank {r}: {x['wall_per_action_us']:6.1f} / {x['cpu_per_action_us']:5.1f} us per action "
                      f"over {x['actions']:.0f} ({x['n_fwd']:.0f} F, {x['n_bwd']:.0f} B, {x['n_send']:.0f} send, "
                      f"{x['n_recv']:.0f} recv) (without releasing finished graphs: {x['wall_per_action_excl_free_us']:.1f}"
                      f" / {x['cpu_per_action_excl_free_us']:.1f} us; incl. P2P posting: "
                      f"{x['wall_per_action_incl_p2p_post_us']:.1f} / {x['cpu_per_action_incl_p2p_post_us']:.1f} us; "
                      f"per F+B: {x['wall_per_fb_us']:.1f} / {x['cpu_per_fb_us']:.1f} us)"
                      f" | step {x['step_s'] * 1e3:.1f} ms = fwd {x['wall_fwd_s'] * 1e3:.1f} + loss "
                      f"{x['wall_loss_s'] * 1e3:.1f} + autograd {x['wall_autograd_s'] * 1e3:.1f} + wait "
                      f"{x['wall_wait_s'] * 1e3:.1f} + post {x['wall_post_s'] * 1e3:.1f} + runtime (incl. free "
                      f"{x['wall_free_s'] * 1e3:.2f}, input chunking {x['wall_split_s'] * 1e3:.2f}) "
                      f"{x['wall_overhead_s'] * 1e3:.2f} + set-up {x['wall_setup_s'] * 1e3:.2f} + outside "
                      f"schedule.step (optimizer; new shape: stage build) {x['outside_schedule_step_s'] * 1e3:.1f} ms")
    comparison = _compare_overheads(overhead, torch_overhead)
    if comparison:
        print("\nruntime overhead, dipc's interpreter vs torch.distributed.pipelining's schedule runtime -- 1f1b, the "
              "same two processes alternating step by step on the same batches; medians; each cell 'a / b': a with "
              "releasing finished autograd graphs, b without. dipc's unit: an executed instruction; torch's: an "
              "action (stage forward, backward_one_chunk, isend, irecv); F+B: forwards + backwards:")
        hdr2 = (f"  {'clock':5s} {'scenario':8s} {'rank':4s} | {'dipc us/instr':>14s} {'us/(F+B)':>14s} "
                f"{'ms/step':>12s} | {'torch us/action':>15s} {'us/(F+B)':>14s} {'ms/step':>12s}")
        print(hdr2)
        print("  " + "-" * (len(hdr2) - 2))
        for clock in ("cpu", "wall"):
            for c in comparison:
                cells = []
                for who, w in (("dipc", 14), ("torch", 15)):
                    x = c[who][clock]
                    cells.append(f"{x['per_unit_us']:{w - 8}.1f} /{x['per_unit_excl_free_us']:6.1f} "
                                 f"{x['per_fb_us']:6.1f} /{x['per_fb_excl_free_us']:6.1f} "
                                 f"{x['per_step_ms']:5.2f} /{x['per_step_excl_free_ms']:5.2f}")
                print(f"  {clock:5s} {c['scenario']:8s} {c['rank']:4d} | {cells[0]} | {cells[1]}")
        print("  (units per rank and step -- dipc: " + "; ".join(
            f"{c['scenario']} rank {c['rank']}: {c['dipc']['units']} instructions = "
            + " + ".join(f"{n} {op}" for op, n in c["dipc"]["op_mix"].items()) for c in comparison[:2])
            + "; torch: " + "; ".join(f"{c['scenario']} rank {c['rank']}: {c['torch']['units']} actions = "
                                       + " + ".join(f"{n} {op}" for op, n in c["torch"]["op_mix"].items())
                                       for c in comparison[:2]) + ")")
    by_case = {(c["scenario"], c["schedule"]): c for c in cases}
    targets = {}
    for (scenario, schedule), c in by_case.items():
        floor = 1.0 if scenario == "static" else 1.2
        targets[f"{scenario} {schedule} ratio >= {floor}"] = c["ratio_of_totals"] >= floor
    if overhead:
        # the wall clock also counts time the OS gave the core to another process (2 ranks + gloo
        # threads on 2 shared cores); the thread CPU clock counts the interpreter's own work
        for clock in ("wall", "cpu"):
            for what, label in (("", ""), ("_excl_free", " without releasing finished graphs")):
                worst = max(o[f"{clock}_per_instruction{what}_us_max_rank"] for o in overhead.values())
                targets[f"overhead <= 50 us/instr ({clock}{label})"] = worst <= 50.0
    print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    if args.profile:
        for c in cases:
            for name, text in c["profiles"].items():
                print(f"\n--- cProfile of the timed steps, {name}, {c['scenario']} {c['schedule']} (tottime, "
                      f"{args.profile_clock} clock) ---")
                print(text)
    result = {"measured_on": "CPU, gloo backend, 2 local processes, torch.set_num_threads(1) each (no GPU)",
              "env": env, "config": cfg, "steps": args.steps, "warmup": args.warmup,
              "method": __doc__, "cases": cases, "interpreter_overhead": overhead,
              "torch_runtime_overhead": torch_overhead, "overhead_comparison": comparison, "targets": targets,
              "wall_s": time.perf_counter() - t_all}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
