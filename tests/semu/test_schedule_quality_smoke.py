"""Smoke test of benchmarks/schedule_quality.py: its core on a few VLM-S and T2V-S batches."""
from tests.benchmark_loader import load_benchmark


def _load():
    return load_benchmark("schedule_quality")


def _check(sq, result):
    assert result["honesty"]["simulated_not_measured"] is True
    summary = result["summary"]
    assert summary[sq.MEGATRON]["rel_throughput"]["mean"] == 1.0
    for b in result["batches"]:
        for name, rec in b["schedules"].items():
            if rec["role"] == "baseline":
                assert rec["validated"], (b["index"], name, rec.get("error"))
                assert rec["step_s"] > 0 and 0 <= rec["bubble"] < 1
        dip = [r for r in b["schedules"].values() if r["role"] == "ablation" and r["validated"]]
        fitting = [r["step_s"] for r in dip if not r["over_capacity"]]
        # the ablation keeps the fastest fitting candidate seen so far: cumulative rows never get slower
        assert fitting == sorted(fitting, reverse=True)
        planner = b["schedules"][sq.PLANNER]
        assert planner["validated"] and not planner["over_capacity"], planner.get("error")
        assert planner["step_s"] > 0 and planner["plan_ms"] > 0 and 1 <= planner["fitted"] + 1 <= planner["simulated"] + 1


def test_schedule_quality_vlm_and_t2v_batches():
    sq = _load()
    vlm = sq.run(3, 8, model="vlm_s", vit_tokens=sq.IMAGE_TOKENS, budget_s=0.05, trace_iterations=1)
    assert {b["regime"] for b in vlm["batches"]} == set(sq.REGIMES) | {"rise_fall"}
    _check(sq, vlm)
    assert vlm["layouts"]["dip"]["V"] >= 2          # K_i segments: the LM passes the ranks more than once
    t2v = sq.run(2, 8, model="t2v_s", budget_s=0.05, trace_iterations=1)
    assert t2v["rise_and_fall"] == {} and {b["regime"] for b in t2v["batches"]} == {"video-caption", "mixed-video"}
    _check(sq, t2v)


def test_k_overrides_set_the_dip_layouts_chunks():
    sq = _load()
    wl = sq.WORKLOADS["vlm_s"](vit_tokens=sq.IMAGE_TOKENS)
    cm, cluster = sq.cost_model(wl), sq.load_preset(sq.PROFILE)
    rep = [wl.stats(mb) for mb in wl.draw(sq.np.random.default_rng(0), "interleaved", 0, 4)]
    layouts, ki = sq.make_layouts(wl, cm, cluster, wl.paper.tp, rep, 4, 4, k_backbone=1, k_encoder=2)
    assert ki["K"] == {wl.encoder: 2, "backbone": 1} and ki["override"] == "--k-backbone --k-encoder"
    assert layouts["dip"].stage_modality == (wl.encoder,) * 8 + ("backbone",) * 4
