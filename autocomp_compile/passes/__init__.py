"""Graph passes: subgraph recognition on aten graphs (fx), the torch.compile backend (dynamo)."""

# Subgraph kinds the backend may replace; RMSNorm only on request (see BackendOptions.kinds).
DEFAULT_KINDS = ("attention", "mlp", "lm_head", "gemm")
ALL_KINDS = DEFAULT_KINDS + ("rmsnorm",)
