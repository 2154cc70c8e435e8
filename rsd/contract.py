"""The shapes every part of RSD agrees on: the action chunk, its RFSQ tokens, and what the draft proposes.

The tokenizer, the main policy and the draft each keep these in their configs (so a checkpoint says
what it was built for) and refuse other values; everything else reads them from here.

    action chunk   [CHUNK_LEN, ACTION_DIM]           = [8, 7]
    tokens         [CHUNK_LEN, LATENT_DIM, L]        = [8, 16, L], codes 0..LEVELS-1
    one layer      [CODES_PER_LAYER]                 = [128], index t * LATENT_DIM + d
    draft proposal [NUM_COARSE_LAYERS, 128]          = [3, 128]
"""
from __future__ import annotations

CHUNK_LEN = 8
"""Actions per chunk: one policy call plans them; at most this many run open loop before the next call."""
ACTION_DIM = 7
"""xyz delta (3), rotation delta (3), gripper (1): LIBERO's OSC_POSE action."""
PROPRIO_DIM = 8
"""The policy's proprio input: eef position (3), eef axis-angle (3), gripper finger qpos (2)."""
LATENT_DIM = 16
"""RFSQ latent dims per chunk step: the tokenizer's latent is [CHUNK_LEN, LATENT_DIM]."""
CODES_PER_LAYER = CHUNK_LEN * LATENT_DIM
"""Codes of one residual layer (128): what main decodes per pass and strict acceptance compares."""
LEVELS = 7
"""Quantization levels per code; odd, so the middle level means "no correction"."""
NUM_COARSE_LAYERS = 3
"""Residual layers the draft proposes (layer 0 up); what collect records for it."""
