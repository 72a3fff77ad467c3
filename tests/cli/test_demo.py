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
    assert "GFLOP/s" in result.output
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
