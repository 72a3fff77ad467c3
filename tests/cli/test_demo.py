"""The README's main job runs end to end and its loss falls."""
import re

from click.testing import CliRunner

from dipc.cli import cli


def test_demo_local_executor_trains():
    result = CliRunner().invoke(cli, ["demo", "--executor", "local", "--steps", "12", "--stages", "2"])
    assert result.exit_code == 0, result.output
    assert "stage 0 rank 0 [vision]" in result.output
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", result.output).groups())
    assert last < first - 0.5, result.output


def test_demo_rejects_unknown_model():
    result = CliRunner().invoke(cli, ["demo", "--model", "gpt5"])
    assert result.exit_code != 0 and "gpt5" in result.output


def test_profile_writes_a_loadable_profile(tmp_path):
    from dipc.semu.profiles import load_profile

    out = tmp_path / "cpu.json"
    result = CliRunner().invoke(cli, ["profile", "--quick", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "GFLOP/s" in result.output and "full " in result.output   # checkpointing costs per op
    assert load_profile(out).device.peak_flops["float32"] > 0


def test_profile_to_unwritable_path_is_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["profile", "--quick", "--device", "cpu", "--out", "/proc/nope/p.json"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "Fix:" in result.output


def test_presets_lists_h800():
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0 and "h800" in result.output


def test_trace_writes_gantt_png_and_chrome_traces(tmp_path):
    import json

    out = tmp_path / "t.png"
    result = CliRunner().invoke(cli, ["trace", "--stages", "2", "--microbatches", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    traces = sorted(tmp_path.glob("t.*.json"))
    assert len(traces) == 2 and all(json.loads(p.read_text())["traceEvents"] for p in traces)
    assert "interleaved_1f1b" in result.output and "DIP" in result.output


def test_plan_show_round_trip_and_bad_dump(tmp_path):
    out = tmp_path / "prog.txt"
    result = CliRunner().invoke(cli, ["plan", "--microbatches", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for path in (out, out.with_suffix(".json")):
        shown = CliRunner().invoke(cli, ["show", str(path)])
        assert shown.exit_code == 0 and "valid, schedule 1f1b, 2 ranks, 3 microbatches" in shown.output
        assert "NCCL streams (one per message direction): no wait cycle" in shown.output
    bad = tmp_path / "bad.txt"
    bad.write_text("# dipc-ir v1\nprogram schedule=1f1b ranks=2 microbatches=1\nrank 0:\n  FLY stage=0\n")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "dipc", "show", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "FLY" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_dump_and_simulate_commands(tmp_path):
    result = CliRunner().invoke(cli, ["dump", "--microbatches", "2", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert {"program.txt", "timeline.json", "schedule.csv"} <= {p.name for p in (tmp_path / "d").iterdir()}
    sim = CliRunner().invoke(cli, ["simulate", "--stages", "2", "--batches", "1", "--microbatches", "4",
                                   "--schedules", "1f1b,zb_h1"])
    assert sim.exit_code == 0, sim.output
    assert "1f1b" in sim.output and "DIP" in sim.output
    bad = CliRunner().invoke(cli, ["simulate", "--schedules", "2f2b"])
    assert bad.exit_code != 0 and "Fix:" in bad.output


def test_dump_measure_runs_the_step_and_writes_measured_files(tmp_path):
    import json

    out = tmp_path / "d"
    result = CliRunner().invoke(cli, ["dump", "--microbatches", "2", "--measure", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"gantt.png", "measured.png", "measured.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "measured.json").read_text())["otherData"]["source"] == "measured"
    assert re.search(r"measured \(local executor\): step [\d.]+ ms, \d+ instructions", result.output)


def test_dump_to_unwritable_directory_is_one_line_error():
    result = CliRunner().invoke(cli, ["dump", "--microbatches", "2", "--out", "/proc/dipc-no/d"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot write dumps" in lines[0] and "Fix:" in lines[0], result.output
