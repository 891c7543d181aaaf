"""Beam search over candidate kernels, and the run directory it writes."""
from autocomp_compile.search.beam import BeamSearch, SearchConfig, SearchResult, summarize
from autocomp_compile.search.candidate import Candidate

__all__ = ["BeamSearch", "Candidate", "SearchConfig", "SearchResult", "summarize"]
