"""The compiled inference path, for the GPU: the main policy on a static KV cache with fixed-shape
passes, and the draft, each compiled by `torch.compile` and, on CUDA, captured as a CUDA graph.

Eager decoding on a GPU is bound by kernel launches, not by the weights: at the Llama-2-7B shape a
one-position pass takes ~23 ms eagerly against a ~3 ms floor (reading 13 GB of bf16 weights). A CUDA
graph replays a whole pass with one launch, but needs every shape fixed and every buffer at a fixed
address. So here:

- the instruction is left-padded to a fixed number of words (`max_words`), so the prefill has one
  shape whatever the instruction;
- the KV cache is transformers' `StaticCache`, sized for that prompt plus the L-1 layer positions and
  written in place; cutting it back after a rejected draft layer only moves its write position;
- the attention mask is built here (4-D, additive): a query sees the real prompt positions and the
  positions up to its own; a padding position sees only itself, so its row stays finite and no real
  query reads it;
- a pass's first layer is a tensor, not a Python int, and the output heads are stacked into one
  weight, so the passes make three graphs (prefill, one position, the K-position verify pass)
  whatever layer they feed.

The graphs are captured by hand (`CapturedGraph`), not by torch.compile's `reduce-overhead` mode, whose
replays do their bookkeeping in Python: the engine reads the accept decision back between passes, so
host work there is not hidden behind the GPU's. At the 7B shape on an H200 the speculative path spent
4-5 ms a call beyond its passes with that mode, ~2 ms with the graphs captured here.

`CompiledPolicy` has what the engine calls on a policy (`prefill`, `step`, `step_many`,
`encode_instructions`), so `compiled_engines` builds ordinary `RSDEngine`s on it. With `compile=False`
the same static-cache code runs eagerly: that is how the CPU tests check it against the dynamic cache.
Weights are read when it is built: rebuild it after loading others.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import StaticCache

from rsd.draft.model import proposer
from rsd.engine import RSDEngine
from rsd.policy.config import PAD_ID
from rsd.policy.model import MainPolicy, Observation, check_feed
from rsd.tokenizer.model import RFSQTokenizer


class CapturedGraph:
    """A fixed-shape function captured as one CUDA graph: a call copies its inputs into the graph's own
    buffers, replays it, and returns copies of its outputs (the next replay overwrites them).

    Capturing needs a few untimed runs first (compilation, cuBLAS workspaces); `undo` is called after each,
    to take back what a run wrote into persistent state (the KV cache's write position)."""

    @torch.inference_mode()  # the buffers are inference tensors: every call writes them in inference mode too
    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...], undo: Callable[[], None]) -> None:
        self.inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(*self.inputs)
                undo()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the state stays as it was
            self.outputs = fn(*self.inputs)

    @torch.inference_mode()
    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return tuple(out.clone() for out in self.outputs)


class StaticPolicyCache:
    """The engine's view of the static cache of one call: where the prompt ends, how many positions hold
    this call's keys and values, and `crop` to cut back after a rejected draft layer."""

    def __init__(self, kv: StaticCache, prompt_length: int) -> None:
        self.kv, self.prompt_length, self.num_positions = kv, prompt_length, prompt_length

    def crop(self, num_positions: int) -> None:
        """Keep the first `num_positions` positions (the next pass overwrites the rest)."""
        if not self.prompt_length <= num_positions <= self.num_positions:
            raise ValueError(f"cannot crop a cache of {self.num_positions} positions to {num_positions}; "
                             f"expected {self.prompt_length} (the prompt) to {self.num_positions}")
        if num_positions < self.num_positions:
            self.kv.crop(num_positions - self.num_positions)  # a negative count moves the write position back
            self.num_positions = num_positions


class CompiledPolicy(nn.Module):
    """`MainPolicy`'s inference passes on a static cache, batch of one, optionally compiled.

    `max_words`: instruction words the prompt holds (default: the policy's `max_instruction_words`);
    fewer means a shorter prefill, a longer instruction is refused.
    """

    def __init__(self, policy: MainPolicy, max_words: int | None = None, compile: bool = True) -> None:
        super().__init__()
        config = policy.config
        self.policy, self.config = policy.eval(), config
        self.tokenizer_fingerprint = policy.tokenizer_fingerprint
        self.max_words = max_words or config.max_instruction_words
        if not 1 <= self.max_words <= config.max_instruction_words:
            raise ValueError(f"max_words must be in 1..{config.max_instruction_words} (the policy's "
                             f"max_instruction_words), got {self.max_words}")
        self.prompt_length = config.num_visual_tokens + 1 + self.max_words + 1  # P
        self.max_positions = self.prompt_length + config.num_layers - 1  # S
        weight = policy.heads[0].weight
        device, dtype = weight.device, next(policy.backbone.parameters()).dtype
        llama = policy.backbone.config
        self.kv = StaticCache(config=llama, max_cache_len=self.max_positions)
        head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
        self.kv.early_initialization(1, llama.num_key_value_heads, head_dim, dtype, device)
        with torch.no_grad():  # every layer's head in one weight, indexed by a tensor: one graph for any layer
            self.head_weight = torch.stack([h.weight for h in policy.heads])  # [L, 128 * levels, H]
            self.head_bias = torch.stack([h.bias for h in policy.heads])  # [L, 128 * levels]
        self.real = torch.zeros(self.max_positions, dtype=torch.bool, device=device)  # [S] prompt padding = False
        self.slots = torch.arange(self.max_positions, device=device)  # [S]
        self._current: StaticPolicyCache | None = None
        self._prefill_pass, self._layer_pass = self._prefill_impl, self._layer_impl
        if compile:
            self._prefill_pass = torch.compile(self._prefill_impl, dynamic=False)
            self._layer_pass = torch.compile(self._layer_impl, dynamic=False)
        self._graphs: dict[tuple[str, int], CapturedGraph] | None = {} if compile and device.type == "cuda" else None

    # ---- what the engine calls ----------------------------------------------------------------------

    def encode_instructions(self, instructions: list[str]) -> dict[str, Tensor]:
        """As `MainPolicy.encode_instructions`, left-padded to `max_words` words."""
        encoded = self.policy.encode_instructions(instructions)
        ids, mask = encoded["instruction_ids"], encoded["instruction_mask"]
        pad = self.max_words - ids.shape[1]
        if pad < 0:
            raise ValueError(f"an instruction of {ids.shape[1]} words does not fit the compiled policy's prompt of "
                             f"{self.max_words} words (max_words)")
        return {"instruction_ids": nn.functional.pad(ids, (pad, 0), value=PAD_ID),
                "instruction_mask": nn.functional.pad(mask, (pad, 0), value=0)}

    @torch.no_grad()
    def prefill(self, obs: Observation) -> tuple[Tensor, Tensor, StaticPolicyCache]:
        """As `MainPolicy.prefill`, for a batch of one: hidden [1, H], layer-0 logits [1, 128, levels], cache.
        The cache of the previous call is reused in place, so only the newest cache is valid."""
        if obs["instruction_ids"].shape != (1, self.max_words):
            raise ValueError(f"the compiled policy takes one observation with {self.max_words} instruction word ids "
                             f"(encode_instructions pads them), got ids of shape {tuple(obs['instruction_ids'].shape)}")
        if self._current is not None:
            self.kv.crop(-self._current.num_positions)  # back to an empty cache (step_many refuses the old one)
        inputs = (obs["agentview"], obs["wrist"], obs["proprio"], obs["instruction_ids"], obs["instruction_mask"])
        hidden, logits0 = self._run(("prefill", self.prompt_length), self._prefill_pass, inputs)
        self._current = StaticPolicyCache(self.kv, self.prompt_length)
        return hidden, logits0, self._current

    @torch.no_grad()
    def step_many(self, codes: Tensor, first_layer: int, cache: StaticPolicyCache) -> Tensor:
        """As `MainPolicy.step_many`: codes [1, n, 128] of layers first_layer.. in one pass -> logits [1, n, 128,
        levels] of layers first_layer+1..first_layer+n."""
        n = codes.shape[1]
        if cache is not self._current:
            raise ValueError("this cache is not the compiled policy's current one: each prefill reuses the cache")
        check_feed(self.config.num_layers, first_layer, n, cache.num_positions, cache.prompt_length)
        (logits,) = self._run(("layers", n), self._layer_pass, (codes, self.slots[first_layer]))
        cache.num_positions += n
        return logits

    def step(self, codes: Tensor, layer: int, cache: StaticPolicyCache) -> Tensor:
        """As `MainPolicy.step`: layer-1's codes [1, 128] -> logits [1, 128, levels] of `layer`."""
        return self.step_many(codes[:, None], layer - 1, cache)[:, 0]

    # ---- the passes (fixed shapes) --------------------------------------------------------------------

    def _run(self, key: tuple[str, int], fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...]
             ) -> tuple[Tensor, ...]:
        """One pass of `key`'s shape: its CUDA graph (captured at the first call) or `fn` itself."""
        if self._graphs is None:
            return fn(*inputs)
        if key not in self._graphs:
            self._graphs[key] = CapturedGraph(fn, inputs, undo=lambda: self.kv.crop(-key[1]))  # each run wrote key[1] positions
        return self._graphs[key](*inputs)

    def _mask(self, first_slot: Tensor | int, n: int) -> Tensor:
        """Additive 4-D attention mask [1, 1, n, S] of n queries at slots first_slot.. (0 = seen, the dtype's
        minimum = hidden; as transformers' own masks): real keys up to the query's own slot, and the query's
        own slot (a padding query's only key: its row stays finite)."""
        query = (first_slot + torch.arange(n, device=self.slots.device))[:, None]  # [n, 1]
        key = self.slots[None]  # [1, S]
        seen = (self.real[None] & (key <= query)) | (key == query)  # [n, S]
        hidden = torch.finfo(self.head_weight.dtype).min
        return torch.zeros_like(seen, dtype=self.head_weight.dtype).masked_fill(~seen, hidden)[None, None]

    def _backbone(self, embeds: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        out = self.policy.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=self.kv,
                                   use_cache=True)
        return out.last_hidden_state

    def _logits(self, x: Tensor, layers: Tensor) -> Tensor:
        """Outputs [1, n, H] at the positions giving `layers` [n] -> logits [1, n, 128, levels]."""
        logits = torch.einsum("bnh,noh->bno", x, self.head_weight[layers]) + self.head_bias[layers]
        return logits.unflatten(-1, (self.config.codes_per_layer, self.config.levels))

    def _prefill_impl(self, agentview: Tensor, wrist: Tensor, proprio: Tensor, ids: Tensor,
                      words: Tensor) -> tuple[Tensor, Tensor]:
        embeds, mask = self.policy._prompt({"agentview": agentview, "wrist": wrist, "proprio": proprio,
                                            "instruction_ids": ids, "instruction_mask": words})  # [1, P, H], [1, P]
        layer_slots = mask.new_ones(self.max_positions - self.prompt_length)
        self.real.copy_(torch.cat([mask[0], layer_slots]).bool())
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each real token counts from the first real one
        out = self._backbone(embeds, self._mask(0, self.prompt_length), positions)  # [1, P, H]
        hidden = out[:, -1]  # [1, H]
        return hidden, self._logits(hidden[:, None], self.slots[:1])[:, 0]

    def _layer_impl(self, codes: Tensor, first_layer: Tensor) -> tuple[Tensor]:
        n = codes.shape[1]
        layers = first_layer + torch.arange(n, device=codes.device)  # [n] the layers whose codes are fed
        embeds = self.policy.code_inputs(codes, layers)  # [1, n, H]
        positions = (self.real[: self.prompt_length].sum() + layers)[None]  # after the real prompt tokens
        out = self._backbone(embeds, self._mask(self.prompt_length + first_layer, n), positions)
        return (self._logits(out, layers + 1),)


class CompiledDraft:
    """A draft's inference form (`rsd.draft.model.proposer`) compiled and, on CUDA, captured as a graph at
    its first call; a stand-in draft for the engine."""

    def __init__(self, draft: Any, compile: bool = True) -> None:
        self.config = draft.config
        logits = proposer(draft)
        self._logits = torch.compile(logits, dynamic=False) if compile else logits
        self._compile = compile
        self._graph: CapturedGraph | None = None

    def logits(self, hidden: Tensor, layer0: Tensor) -> Tensor:
        """hidden [1, input_dim], main's layer-0 codes [1, 128] -> logits [1, K, 128, levels]."""
        if not (self._compile and hidden.is_cuda):
            return self._logits(hidden, layer0)
        if self._graph is None:
            self._graph = CapturedGraph(lambda h, c: (self._logits(h, c),), (hidden, layer0), undo=lambda: None)
        return self._graph(hidden, layer0)[0]


class CompiledTokenizer:
    """The tokenizer's decode on the GPU, captured as one CUDA graph: tokens [1, 8, 16, L] on the device -> actions
    [1, 8, 7]. A stand-in tokenizer for the engine. On the CPU, or with `compile=False`, the tokenizer itself decodes.

    At the 7B shape on an H200 the CPU decode of a chunk took ~1.4 ms of the call's host time, as long as a
    quarter of a layer pass; on the GPU it is a few small kernels in one launch."""

    def __init__(self, tokenizer: RFSQTokenizer, device: torch.device, compile: bool = True) -> None:
        self.tokenizer, self.config = tokenizer, tokenizer.config
        self.captured = compile and device.type == "cuda"
        self.device = device if self.captured else tokenizer.device
        self._on_device = copy.deepcopy(tokenizer).to(device).eval() if self.captured else tokenizer
        self._graph: CapturedGraph | None = None

    def fingerprint(self) -> str:
        return self.tokenizer.fingerprint()

    def eval(self) -> CompiledTokenizer:
        return self

    def decode(self, tokens: Tensor) -> Tensor:
        """As `RFSQTokenizer.decode`, for a batch of one on `self.device`."""
        if not self.captured:
            return self.tokenizer.decode(tokens)
        if self._graph is None:
            decode = self._on_device
            self._graph = CapturedGraph(lambda t: (decode.unnormalize(decode.decode_normalized_unchecked(t)),),
                                        (tokens,), undo=lambda: None)
        return self._graph(tokens)[0]


def compiled_engines(engines: dict[str, RSDEngine], max_words: int | None = None, compile: bool = True
                     ) -> dict[str, RSDEngine]:
    """The same engines on the compiled path. Engines that share a policy (or a draft) object share its
    compiled form, so each is compiled once; the draft is compiled in the precision its engine runs it."""
    policies: dict[int, CompiledPolicy] = {}
    drafts: dict[int, CompiledDraft] = {}
    tokenizers: dict[int, CompiledTokenizer] = {}
    out = {}
    for name, engine in engines.items():
        policy = policies.setdefault(id(engine.policy), CompiledPolicy(engine.policy, max_words, compile))
        draft = None
        if engine.draft is not None and engine.config.mode != "none":
            draft = drafts.setdefault(id(engine.draft), CompiledDraft(engine.draft, compile))
        tokenizer = tokenizers.setdefault(id(engine.tokenizer), CompiledTokenizer(engine.tokenizer, engine.device, compile))
        out[name] = RSDEngine(policy, tokenizer, draft, engine.config)
    return out
