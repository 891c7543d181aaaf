"""Target-independent evaluation machinery: an isolated worker process, correctness checks, timing."""
from autocomp_compile.evaluation.checks import compare, tolerance
from autocomp_compile.evaluation.worker import IsolatedWorker, WorkerCrash, WorkerTimeout

__all__ = ["IsolatedWorker", "WorkerCrash", "WorkerTimeout", "compare", "tolerance"]
