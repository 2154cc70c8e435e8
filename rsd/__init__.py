"""RSD: residual speculative decoding for RFSQ-token VLA policies on LIBERO."""
import os

# Torch threads share the cores with simulator workers and other stages. Spinning OpenMP threads
# then steal them from each other (a training step ran 2-4x slower beside one busy process);
# passive waiting costs nothing when the cores are free. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
