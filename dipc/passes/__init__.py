"""dipc's passes: front-end capture, tagging, partitioning, cost, scheduling and codegen.

Each pass is a plain, pure function in its own module; import the module you need
(e.g. ``from dipc.passes.schedules import get_schedule``).
"""
