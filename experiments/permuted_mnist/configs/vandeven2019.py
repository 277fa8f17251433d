"""vandeven2019: van de Ven & Tolias's permuted-MNIST protocol.

Paper: van de Ven & Tolias 2019, "Three scenarios for continual learning",
https://arxiv.org/abs/1904.07734 (Table 5, permuted MNIST).

Command:
  python -m experiments.permuted_mnist --preset vandeven2019 \\
    --dataset mnist --data-dir DIR      # or --dataset idx --data-dir DIR

Expected runtime: about 13 minutes per regularised method on a 2-core x86
CPU (11 ms per step, the exact Fisher on 54k examples 17 s), about 1 hour
for the five methods; on one GPU, seconds per method (see BENCHMARKS.md).

Their protocol: MLP 2x1000 ReLU, Adam lr 1e-4 betas (0.9, 0.999), batch 128,
5000 iterations per task, 10 tasks, Fisher on the whole training set. EWC
lambda 500 carries over; online EWC lambda 1000 with gamma 0.9 becomes lam
900 here (see the config module's docstring); SI c = 5 (pull lam = 10).
Differences: their 2019 code used the model's argmax label for the Fisher,
we use the exact Fisher (their current default); we hold out 10% of the
training data for validation.
"""

from experiments.permuted_mnist.config import Config


def get_config() -> Config:
  return Config(
      preset="vandeven2019", dataset="mnist", num_tasks=10,
      hidden=(1000, 1000), optimizer="adam", learning_rate=1e-4, b1=0.9,
      b2=0.999, batch_size=128, iterations=5000,
      methods=("finetune", "ewc", "online_ewc", "si", "joint"),
      lam=(500.0,), online_lam=(900.0,), gamma=0.9, si_c=(5.0,), si_xi=0.1,
      fisher="exact", fisher_examples=None, seeds=(0,))
