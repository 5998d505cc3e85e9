"""Data preparation and the tf.data training pipeline (the only TensorFlow users)."""
