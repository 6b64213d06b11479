"""The causal-LM forward with the LM head and the loss fused (no full logits while training).

Bound on the ``<Family>ForCausalLM`` instance. It follows transformers 5.17's forward: the base
model gives the last hidden states, labels are shifted (``labels[..., 1:]``, or ``shift_labels``
as given), and the loss is ``sum / num_items_in_batch`` when the caller passes it (how the
Trainer and onecard's loop normalise over a grad-accumulation window), else the mean over
non-ignored tokens. Only in training mode with labels is the fused path taken, and ``logits`` is
then None; eval, generation and ``logits_to_keep`` go through the original forward unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from onecard.kernels.fused_ce import fused_linear_cross_entropy


def _cache_field(output_class) -> str:
    """The KV cache's field in transformers' output classes: ``past_key_values`` in 5.17, ``cache`` from 5.24."""
    return "cache" if "cache" in {f.name for f in dataclasses.fields(output_class)} else "past_key_values"


def _fusable_head(lm_head) -> bool:
    return type(lm_head) is torch.nn.Linear and type(lm_head.weight) is torch.nn.Parameter


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                      use_cache=None, logits_to_keep=0, **kwargs):
    """The KV cache, if any, stays in ``kwargs`` under the caller's name (``past_key_values`` in transformers 5.17,
    ``cache`` from 5.24, which deprecates the old one) and goes on as given."""
    shift_labels = kwargs.get("shift_labels")
    wants_loss = labels is not None or shift_labels is not None
    if not (self.training and wants_loss and not logits_to_keep and _fusable_head(self.lm_head)):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss_sum, count = fused_linear_cross_entropy(hidden, self.lm_head.weight, shift_labels.to(hidden.device),
                                                 ignore_index=ignore_index, softcap=softcap, bias=self.lm_head.bias)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss_sum.device)
        loss = loss_sum / num_items
    else:
        loss = loss_sum / count.clamp(min=1)
    cache_field = _cache_field(CausalLMOutputWithPast)
    out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, **{cache_field: getattr(outputs, cache_field)})
    return out.to_tuple() if return_dict is False else out
