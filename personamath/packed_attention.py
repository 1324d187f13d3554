"""Causal attention for padding-free packed rows that computes each packed example on its own.

transformers keeps packed examples apart under `sdpa` with a block-diagonal mask over the whole row,
so attention costs (row length)^2 however short the examples are; on GPUs flash attention's varlen
kernel avoids this, elsewhere this implementation does: it splits the row where position_ids restart
and runs causal SDPA per example. It is registered as `sdpa_packed` and only valid for unpadded rows.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

NAME = "sdpa_packed"


def packed_causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       position_ids=None, **kwargs):
    """query: (batch, heads, tokens, dim); key/value may have fewer (grouped) heads."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention takes packed rows without padding (no attention_mask)")
    starts = [0] if position_ids is None else (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds = zip(starts, starts[1:] + [query.shape[2]])
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                    is_causal=True, scale=scaling, enable_gqa=gqa,
                                                    dropout_p=dropout if module.training else 0.0)
                     for s, e in bounds], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # packed rows have no padding, and causality is applied per example above


AttentionInterface.register(NAME, packed_causal_sdpa)
AttentionMaskInterface.register(NAME, _no_mask)
