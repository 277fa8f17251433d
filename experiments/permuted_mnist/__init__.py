"""The permuted-MNIST experiment (``python -m experiments.permuted_mnist``).

Modules: ``main`` (flags), ``config`` and ``configs/`` (presets),
``methods`` (the method registry), ``stream`` (task data on device),
``steps`` (jitted steps and evaluation), ``ops`` (one run or K stacked
members), ``loop`` (the one training loop),
``checkpointing``, ``results``, ``workdir`` (run directory and lock),
``budget`` (memory estimate) and ``experiment`` (``train_and_evaluate``).
"""
