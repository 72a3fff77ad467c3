"""Fixtures shared by the SEMU tests."""
from __future__ import annotations

import pytest

import dipc
from dipc.semu.costs import layer_cost_model
from examples.data import make_example


@pytest.fixture(scope="session")
def vlm_2stage():
    """The example VLM compiled into 2 stages: (example, pipeline, its layer cost model)."""
    ex = make_example("vlm")
    mbs = ex.data.microbatches(2, 2)
    pipe = dipc.compile(ex.model, mbs[0], num_stages=2)
    return ex, pipe, layer_cost_model(pipe.captured)
