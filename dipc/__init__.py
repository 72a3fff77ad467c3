"""dipc: a compiler for dynamic interleaved pipeline-parallel training of large multimodal models."""
from dipc.api import CompiledPipeline, StepResult, compile, default_loss_weight
from dipc.errors import (BatchError, DipcError, InfeasibleMemoryError, IRParseError, PartitionError,
                         RuntimeStepError, ScheduleError, TaggingError, TraceError)
from dipc.runtime.timeline import MeasuredTimeline

__all__ = ["BatchError", "CompiledPipeline", "DipcError", "InfeasibleMemoryError", "IRParseError",
           "MeasuredTimeline", "PartitionError", "RuntimeStepError", "ScheduleError", "StepResult", "TaggingError",
           "TraceError", "compile", "default_loss_weight"]
__version__ = "0.1.0"
