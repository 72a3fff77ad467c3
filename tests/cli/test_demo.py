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
