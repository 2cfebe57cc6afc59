"""The densenet-jax training program: `python -m train.main --config ... --workdir ...`."""
