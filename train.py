"""Train a Mamba language model.

    python train.py                                      # a small model on the built-in corpus (CPU: minutes)
    python train.py --model_size medium --vram 16gb      # the main job on one GPU
    python train.py --data_dir data/ --training careful --config run.json
    python train.py --resume                             # continue the newest run exactly
    torchrun --nproc_per_node=2 train.py ...             # several GPUs (DDP)

Every setting is a flag (python train.py --help); see README.md, sections usage and training.
"""
import sys

from utils import cpu_threads

cpu_threads.configure()             # before torch is imported: threads that sleep when idle, no more than the CPUs

from training.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
