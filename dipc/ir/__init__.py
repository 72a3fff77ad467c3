"""dipc's IR. Imports nothing else of dipc but its errors."""
from dipc.ir.instructions import COMM_OPS, COMPUTE_OPS, RECV_OPS, SEND_OPS, Instruction, Op, TensorSpec
from dipc.ir.program import FORMAT_VERSION, Program, StageInfo
from dipc.ir.text import (dump_program, format_grid, format_instruction, instruction_label,
                          parse_instruction, parse_program)
from dipc.ir.jsonio import program_from_json, program_to_json
from dipc.ir.validate import validate

__all__ = ["COMM_OPS", "COMPUTE_OPS", "RECV_OPS", "SEND_OPS", "FORMAT_VERSION", "Instruction", "Op",
           "Program", "StageInfo", "TensorSpec",
           "dump_program", "format_grid", "format_instruction", "instruction_label",
           "parse_instruction", "parse_program", "program_from_json", "program_to_json", "validate"]
