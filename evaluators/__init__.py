"""Evaluator plugins: each module registers its class by type (``common.register``), and
``config.evals[name].type`` picks one; they get predict functions, never the model."""
