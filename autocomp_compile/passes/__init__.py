"""Graph passes: subgraph recognition on aten graphs (fx), the torch.compile backend (dynamo)."""
