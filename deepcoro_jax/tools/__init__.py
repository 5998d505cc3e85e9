"""Command-line tools over a trained run: reports for raw files, embeddings, training curves,
attention maps, and the run loading they share (`inference`)."""
