"""TensorFlow for the input pipeline only: imported first by every module that uses TF.

TF must never reserve accelerator memory that JAX needs; the input pipeline runs on CPU.
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised, or no GPU support built in.
  pass
