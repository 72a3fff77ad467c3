"""Test-wide settings: Triton in interpreter mode (read when kernels are defined, so set before any
import), one intra-op thread (the CI machine has 2 cores and tests spawn processes)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
