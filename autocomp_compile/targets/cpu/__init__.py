"""CPU target: C with OpenMP and x86 SIMD intrinsics (AVX2, AVX-512, AVX512-BF16). See target.py."""
