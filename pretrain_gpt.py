"""Pretrain a GPT / Llama model: ``torchrun --nproc_per_node N pretrain_gpt.py <Megatron flags>``."""
import sys

from megatron.training import main

if __name__ == "__main__":
    sys.exit(main())
