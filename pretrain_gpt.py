"""Pretrain a GPT / Llama model: ``torchrun --nproc_per_node N pretrain_gpt.py <Megatron flags>``
(or ``deepspeed --num_gpus N pretrain_gpt.py ...``)."""
import sys

from megatron.training import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
