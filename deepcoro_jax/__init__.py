"""DeepCORO-JAX: video-report pretraining for coronary angiography in JAX/Flax."""
