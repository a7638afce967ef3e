"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("MEDVLP_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
