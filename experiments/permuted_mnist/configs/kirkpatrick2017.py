"""kirkpatrick2017: the EWC paper's permuted-MNIST panel.

Paper: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
networks", https://arxiv.org/abs/1612.00796 (Fig. 2A / PNAS Fig. 3A).

Command:
  python -m experiments.permuted_mnist --preset kirkpatrick2017 \\
    --dataset mnist --data-dir DIR

Expected runtime: about 4 minutes per method and lambda on a 2-core x86 CPU
(2.4 ms per step, 8,420 steps per task), about 30 minutes for the 7 runs.

MLP 2x400, plain SGD lr 1e-3, 20 epochs per task, 10 permuted tasks. The
paper gives neither lambda nor the batch size for this panel: lambda is
swept (chosen on validation) and the batch size (128) is ours.
"""

from experiments.permuted_mnist.config import Config


def get_config() -> Config:
  return Config(
      preset="kirkpatrick2017", dataset="mnist", num_tasks=10,
      hidden=(400, 400), optimizer="sgd", learning_rate=1e-3, momentum=0.0,
      batch_size=128, epochs=20, methods=("finetune", "l2", "ewc"),
      lam=(100.0, 1000.0, 10000.0), l2_lam=(0.01, 0.1, 1.0), fisher="exact",
      seeds=(0,))
