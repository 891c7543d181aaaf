"""CUDA target: CUDA C++ kernels built with NVRTC, launched on torch's current stream. See target.py."""
