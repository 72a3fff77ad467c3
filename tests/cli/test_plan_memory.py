"""`dipc plan --memory-limit-mib`: the program carries its recompute choice; a limit nothing fits
is a one-line error with the excess and a fix."""
from click.testing import CliRunner

from dipc.cli import cli
from dipc.errors import InfeasibleMemoryError


def test_plan_with_memory_limit_recomputes_or_explains():
    ok = CliRunner().invoke(cli, ["plan", "--memory-limit-mib", "8"])
    assert ok.exit_code == 0, ok.output
    assert "recompute=" in ok.output.splitlines()[1]
    bad = CliRunner().invoke(cli, ["plan", "--memory-limit-mib", "1"])   # main() prints DipcErrors in one line
    assert isinstance(bad.exception, InfeasibleMemoryError)
    assert "over its 1.00 MiB limit" in str(bad.exception) and "Fix:" in str(bad.exception)
