"""quick (the default): permuted MNIST scaled down to minutes on a CPU.

Paper: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
networks", https://arxiv.org/abs/1612.00796 (the permuted-MNIST benchmark of
Goodfellow et al. 2013).

Command:
  python -m experiments.permuted_mnist

Expected runtime: about 2 to 3 minutes on a 2-core x86 CPU (compile
included) on the embedded 5,000-digit MNIST subset that ``--dataset auto``
falls back to; where TFDS MNIST is prepared, auto loads the full 60k MNIST
and the run takes about 15x longer (add ``--dataset embedded``).

10 tasks, MLP 2x256, Adam lr 1e-3, batch 64, 5 epochs per task, exact
Fisher, all six methods, two strengths per regularised method (chosen on
validation), seeds 0-2. The strengths were chosen by measuring sweeps (EWC
lam 30-10000, online EWC 30-10000, SI c 1-100, L2 1e-4-1e-2).
"""

from experiments.permuted_mnist.config import Config


def get_config() -> Config:
  return Config()
