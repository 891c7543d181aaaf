"""autocomp-compile: Autocomp-style kernel search (plan, implement, beam search, hardware feedback)
inside compiler pipelines.

`torch.compile(model, backend="autocomp")` finds the backend through the `torch_dynamo_backends` entry
point of the installed package; importing `autocomp_compile.passes.dynamo` registers it as well (for a
source tree that is not installed). The package itself does not import torch._dynamo: evaluation
worker processes import this package and must start fast.
"""
from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.optimize import optimize
from autocomp_compile.search import Candidate, SearchConfig, SearchResult
from autocomp_compile.targets.base import EvalResult, TargetError, get_target, target_names
from autocomp_compile.workload import TensorSpec, Workload, WorkloadError, make_workload

__version__ = "0.1.0"
__all__ = [
    "Candidate", "EvalResult", "EvalSettings", "SearchConfig", "SearchResult", "TargetError", "TensorSpec",
    "Workload", "WorkloadError", "get_target", "make_workload", "optimize", "target_names",
]
