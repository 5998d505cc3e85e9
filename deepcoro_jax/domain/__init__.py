"""The angiography domain in plain Python: the report schema and the tokenizers.

No JAX, no TensorFlow, and nothing else of the project."""
