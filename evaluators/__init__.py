"""Evaluator plugins, chosen by ``config.evals[name].type``."""
