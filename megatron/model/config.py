"""The model's shape: must match on load; parallel sizes are not part of it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from megatron.model.moe_config import MoEConfig


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    ffn_hidden_size: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    normalization: str = "layernorm"  # layernorm | rmsnorm
    swiglu: bool = False
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope | alibi
    embed_layernorm: bool = False  # a norm right after the word embedding (BLOOM)
    openai_gelu: bool = False  # GeLU's tanh approximation (GPT-2's gelu_new, BLOOM)
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    add_bias_linear: bool = True
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128
    moe: MoEConfig | None = None  # Mixture-of-Experts layers, if any

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from a checkpoint's JSON
            object.__setattr__(self, "moe", MoEConfig.from_json(self.moe))
        if self.moe is not None and any(not 0 <= i < self.num_layers for i in self.moe.layers):
            raise ValueError(f"MoE layers {list(self.moe.layers)} outside the {self.num_layers} layers of the model")
        if self.ffn_hidden_size is None:  # Megatron's defaults; SwiGLU keeps the MLP's parameter count
            ffn = max(64, int(8 * self.hidden_size / 3 / 64) * 64) if self.swiglu else 4 * self.hidden_size
            object.__setattr__(self, "ffn_hidden_size", ffn)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", self.seq_length)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} attention heads")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                             f"--num-key-value-heads {self.num_key_value_heads}: each KV head must serve "
                             f"the same number of query heads")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"--position-embedding-type rope needs an even head size, got --hidden-size "
                             f"{self.hidden_size} / --num-attention-heads {self.num_attention_heads} = {self.head_dim}")
        if self.normalization not in ("layernorm", "rmsnorm"):
            raise ValueError(f"--normalization must be layernorm or rmsnorm, got {self.normalization!r}")
        if self.position_embedding_type not in ("learned_absolute", "rope", "alibi"):
            raise ValueError(f"--position-embedding-type must be learned_absolute, rope or alibi, "
                             f"got {self.position_embedding_type!r}")
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                             f"{self.max_position_embeddings}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's padding: a multiple of make-vocab-size-divisible-by x TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_parallel(self, tp: int, pp: int) -> None:
        """Refuse layouts that do not divide the model, naming the flag to change."""
        checks = [
            (self.num_attention_heads % tp == 0,
             f"--num-attention-heads {self.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}"),
            (self.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}"),
            (self.num_layers % pp == 0,
             f"--num-layers {self.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"),
        ]
        kv = self.num_key_value_heads
        checks.append((kv % tp == 0 or tp % kv == 0,
                       f"--num-key-value-heads {kv} and --tensor-model-parallel-size {tp}: one must "
                       f"divide the other (KV heads are split over TP, or repeated when TP is larger)"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "ModelConfig":
        names = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in d.items() if k in names})

    SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                    "vocab_size", "ffn_hidden_size", "swiglu", "normalization",
                    "position_embedding_type", "tie_embeddings", "add_bias_linear",
                    "max_position_embeddings", "embed_layernorm")

    def first_shape_difference(self, other: "ModelConfig") -> str | None:
        """The first shape field that differs, as a message, or None."""
        for name in self.SHAPE_FIELDS:
            if name == "max_position_embeddings" and self.position_embedding_type != "learned_absolute":
                continue  # RoPE and ALiBi have no position table: a longer context may resume
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"{name}: checkpoint has {b!r}, this run has {a!r}"
        if self.moe is None:
            return None if other.moe is None else "num_experts: checkpoint has experts, this run is a dense model"
        return self.moe.first_shape_difference(other.moe)


def require_features(need: list[tuple[bool, str]], architecture: str) -> None:
    """Refuse a model that ``architecture`` (a transformers class) cannot express, naming every
    flag or property it lacks. ``need``: (present?, flag) pairs."""
    missing = [flag for ok, flag in need if not ok]
    if missing:
        raise ValueError(f"this model does not map onto transformers' {architecture}: it needs "
                         f"{', '.join(missing)}")
