"""Multi-process start-up (jax.distributed) and cluster templates (SLURM, Kubernetes JobSet)."""
