"""Document-masked packing (`--document_mask`): the attention inputs under which each token of a packed sample attends
only to the earlier tokens of its own document, with position ids restarting at 0 per document.

A packed sample runs across document boundaries, and every document of the shards ends with EOS (llm.data.prepare
stores `<s> text </s>`), so a new document starts at the token after each EOS; the partial document at the start of
a sample starts at position 0 too (Megatron's reset_position_ids / reset_attention_mask read the EOD token the same
way). Everything here is computed from the CPU batch before it moves to the device: no host sync.

How the model is told, per attention kernel:
- sdpa: a 4-D boolean mask [batch, 1, seq, seq], causal and block-diagonal by document (True = attend); transformers
  passes a 4-D mask to the kernel as it is.
- eager: the same mask as an additive float mask (0 or the dtype's minimum), which is what eager attention adds.
- flash_attention_2: no mask; `cu_seq_lens_q/k` and `max_length_q/k` over the flattened batch, with which transformers
  calls flash-attn's variable-length kernel (one segment per document of every row).
All three also get the restarting `position_ids` (rotary positions) and `use_cache=False` (no cache is built).
"""

from __future__ import annotations

from typing import Any

import torch


def document_positions(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, document_ids), both [batch, seq] int64, of a packed [batch, seq] token tensor: the document index
    of each token within its row (0 for the tokens up to and including the first EOS, 1 after it...) and its position
    within that document. An EOS belongs to the document it ends."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eos_id  # a document starts after each EOS
    document_ids = starts.long().cumsum(dim=1)
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    # The index of each token's document start: the running maximum of the start indices seen so far.
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index, document_ids


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean: query i may attend key j iff j <= i and both are in the same document."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    return (same & causal).unsqueeze(1)


def varlen_lengths(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [segments + 1], max segment length) of the flattened batch, for flash-attn's varlen kernel:
    every document of every row is one segment (each row starts one, since its positions start at 0)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    total = torch.tensor([flat.numel()], device=flat.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def attention_inputs(
    tokens: torch.Tensor, eos_id: int, attn_implementation: str, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """The keyword arguments of a transformers causal LM's forward (besides input_ids) that confine each token of the
    packed `tokens` [batch, seq] to its own document, for the given attention kernel; `dtype` is the compute dtype
    (eager's additive mask)."""
    position_ids, document_ids = document_positions(tokens, eos_id)
    kwargs: dict[str, Any] = {"position_ids": position_ids, "use_cache": False}
    if attn_implementation == "flash_attention_2":
        cu_seqlens, max_length = varlen_lengths(position_ids)
        kwargs.update(
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_length, max_length_k=max_length
        )
        return kwargs
    mask = document_mask(document_ids)
    if attn_implementation == "sdpa":
        kwargs["attention_mask"] = mask
    elif attn_implementation == "eager":
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        kwargs["attention_mask"] = additive.masked_fill(~mask, torch.finfo(dtype).min)
    else:
        raise ValueError(
            f"document_mask: attn_implementation={attn_implementation!r} is not supported; use sdpa, eager or "
            f"flash_attention_2"
        )
    return kwargs
