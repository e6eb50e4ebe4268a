"""`python -m cnn_sparsegpt ...`, which torchrun needs: `torchrun --nproc_per_node=N -m cnn_sparsegpt prune ...`."""
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .commands.cli import main

if __name__ == "__main__":
    sys.exit(record(main)())
