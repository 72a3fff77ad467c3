"""`dipc plan/dump --sub-microbatches`: programs with vision sub-microbatches from the command line."""
from click.testing import CliRunner

from dipc.cli import cli


def test_plan_with_sub_microbatches_and_bad_flag(tmp_path):
    result = CliRunner().invoke(cli, ["plan", "--microbatches", "2", "--sub-microbatches", "vision=1"])
    assert result.exit_code == 0, result.output
    assert "subs modality=vision counts=" in result.output and " sub=1" in result.output
    bad = CliRunner().invoke(cli, ["plan", "--sub-microbatches", "vision"])
    assert bad.exit_code != 0 and "MODALITY=N" in bad.output
    result = CliRunner().invoke(cli, ["dump", "--microbatches", "2", "--sub-microbatches", "vision=2",
                                      "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "program.txt").exists() and not (tmp_path / "d" / "schedule.csv").exists()
