"""`dipc run` / python -m dipc.run: PP x DP training with async planning, checkpoint and exact
resume, and bad launches refused before any step."""
import math

import pytest
from click.testing import CliRunner

from dipc.cli import cli
from dipc.errors import DipcError
from dipc.run import RunConfig, run

pytestmark = pytest.mark.timeout(600)


def test_pp2_dp2_with_async_planning_trains():
    losses = run(RunConfig(pp=2, nproc=4, steps=3, microbatches=4, async_plan=True, timeout_s=120))
    assert len(losses) == 3 and losses[-1] < losses[0] + 1.0


def test_pp2_dp2_with_dip_plans_broadcast_per_replica_trains():
    """schedule dip: pipeline rank 0 of each replica calibrates, plans and broadcasts to its pipeline
    (each process measures its own CPU profile, so self-planned ranks could disagree)."""
    losses = run(RunConfig(pp=2, nproc=4, steps=2, microbatches=4, schedule="dip", timeout_s=180))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_resume_continues_exactly(tmp_path):
    full = run(RunConfig(pp=2, steps=4, microbatches=2, timeout_s=120))
    ckpt = str(tmp_path / "ckpt")
    first = run(RunConfig(pp=2, steps=2, microbatches=2, checkpoint_dir=ckpt, checkpoint_every=2, timeout_s=120))
    rest = run(RunConfig(pp=2, steps=4, microbatches=2, checkpoint_dir=ckpt, resume=True, timeout_s=120))
    assert first == full[:2] and rest == full[2:]          # bit for bit on CPU float32


def test_bad_launches_are_refused_before_training(tmp_path):
    with pytest.raises(DipcError, match="not divisible"):
        run(RunConfig(pp=2, nproc=3))
    with pytest.raises(DipcError, match="cannot feed"):
        run(RunConfig(pp=1, nproc=2, microbatches=1))
    result = CliRunner().invoke(cli, ["run", "--resume", "--checkpoint-dir", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "no checkpoint" in result.output and "Traceback" not in result.output
