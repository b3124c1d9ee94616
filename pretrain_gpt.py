"""Pretrain a GPT / Llama model: ``torchrun --nproc_per_node N pretrain_gpt.py <Megatron flags>``."""
from megatron.training import pretrain

if __name__ == "__main__":
    pretrain()
