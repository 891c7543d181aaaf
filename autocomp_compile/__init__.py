"""autocomp-compile: Autocomp-style kernel search (plan, implement, beam search, hardware feedback)
inside compiler pipelines."""
from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.optimize import optimize
from autocomp_compile.passes import dynamo as _dynamo  # registers torch.compile(backend="autocomp")
from autocomp_compile.search import Candidate, SearchConfig, SearchResult
from autocomp_compile.targets.base import EvalResult, TargetError, get_target, target_names
from autocomp_compile.workload import TensorSpec, Workload, WorkloadError, make_workload

__version__ = "0.1.0"
__all__ = [
    "Candidate", "EvalResult", "EvalSettings", "SearchConfig", "SearchResult", "TargetError", "TensorSpec",
    "Workload", "WorkloadError", "get_target", "make_workload", "optimize", "target_names",
]
