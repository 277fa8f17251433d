"""ritter2018_small: a long stream, 50 permuted tasks, scaled down to a CPU.

Paper: Ritter, Botev & Barber 2018, "Online Structured Laplace Approximations
for Overcoming Catastrophic Forgetting", https://arxiv.org/abs/1805.07810
(50 permuted-MNIST tasks, where Kronecker-factored curvature keeps over 90%
average accuracy and diagonal EWC and SI fall far behind).

Command:
  python -m experiments.permuted_mnist --preset ritter2018_small --vmap

Expected runtime: about 40 to 100 seconds per method and lambda on a 2-core
x86 CPU shared with other jobs (every method's lambdas as one vmapped
program), except KFAC: online_kfac_ewc about 260 s per lambda, kfac_ewc
(one exact Kronecker term per task: its steps grow slower with every task)
about 9 minutes per lambda (27 minutes for its three, measured) on top of
the other methods' 40 minutes or so. See
README's results section for the measured numbers. The grids surround the
values chosen in the rounds that README reports.

Scaled down: the embedded 5,000-digit MNIST subset (3,600 training, 400
validation and 1,000 test examples per task), MLP 2x100 ReLU, Adam lr 1e-3,
batch 64, 2 epochs (112 steps) per task, the exact Fisher (KFAC: the exact
Kronecker factors) on 1,000 examples of each task, one seed. Ritter et al.
use the full MNIST, an MLP 2x100, 10 epochs per task and their own
hyperparameter search; the strengths here are chosen on validation from the
grids below.
"""

from experiments.permuted_mnist.config import Config


def get_config() -> Config:
  return Config(
      preset="ritter2018_small", dataset="embedded", num_tasks=50,
      hidden=(100, 100), optimizer="adam", learning_rate=1e-3,
      batch_size=64, epochs=2,
      methods=("finetune", "ewc", "online_ewc", "si", "mas", "kfac_ewc",
               "online_kfac_ewc"),
      lam=(0.03, 0.1, 0.3, 1.0, 10.0), online_lam=(3.0, 10.0, 30.0, 100.0),
      gamma=0.9, si_c=(1.0, 10.0, 30.0), mas_lam=(0.01, 0.1, 1.0),
      kfac_lam=(1.0, 3.0, 10.0),
      online_kfac_lam=(1.0, 10.0, 100.0, 1000.0), fisher="exact",
      fisher_examples=1000, seeds=(0,))
