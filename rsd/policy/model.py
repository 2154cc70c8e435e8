"""The main policy: camera images, proprio and instruction -> RFSQ action tokens, one residual layer per pass.

Prompt (one row per sample, left-padded so the act token is always last):
    [pad..., agentview tokens, wrist tokens, proprio token, instruction words, act]
The backbone's output at the act token is the hidden state [H] (what the draft model reads) and gives
layer 0's logits through head 0. Each further residual layer l costs ONE more position: the summed
embedding of layer l-1's 128 codes, whose output gives layer l's logits through head l. On a CPU a
pass's cost grows with its positions, so one position per layer (not 128) keeps decoding cheap, and the
speculative verify pass (`step_many`) checks several layers with only a few positions.

Codes of one layer are tokens[..., l] of a chunk's tokens [8, 16, L], flattened row-major to [128].
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, LlamaModel

from rsd.io import first_non_finite, load_torch, misfit_message, save_torch, state_dict_problems
from rsd.policy.config import PAD_ID, PolicyConfig

CHECKPOINT_FORMAT = "rsd-main-policy"
FORMAT_VERSION = 3  # 2: proprio standardisation statistics in the state dict; 3: the tokenizer's fingerprint

Observation = dict[str, Tensor]
"""agentview uint8 [B,h,w,3], wrist uint8 [B,h,w,3], proprio float [B,P], instruction_ids long [B,T],
instruction_mask long [B,T] (1 = word, 0 = left padding; see `MainPolicy.encode_instructions`)."""


@dataclass
class PolicyCache:
    """The transformers KV cache plus the attention mask of the positions it holds.

    The mask must travel with the cache: left padding differs per sample, and every later pass has to
    keep ignoring those positions and number its own positions from each sample's true length.
    """

    kv: DynamicCache
    attention_mask: Tensor  # [B, S] long, 1 = real position, 0 = left padding
    prompt_length: int  # S right after prefill

    @property
    def num_positions(self) -> int:
        """Positions held: the prompt, then one per residual layer fed so far."""
        return self.attention_mask.shape[1]

    def crop(self, num_positions: int) -> None:
        """Cut the cache back to its first `num_positions` positions (e.g. after a rejected draft layer)."""
        if not self.prompt_length <= num_positions <= self.num_positions:
            raise ValueError(f"cannot crop a cache of {self.num_positions} positions to {num_positions}; "
                             f"expected {self.prompt_length} (the prompt) to {self.num_positions}")
        if num_positions < self.num_positions:
            self.kv.crop(num_positions - self.num_positions)  # a negative count drops the last entries
            self.attention_mask = self.attention_mask[:, :num_positions]


class CameraEncoder(nn.Module):
    """One conv net shared by both cameras; a camera embedding tells the backbone which camera a token is from."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        hidden, grid = config.backbone.hidden_size, config.vision_grid
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in config.vision_channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, c_out), c_out), nn.GELU()]
            c_in = c_out
        self.image_size = config.image_size
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid))
        self.proj = nn.Linear(c_in, hidden)
        self.cell_embed = nn.Parameter(0.02 * torch.randn(grid * grid, hidden))  # where in the image
        self.camera_embed = nn.Parameter(0.02 * torch.randn(2, hidden))  # agentview, wrist

    def forward(self, images: Tensor) -> Tensor:
        """images uint8 [B, 2, h, w, 3] (agentview, wrist) -> visual tokens [B, 2 * grid², H]."""
        B = images.shape[0]
        x = images.flatten(0, 1).permute(0, 3, 1, 2).float()  # [2B, 3, h, w] in 0..255
        if x.shape[-2:] != (self.image_size, self.image_size):  # float32: antialiased resize has no bf16 kernel
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = self.conv((x / 127.5 - 1.0).to(self.proj.weight.dtype))  # [2B, C, grid, grid]
        x = self.proj(x.flatten(2).transpose(1, 2)) + self.cell_embed  # [2B, grid², H]
        x = x.unflatten(0, (B, 2)) + self.camera_embed[:, None]  # [B, 2, grid², H]
        return x.flatten(1, 2)


class MainPolicy(nn.Module):
    """Observation -> RFSQ tokens [B, 8, 16, L], one residual layer per backbone pass: `prefill`, then `step`
    (or `step_many`) per further layer. The decoding itself (greedy, with or without a draft) is rsd.engine's."""

    def __init__(self, config: PolicyConfig, tokenizer_fingerprint: str | None = None) -> None:
        """An untrained policy; `tokenizer_fingerprint` is `RFSQTokenizer.fingerprint()` of the tokenizer whose
        codes it learns (train_policy sets it; None for a policy built in memory, which cannot be saved)."""
        super().__init__()
        self.config = config
        # not a weight: same shapes are not the same tokenizer, and a policy decodes only the one it learnt
        self.tokenizer_fingerprint = tokenizer_fingerprint
        hidden, codes, levels = config.backbone.hidden_size, config.codes_per_layer, config.levels
        self.camera_encoder = CameraEncoder(config)
        self.proprio_encoder = nn.Sequential(nn.Linear(config.proprio_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.act_embed = nn.Parameter(0.02 * torch.randn(hidden))
        # the Llama token embedding doubles as the instruction-word embedding (row PAD_ID stays zero)
        self.backbone = LlamaModel(config.backbone.to_llama_config(config.vocab_size))
        # a residual layer's input: sum over its 128 code positions of a (position, code value) embedding
        self.code_embed = nn.Embedding(codes * levels, hidden)  # row = position * levels + code
        nn.init.normal_(self.code_embed.weight, std=0.02 / math.sqrt(codes))  # the sum then has std ~0.02
        self.layer_embed = nn.Embedding(config.num_layers - 1, hidden)  # which layer's codes are fed
        nn.init.normal_(self.layer_embed.weight, std=0.02)
        self.heads = nn.ModuleList(nn.Linear(hidden, codes * levels) for _ in range(config.num_layers))
        self.register_buffer("code_offsets", torch.arange(codes) * levels, persistent=False)  # [128]
        # the training data's proprio mean and std (see `set_proprio_stats`); saved with the weights
        self.register_buffer("proprio_mean", torch.zeros(config.proprio_dim))
        self.register_buffer("proprio_std", torch.ones(config.proprio_dim))

    def set_proprio_stats(self, proprio: Tensor) -> None:
        """Standardise the proprio input by the mean and std of `proprio` [N, P] (the training samples).

        Raw, a 3 cm height error is 0.03 beside an axis-angle of ~3, and the gripper's finger positions span
        0.04: too little for the encoder to resolve in a short schedule (Adam moves a weight by ~lr a step).
        """
        self.proprio_mean.copy_(proprio.mean(dim=0))
        self.proprio_std.copy_(proprio.std(dim=0).clamp(min=1e-3))  # a constant dimension stays finite

    # ---- inputs -------------------------------------------------------------------------------------

    def encode_instructions(self, instructions: list[str]) -> dict[str, Tensor]:
        """Instruction strings -> {"instruction_ids": long [B,T], "instruction_mask": long [B,T]}, left-padded."""
        ids = [self.config.encode_instruction(text) for text in instructions]
        T = max(map(len, ids))
        device = self.code_offsets.device
        return {
            "instruction_ids": torch.tensor([[PAD_ID] * (T - len(x)) + x for x in ids], device=device),
            "instruction_mask": torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=device),
        }

    def _prompt(self, obs: Observation) -> tuple[Tensor, Tensor]:
        """Observation -> prompt embeddings [B, P, H] and attention mask [B, P], padding on the far left."""
        images = torch.stack([obs["agentview"], obs["wrist"]], dim=1)  # [B, 2, h, w, 3]
        visual = self.camera_encoder(images)  # [B, 2 * grid², H]
        B = visual.shape[0]
        proprio = (obs["proprio"] - self.proprio_mean) / self.proprio_std  # [B, P], standardised
        proprio = self.proprio_encoder(proprio.to(visual.dtype))[:, None]  # [B, 1, H]
        words = self.backbone.embed_tokens(obs["instruction_ids"])  # [B, T, H]
        act = self.act_embed.expand(B, 1, -1)  # [B, 1, H]
        embeds = torch.cat([visual, proprio, words, act], dim=1)  # [B, P, H]
        ones = obs["instruction_mask"].new_ones(B, visual.shape[1] + 1)
        mask = torch.cat([ones, obs["instruction_mask"], ones[:, :1]], dim=1).long()  # [B, P]
        # move each row's padding in front of its visual tokens: a stable sort keeps the real order
        order = torch.argsort(mask, dim=1, stable=True)  # [B, P]
        return embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order)

    def _embed_codes(self, codes: Tensor, first_layer: int) -> Tensor:
        """codes [B, n, 128] of layers first_layer.. -> one input embedding per layer [B, n, H]."""
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < self.config.levels):
            raise ValueError(f"codes must lie in 0..{self.config.levels - 1}, got {int(codes.min())}..{int(codes.max())}")
        return self.code_inputs(codes, torch.arange(first_layer, first_layer + codes.shape[1], device=codes.device))

    def code_inputs(self, codes: Tensor, layers: Tensor) -> Tensor:
        """codes [B, n, 128] in range, of `layers` [n] -> their input embeddings [B, n, H]; no host read, so the
        compiled path (rsd.compiled) calls it inside its graphs."""
        return self.code_embed(codes + self.code_offsets).sum(dim=-2) + self.layer_embed(layers)  # [B, n, H]

    def _logits(self, x: Tensor, first_layer: int) -> Tensor:
        """Backbone outputs [B, n, H] of layers first_layer.. -> logits [B, n, 128, levels]."""
        logits = torch.stack([self.heads[first_layer + i](x[:, i]) for i in range(x.shape[1])], dim=1)
        return logits.unflatten(-1, (self.config.codes_per_layer, self.config.levels))

    def _backbone(self, embeds: Tensor, mask: Tensor, positions: Tensor, kv: DynamicCache | None) -> Tensor:
        """Llama over embeds [B, n, H]; mask covers the cached and the new positions. -> [B, n, H]."""
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=kv,
                            use_cache=kv is not None)
        return out.last_hidden_state

    # ---- inference (no autograd) ----------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, obs: Observation) -> tuple[Tensor, Tensor, PolicyCache]:
        """Prompt pass -> hidden_state [B, H] (act position), layer-0 logits [B, 128, levels], cache."""
        embeds, mask = self._prompt(obs)  # [B, P, H], [B, P]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each sample counts from its first real token
        kv = DynamicCache(config=self.backbone.config)
        hidden = self._backbone(embeds, mask, positions, kv)[:, -1]  # [B, H]
        return hidden, self._logits(hidden[:, None], 0)[:, 0], PolicyCache(kv, mask, mask.shape[1])

    @torch.no_grad()
    def step_many(self, codes: Tensor, first_layer: int, cache: PolicyCache) -> Tensor:
        """Feed codes [B, n, 128] of layers first_layer..first_layer+n-1 in ONE pass (n positions appended
        to the cache) -> logits [B, n, 128, levels] of layers first_layer+1..first_layer+n."""
        B, n, _ = codes.shape
        check_feed(self.config.num_layers, first_layer, n, cache.num_positions, cache.prompt_length)
        positions = cache.attention_mask.sum(dim=1, keepdim=True) + torch.arange(n, device=codes.device)  # [B, n]
        mask = torch.cat([cache.attention_mask, cache.attention_mask.new_ones(B, n)], dim=1)  # [B, S + n]
        out = self._backbone(self._embed_codes(codes, first_layer), mask, positions, cache.kv)  # [B, n, H]
        cache.attention_mask = mask
        return self._logits(out, first_layer + 1)

    def step(self, codes: Tensor, layer: int, cache: PolicyCache) -> Tensor:
        """Feed layer-1's codes [B, 128] (one position appended to the cache) -> logits [B, 128, levels] of `layer`."""
        return self.step_many(codes[:, None], layer - 1, cache)[:, 0]

    # ---- training -------------------------------------------------------------------------------------

    def forward_teacher(self, obs: Observation, tokens: Tensor) -> Tensor:
        """Teacher forcing, one pass over the prompt and L-1 layer positions: tokens [B, 8, 16, L] ->
        logits [B, L, 128, levels], layer l's logits seeing the true codes of layers < l."""
        embeds, mask = self._prompt(obs)  # [B, P, H], [B, P]
        codes = tokens.flatten(1, 2).transpose(1, 2)  # [B, L, 128]
        layer_inputs = self._embed_codes(codes[:, :-1], 0)  # [B, L-1, H]
        embeds = torch.cat([embeds, layer_inputs], dim=1)  # [B, P + L-1, H]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], layer_inputs.shape[1])], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self._backbone(embeds, mask, positions, None)  # [B, P + L-1, H]
        return self._logits(out[:, -self.config.num_layers:], 0)  # act position, then the L-1 layer positions

    def loss(self, obs: Observation, tokens: Tensor, layer_weights: Tensor | None = None) -> Tensor:
        """Behaviour-cloning cross entropy over every code of every layer; `layer_weights` [L] weighs each
        layer's mean (they are normalised to sum to 1; None = equal weights)."""
        logits = self.forward_teacher(obs, tokens)  # [B, L, 128, levels]
        target = tokens.flatten(1, 2).transpose(1, 2)  # [B, L, 128]
        per_layer = F.cross_entropy(logits.transpose(1, 3).float(), target.transpose(1, 2), reduction="none").mean(dim=(0, 1))  # [L]
        if layer_weights is None:
            return per_layer.mean()
        return (per_layer * layer_weights).sum() / layer_weights.sum()

    # ---- checkpoints ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Config (with vocabulary) + weights + the tokenizer's fingerprint, written atomically."""
        if not _is_fingerprint(self.tokenizer_fingerprint):
            raise ValueError(f"cannot save the main policy to {path}: it records no tokenizer (tokenizer_fingerprint="
                             f"{self.tokenizer_fingerprint!r}); set it to RFSQTokenizer.fingerprint() of the tokenizer "
                             f"it was trained on, as train_policy does")
        save_torch(path, {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
                          "config": self.config.to_dict(), "state_dict": self.state_dict(),
                          "tokenizer_fingerprint": self.tokenizer_fingerprint})

    @classmethod
    def load(cls, path: str | os.PathLike, config: PolicyConfig | None = None) -> MainPolicy:
        """Rebuild the policy a checkpoint describes; with `config`, refuse a checkpoint saved with another one."""
        ckpt = load_torch(path, "main policy")
        version = ckpt.get("format_version")
        if ckpt.get("format") == CHECKPOINT_FORMAT and isinstance(version, int) and version < FORMAT_VERSION:
            raise ValueError(f"main policy checkpoint {path} is of format v{version}, from before a policy recorded "
                             f"the tokenizer it was trained on; this code reads v{FORMAT_VERSION}: retrain it, "
                             f"`dvc repro policy`")
        if ckpt.get("format") != CHECKPOINT_FORMAT or version != FORMAT_VERSION:
            raise ValueError(f"{path} is not a main policy checkpoint of format {CHECKPOINT_FORMAT!r} v{FORMAT_VERSION} "
                             f"(found {ckpt.get('format')!r} v{version})")
        fingerprint = ckpt.get("tokenizer_fingerprint")
        if not _is_fingerprint(fingerprint):
            raise ValueError(f"main policy checkpoint {path} has tokenizer_fingerprint={fingerprint!r}, expected the "
                             f"sha256 (64 hex digits) of the tokenizer it was trained on: retrain it, `dvc repro policy`")
        try:
            saved = PolicyConfig.from_dict(ckpt["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"main policy checkpoint {path} has an invalid config: {exc}") from exc
        if config is not None and config != saved:
            raise ValueError(f"main policy checkpoint {path} was saved with another config (expected vs saved): "
                             + "; ".join(config.differences(saved)))
        model = cls(saved, fingerprint)
        problems = state_dict_problems(model, ckpt.get("state_dict", {}))
        if problems:
            raise ValueError(f"main policy checkpoint {path} does not fit its config: " + misfit_message(problems))
        bad = first_non_finite(ckpt["state_dict"])  # NaN weights still decode, to codes that mean nothing
        if bad:
            raise ValueError(f"main policy checkpoint {path} holds non-finite weights ({bad}); expected finite "
                             f"weights: retrain it, `dvc repro policy`")
        model.load_state_dict(ckpt["state_dict"])
        return model


def check_feed(num_layers: int, first_layer: int, n: int, num_positions: int, prompt_length: int) -> None:
    """Refuse a pass feeding layers first_layer..first_layer+n-1 that the policy does not predict from, or into
    a cache holding other than the prompt and one position per earlier layer."""
    if not (n >= 1 and 0 <= first_layer and first_layer + n <= num_layers - 1):
        raise ValueError(f"cannot feed layers {first_layer}..{first_layer + n - 1}: the policy predicts layers "
                         f"1..{num_layers - 1} from layers 0..{num_layers - 2}")
    if num_positions != prompt_length + first_layer:
        raise ValueError(f"the cache holds {num_positions} positions, feeding layer {first_layer} needs "
                         f"{prompt_length + first_layer} (prompt + one per earlier layer); crop it first")


def _is_fingerprint(value: object) -> bool:
    """A tokenizer fingerprint: a sha256 as 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
