"""vandeven2019: van de Ven & Tolias's permuted-MNIST protocol.

Paper: van de Ven & Tolias 2019, "Three scenarios for continual learning",
https://arxiv.org/abs/1904.07734 (Table 5, permuted MNIST).

Command:
  python -m experiments.permuted_mnist --preset vandeven2019 \\
    --dataset mnist --data-dir DIR      # or --dataset idx --data-dir DIR

Expected runtime: about 15 minutes per regularised method on a 2-core x86
CPU (the 1024-input MLP, 11 to 13 ms per step; the Fisher on 54k
examples about 20 s), about 2 hours for the eight methods; KFAC-EWC adds
two 1025x1025 and 1001x1001 factors per task. On one GPU, seconds per
method (see BENCHMARKS.md).

Their protocol: MLP 2x1000 ReLU, Adam lr 1e-4 betas (0.9, 0.999), batch 128,
5000 iterations per task, 10 tasks, images zero-padded to 32x32 before
permuting (1024 inputs), the Fisher on the whole training set at the
model's own argmax label (``fisher="predicted"``, their 2019 code's
``label = output.max(1)[1]``), so that their lambdas mean what they meant:
EWC lambda 500; online EWC lambda 1000 with gamma 0.9 becomes lam 900 here
(their loss multiplies the stored Fisher by gamma once more, see the config
module's docstring); SI c = 5 (pull lam = 10). (Online) KFAC-EWC and MAS have no
value in the paper: their strengths are swept and chosen on validation.
Differences that remain: we hold out 10% of the training data for
validation (they train on all 60k); Flax's initialisation (LeCun normal
kernels, zero biases) instead of PyTorch's uniform one.
KFAC-EWC uses the exact Kronecker factors (``kfac_fisher="exact"``).
"""

from experiments.permuted_mnist.config import Config


def get_config() -> Config:
  return Config(
      preset="vandeven2019", dataset="mnist", num_tasks=10, pad_to=32,
      hidden=(1000, 1000), optimizer="adam", learning_rate=1e-4, b1=0.9,
      b2=0.999, batch_size=128, iterations=5000,
      methods=("finetune", "ewc", "online_ewc", "si", "mas", "kfac_ewc",
               "online_kfac_ewc", "joint"),
      lam=(500.0,), online_lam=(900.0,), gamma=0.9, si_c=(5.0,), si_xi=0.1,
      mas_lam=(0.1, 1.0, 10.0), kfac_lam=(100.0, 500.0, 2000.0),
      online_kfac_lam=(100.0, 500.0, 2000.0),
      fisher="predicted", kfac_fisher="exact", fisher_examples=None, seeds=(0,))
