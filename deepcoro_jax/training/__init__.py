"""Training: a run built from its config (`run`), the loop (`train`, for launch.py alone), and the
optimizer, sharding, checkpoint and memory helpers they use."""
