"""``python -m benchmarks``: latency/FPS of the runtime (pipeline) and of the server (http).

Torch-free unless ``--reference-checkpoint`` is given (then torch/transformers/export are
imported for the reference path only)."""
