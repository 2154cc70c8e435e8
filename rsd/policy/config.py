"""Configuration of the main policy: every size in one place, saved inside each checkpoint.

A checkpoint carries its `PolicyConfig` (with the instruction vocabulary), so it loads with no outside
files. The backbone section maps one-to-one onto a transformers `LlamaConfig`; swapping the small CPU
default for `BackboneConfig.llama2_7b()` gives OpenVLA's 7B shape with no code change.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import LlamaConfig

from rsd.config import Config
from rsd.contract import CHUNK_LEN, CODES_PER_LAYER, LATENT_DIM, LEVELS, PROPRIO_DIM

PAD_ID = 0  # instruction padding (left), masked out of attention
UNK_ID = 1  # any word missing from the vocabulary
_WORD = re.compile(r"[a-z0-9]+")


def split_words(instruction: str) -> list[str]:
    """Lower-case words of an instruction; punctuation is dropped ("Pick up the bowl." -> pick, up, the, bowl)."""
    return _WORD.findall(instruction.lower())


def build_vocab(instructions: list[str]) -> tuple[str, ...]:
    """Sorted distinct words of the training instructions: the policy's word vocabulary."""
    return tuple(sorted({word for text in instructions for word in split_words(text)}))


@dataclass
class BackboneConfig(Config):
    """The Llama transformer the prompt and the residual layers run through (fields of `LlamaConfig`)."""

    prefix: ClassVar[str] = "policy.model.backbone"

    hidden_size: int = 256
    """H: width of every token; also the size of the hidden state handed to the draft model."""
    intermediate_size: int = 688
    """Width of each SwiGLU MLP (Llama keeps it near 8/3 * H)."""
    num_hidden_layers: int = 4
    """Number of transformer blocks: the main cost of every pass."""
    num_attention_heads: int = 4
    """Query heads; must divide hidden_size."""
    num_key_value_heads: int = 4
    """Key/value heads (grouped-query attention when fewer than the query heads); must divide them."""
    max_position_embeddings: int = 128
    """Longest sequence: prompt plus one position per residual layer after the first."""
    rope_theta: float = 10000.0
    """Base wavelength of the rotary position embedding."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorms (Llama-2's value)."""
    attn_implementation: str = "eager"
    """"eager" or "sdpa". Both give cached passes that match a full recompute to ~1e-6 and no NaNs on
    left padding; eager is the default because at the small CPU size it is faster (a 1-position step
    ~25% and the prefill ~2x); sdpa is the one to pick on a GPU at the 7B shape."""

    def validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            self.check(getattr(self, name) > 0, name, "a positive int")
        self.check(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                   f"a divisor of hidden_size={self.hidden_size}")
        self.check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                   f"a divisor of num_attention_heads={self.num_attention_heads}")
        self.check((self.hidden_size // self.num_attention_heads) % 2 == 0, "num_attention_heads",
                   "such that the head size hidden_size/num_attention_heads is even (rotary embedding)")
        self.check(self.rope_theta > 0, "rope_theta", "a positive number")
        self.check(self.rms_norm_eps > 0, "rms_norm_eps", "a positive number")
        self.check(self.attn_implementation in ("eager", "sdpa"), "attn_implementation", '"eager" or "sdpa"')

    @classmethod
    def llama2_7b(cls) -> BackboneConfig:
        """Llama-2-7B's shape (OpenVLA's backbone): about 6.5B parameters in the transformer layers."""
        return cls(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5)

    def to_llama_config(self, vocab_size: int) -> LlamaConfig:
        """The transformers config; its token embedding is our instruction-word embedding."""
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            rms_norm_eps=float(self.rms_norm_eps),
            pad_token_id=PAD_ID,
            bos_token_id=None,
            eos_token_id=None,
            attn_implementation=self.attn_implementation,
        )


@dataclass
class PolicyConfig(Config):
    """The main policy: observation -> RFSQ tokens [8, 16, num_layers], one residual layer per pass."""

    prefix: ClassVar[str] = "policy.model"

    vocab: tuple[str, ...] = ()
    """Instruction words (see `build_vocab`); ids 0 and 1 are <pad> and <unk>, word i has id i + 2."""
    max_instruction_words: int = 32
    """Longest instruction, in words; a longer one is refused rather than silently cut."""
    image_size: int = 64
    """Both camera images are resized to image_size x image_size inside the model."""
    vision_channels: tuple[int, ...] = (32, 64, 128)
    """Output channels of the stride-2 3x3 convolutions of the camera encoder (shared by both cameras)."""
    vision_grid: int = 4
    """The conv features are pooled to a vision_grid x vision_grid grid: that many visual tokens per camera."""
    proprio_dim: int = PROPRIO_DIM
    """Length of the proprio vector (LIBERO: eef position 3, axis-angle 3, gripper fingers 2)."""
    num_layers: int = 4
    """L, residual layers per chunk, coarse to fine; must equal the RFSQ tokenizer's (see `check_tokenizer`)."""
    codes_per_layer: int = CODES_PER_LAYER
    """Codes per residual layer: 8 chunk steps x 16 latent dims, the tokenizer's contract."""
    levels: int = LEVELS
    """Quantization levels per code (codes are 0..levels-1); must equal the tokenizer's."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The Llama transformer (see `BackboneConfig`)."""

    def __post_init__(self) -> None:
        # YAML and JSON give lists; the config keeps tuples (hashable, and what checkpoints have always held)
        if isinstance(self.vocab, list):
            self.vocab = tuple(self.vocab)
        if isinstance(self.vision_channels, list):
            self.vision_channels = tuple(self.vision_channels)
        super().__post_init__()

    def validate(self) -> None:
        self.check(all(split_words(w) == [w] for w in self.vocab), "vocab",
                   "lower-case alphanumeric words (use build_vocab)")
        self.check(len(set(self.vocab)) == len(self.vocab), "vocab", "free of duplicates")
        self.check(len(self.vision_channels) > 0 and all(c > 0 for c in self.vision_channels), "vision_channels",
                   "a non-empty list of positive ints")
        for name in ("max_instruction_words", "image_size", "vision_grid", "proprio_dim", "num_layers"):
            self.check(getattr(self, name) > 0, name, "a positive int")
        self.check(self.codes_per_layer == CODES_PER_LAYER, "codes_per_layer",
                   f"{CODES_PER_LAYER} ({CHUNK_LEN} chunk steps x {LATENT_DIM} latent dims)")
        self.check(self.levels >= 2, "levels", "an int >= 2")
        self.check(self.image_size >= 2 ** len(self.vision_channels), "image_size",
                   f"at least {2 ** len(self.vision_channels)} for {len(self.vision_channels)} stride-2 convolutions")
        self.backbone.check(self.max_sequence_length <= self.backbone.max_position_embeddings, "max_position_embeddings",
                            f"at least {self.max_sequence_length} (prompt {self.max_prompt_length} + "
                            f"{self.num_layers - 1} residual-layer positions)")

    @property
    def vocab_size(self) -> int:
        """Rows of the word embedding: <pad>, <unk> and the words."""
        return len(self.vocab) + 2

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens of both cameras."""
        return 2 * self.vision_grid ** 2

    @property
    def max_prompt_length(self) -> int:
        """Visual tokens, proprio token, instruction words, act token."""
        return self.num_visual_tokens + 1 + self.max_instruction_words + 1

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence a chunk needs: the prompt, then one position per residual layer after the first."""
        return self.max_prompt_length + self.num_layers - 1

    def encode_instruction(self, instruction: str) -> list[int]:
        """Word ids of one instruction (unknown words -> <unk>)."""
        index = {word: i + 2 for i, word in enumerate(self.vocab)}
        ids = [index.get(word, UNK_ID) for word in split_words(instruction)]
        if not 0 < len(ids) <= self.max_instruction_words:
            raise ValueError(f"instruction {instruction!r} has {len(ids)} words; expected 1..{self.max_instruction_words}"
                             " (max_instruction_words)")
        return ids

    def check_tokenizer(self, num_layers: int, levels: int) -> None:
        """Refuse a tokenizer whose residual layers or levels differ from the policy's."""
        if (num_layers, levels) != (self.num_layers, self.levels):
            raise ValueError(f"the tokenizer has {num_layers} residual layers of {levels} levels, the policy "
                             f"expects num_layers={self.num_layers}, levels={self.levels}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (nested backbone), as stored in checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        """Inverse of `to_dict`; an unknown field is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PolicyConfig field(s): {unknown}")
        backbone = dict(data.get("backbone", {}))
        unknown = sorted(set(backbone) - {f.name for f in dataclasses.fields(BackboneConfig)})
        if unknown:
            raise ValueError(f"unknown backbone field(s): {unknown}")
        return cls(**{**data, "backbone": BackboneConfig(**backbone)})

    def differences(self, other: PolicyConfig) -> list[str]:
        """Human-readable `field: self vs other` for each field that differs (vocab summarized)."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        out = []
        for key in mine:
            a, b = mine[key], theirs[key]
            if a != b:
                shown = f"{len(a)} vs {len(b)} words, not the same list" if key == "vocab" else f"{a} vs {b}"
                out.append(f"{key}: {shown}")
        return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"backbone": {"hidden_size": 256}} -> {"backbone.hidden_size": 256}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
