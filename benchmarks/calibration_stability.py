"""Calibration stability: does the local-executor fit (:func:`dipc.semu.calibrate.fit_profile`)
give the same coefficients on two disjoint sets of calibration steps, and how well does each
predict the other's instructions? Regularised (``regularization="cv"``, the default; a fixed
strength 0.1 for comparison) vs not (``"none"``).

Usage::

    python benchmarks/calibration_stability.py              # about 1-2 minutes on a quiet CPU
    python benchmarks/calibration_stability.py --batches 1  # faster, fewer steps per half
    python benchmarks/calibration_stability.py --samples s.pkl   # keep the timed steps (or reuse them)

Why: the fit's columns (compute, attention, memory, probability bytes, per-op and per-instruction
overheads per kind) are nearly collinear on the tiny example models, so unregularised fits of two
quiet runs put compute at x3.7 with a 10 us BWD_I constant and at x1.0 with 5.9 ms.

What it does: measures this CPU (``measure_profile(quick=True)``), then times calibration steps
of the example models as ``benchmarks/semu_accuracy.py`` does (its batches, pipelines, schedules
and :func:`semu_accuracy._calibration_samples`: CPU-time clock, one thread, one warm-up and
``--runs`` timed runs per step), on ``2 x --batches`` calibration batches per model. Half A is the
first ``--batches`` batches, half B the rest (disjoint steps). For each mode it fits A and B apart
and reports

* every coefficient on A and B and its spread |A - B| / mean(|A|, |B|) (a, b, m, the probability
  byte times, per-op and fixed times by kind; a coefficient near 0 on both sides has a large
  spread that means little);
* the term shift: how much of the mean instruction time moves between the model's terms from A's
  fit to B's (sum over terms of |coefficient difference| x the term's mean column value, over the
  mean measured time);
* held-out error: the profile fitted on one half predicts the other half's compute instructions
  (StepModel on the calibrated profile, as SEMU predicts them, less the dispatch-loop share that
  instruction timings exclude): median |err| per instruction, and median |err| of each step's
  summed compute time;
* the strength the fit used and its cross-validation error.

Writes ``benchmarks/results/calibration_stability.json``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import semu_accuracy as sa  # noqa: E402  (its batches, pipelines and calibration steps)

MODES = ("none", "cv", "0.1")   # regularization= of fit_profile; a number is a fixed strength
_COMPUTE_OPS = ("FWD", "BWD", "BWD_I", "BWD_W")


def collect(num_batches: int, runs: int) -> dict:
    """Calibration samples per model, chunks and calibration batch (2 x ``num_batches`` batches),
    and the measured profile; also the pipelines and cost models needed to fit them."""
    from dipc.semu.costs import layer_cost_model
    from dipc.semu.profile_machine import measure_profile
    from examples.data import make_example

    measured = measure_profile(quick=True)
    models = {}
    for name in sa.MODELS:
        ex = make_example(name, seed=0)
        example = sa._batches(name, sa.TEST_SEED, 1)[0][0]   # as semu_accuracy compiles them
        pipes = sa._pipes(ex, example)
        cms = {c: layer_cost_model(p.captured) for c, p in pipes.items()}
        calib = sa._batches(name, sa.CALIBRATION_SEED, 2 * num_batches)
        samples: dict[tuple[int, int], list] = {}
        for k, cmbs in enumerate(calib):
            for chunks, schedule in sa.CALIBRATION_SCHEDULES:
                samples.setdefault((chunks, k), []).extend(
                    sa._calibration_samples(pipes[chunks], cmbs, schedule, "cpu", runs=runs))
        models[name] = {"pipes": pipes, "cms": cms, "samples": samples}
    return {"measured": measured, "models": models}


def _sets(data: dict, batches) -> list:
    sets = []
    for m in data["models"].values():
        for chunks, pipe in m["pipes"].items():
            samples = [s for k in batches for s in m["samples"].get((chunks, k), [])]
            if samples:
                sets.append(sa._calibration_set(pipe, m["cms"][chunks], samples))
    return sets


def _coefficients(cal) -> dict[str, float]:
    out = {"a (compute)": cal.scale, "b (attention)": cal.attention_scale, "m (memory)": cal.memory_scale,
           "probs fwd s/B": cal.probs_fwd_byte_time, "probs bwd s/B": cal.probs_bwd_byte_time}
    out.update({f"per op {k}": cal.kind_op_overheads.get(k, 0.0) for k in _COMPUTE_OPS})
    out.update({f"const {k}": cal.op_overheads.get(k, 0.0) - cal.dispatch_overhead for k in _COMPUTE_OPS})
    return out


def held_out(cal, sets) -> dict[str, float]:
    """Errors of ``cal``'s profile on the compute instructions of ``sets`` (not fitted on them)."""
    from dipc.ir import Instruction, Op
    from dipc.semu.step_model import StepModel

    ins_errs, step_errs = [], []
    for cs in sets:
        for s in cs.samples:
            sm = StepModel(cs.cost_model, cal.profile, cs.stage_layers, s.stats, dtype="float32",
                           no_input_grads=cs.no_input_grads, whole_wgrad_stages=cs.whole_wgrad_stages)
            pred_sum = meas_sum = 0.0
            for op, stage, mb, t in s.timings:
                if op not in _COMPUTE_OPS or (op == "BWD_I" and stage in cs.no_input_grads) or t <= 0:
                    continue
                # the profile's per-instruction fixed times include the dispatch loop's share, which
                # the instruction timings do not
                pred = sm.compute_time(Instruction(op=Op(op), stage=stage, mb=mb)) - cal.dispatch_overhead
                ins_errs.append(abs(pred / t - 1))
                pred_sum += pred
                meas_sum += t
            step_errs.append(abs(pred_sum / meas_sum - 1))
    return {"instr_median_abs_err": statistics.median(ins_errs), "instr_p90_abs_err": sa._pct(ins_errs, 0.9),
            "step_median_abs_err": statistics.median(step_errs), "step_p90_abs_err": sa._pct(step_errs, 0.9),
            "num_instructions": len(ins_errs), "num_steps": len(step_errs)}


def term_shift(measured, fit_a, fit_b, sets) -> float:
    """How much of the mean instruction time moves between the model's terms from one fit to the
    other: sum over terms of |coefficient A - coefficient B| x the term's mean column value on
    ``sets`` (the design matrix fit_profile builds on the ``measured`` profile, masked attention
    as fit A counts it), over the mean measured time. 0: the same attribution; unlike relative
    spreads, terms whose columns are small weigh little."""
    import numpy as np

    from dipc.semu.calibrate import _design, _points

    samples, points, ops = _points(sets)
    x = _design(measured, samples, points, ops, fit_a.dense_masked_attention, "float32")
    y = np.array([t for *_, t in points])
    diff = np.array(list(_coefficients(fit_a).values())) - np.array(list(_coefficients(fit_b).values()))
    return float(np.sum(np.abs(diff) * x.mean(axis=0)) / y.mean())


def _spread(x: float, y: float) -> float:
    den = (abs(x) + abs(y)) / 2
    return abs(x - y) / den if den > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=2, help="calibration batches per model in each half (default 2)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per calibration step (default 3, as semu_accuracy)")
    ap.add_argument("--samples", default=None,
                    help="pickle of collected samples: read it if it exists (no timing), else write it")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration_stability.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from dipc.semu.calibrate import fit_profile

    cache = Path(a.samples) if a.samples else None
    if cache is not None and cache.exists():
        data = _load(cache)
        a.batches = data["batches"]
    else:
        data = collect(a.batches, a.runs)
        data["batches"] = a.batches
        if cache is not None:
            _save(data, cache)
    t_collect = time.perf_counter() - t0
    halves = {"A": range(0, a.batches), "B": range(a.batches, 2 * a.batches)}
    sets = {h: _sets(data, ks) for h, ks in halves.items()}
    results: dict[str, dict] = {}
    for mode in MODES:
        reg = mode if mode in ("cv", "none") else float(mode)
        fits = {h: fit_profile(data["measured"], sets[h], regularization=reg) for h in halves}
        coefs = {h: _coefficients(f) for h, f in fits.items()}
        spread = {k: _spread(coefs["A"][k], coefs["B"][k]) for k in coefs["A"]}
        results[mode] = {
            "coefficients": coefs, "spread": spread,
            "max_spread": max(spread.values()), "median_spread": statistics.median(spread.values()),
            "term_shift": term_shift(data["measured"], fits["A"], fits["B"], sets["A"] + sets["B"]),
            "held_out": {"A->B": held_out(fits["A"], sets["B"]), "B->A": held_out(fits["B"], sets["A"])},
            "in_sample_median_abs_err": {h: f.median_rel_error for h, f in fits.items()},
            "strength": {h: f.regularization_strength for h, f in fits.items()},
            "cv_error": {h: f.cv_error for h, f in fits.items()},
            "dense_masked_attention": {h: f.dense_masked_attention for h, f in fits.items()},
        }
    # -- print ----------------------------------------------------------------------------------
    keys = list(results[MODES[0]]["coefficients"]["A"])
    print(f"\ncoefficients fitted on half A / half B ({a.batches} calibration batches per model each)")
    print(f"{'':16s}" + "".join(f"{m + ' A':>11s}{m + ' B':>11s}{'spread':>8s}  " for m in MODES))
    for k in keys:
        row = f"{k:16s}"
        for m in MODES:
            c, s = results[m]["coefficients"], results[m]["spread"][k]
            row += f"{c['A'][k]:11.3g}{c['B'][k]:11.3g}{s:8.1%}  "
        print(row)
    print()
    for m in MODES:
        r = results[m]
        ho = r["held_out"]
        ab, ba = ho["A->B"], ho["B->A"]
        print(f"{m:5s}: term shift {r['term_shift']:.1%} of the mean instruction, coefficient spread median "
              f"{r['median_spread']:.1%}; held-out median |err| A->B / B->A per instruction "
              f"{ab['instr_median_abs_err']:.1%} / {ba['instr_median_abs_err']:.1%} (p90 "
              f"{ab['instr_p90_abs_err']:.1%} / {ba['instr_p90_abs_err']:.1%}), per step "
              f"{ab['step_median_abs_err']:.1%} / {ba['step_median_abs_err']:.1%}; in-sample "
              f"{r['in_sample_median_abs_err']['A']:.1%} / {r['in_sample_median_abs_err']['B']:.1%}; strength "
              f"{r['strength']['A']:.3g} / {r['strength']['B']:.3g}, CV error "
              + " / ".join("-" if v is None else f"{v:.3f}" for v in r["cv_error"].values()))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "calibration_stability", "batches_per_half": a.batches, "runs_per_step": a.runs,
              "models": list(sa.MODELS), "calibration_schedules": [s for _, s in sa.CALIBRATION_SCHEDULES],
              "device": data["measured"].device.name, "collect_seconds": t_collect,
              "seconds": time.perf_counter() - t0, "modes": results}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s, {t_collect:.0f} s of it timing or loading the steps)")


def _save(data: dict, path: Path) -> None:
    """The samples and the measured profile (pipelines are rebuilt on load: they do not pickle)."""
    from dipc.semu.profiles import profile_to_json

    obj = {"batches": data["batches"], "measured": profile_to_json(data["measured"]),
           "samples": {n: m["samples"] for n, m in data["models"].items()}}
    path.write_bytes(pickle.dumps(obj))


def _load(path: Path) -> dict:
    from dipc.semu.costs import layer_cost_model
    from dipc.semu.profiles import profile_from_json
    from examples.data import make_example

    obj = pickle.loads(path.read_bytes())
    models = {}
    for name, samples in obj["samples"].items():
        pipes = sa._pipes(make_example(name, seed=0), sa._batches(name, sa.TEST_SEED, 1)[0][0])
        models[name] = {"pipes": pipes, "cms": {c: layer_cost_model(p.captured) for c, p in pipes.items()},
                        "samples": samples}
    return {"batches": obj["batches"], "measured": profile_from_json(obj["measured"]), "models": models}


if __name__ == "__main__":
    main()
