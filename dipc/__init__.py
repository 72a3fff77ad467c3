"""dipc: a compiler for dynamic interleaved pipeline-parallel training of large multimodal models."""
from dipc.api import CompiledPipeline, StepResult, compile, default_loss_weight
from dipc.errors import (BatchError, DipcError, InfeasibleMemoryError, IRParseError, PartitionError,
                         RuntimeStepError, ScheduleError, TaggingError, TraceError)
from dipc.passes.submicrobatch import SplitByGroup, SplitLeadingDim, SubMicrobatches
from dipc.runtime.timeline import MeasuredTimeline

__all__ = ["BatchError", "CompiledPipeline", "DipcError", "InfeasibleMemoryError", "IRParseError",
           "MeasuredTimeline", "PartitionError", "RuntimeStepError", "ScheduleError", "SplitByGroup",
           "SplitLeadingDim", "StepResult", "SubMicrobatches", "TaggingError", "TraceError", "compile",
           "default_loss_weight"]
__version__ = "0.1.0"
