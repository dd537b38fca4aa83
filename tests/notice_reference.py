"""NOTICE's BLIP patching loop (wrudman/NOTICE, BLIP/patching_utils.py: trace_with_patch, trace_important_states),
kept as it works there and made runnable here: the same batch of three runs [clean, corrupt, corrupt-and-patched],
the same in-place edit of one (token, layer) state at a time, the same four scores. Only the plumbing differs:
processed tensors instead of raw images and strings, forward hooks instead of its TraceDict, the model's
vision -> text encoder -> one decoder step instead of its ModifiedBlipForQuestionAnswering.forward (which
computes exactly that), and the head count read from the model instead of hard-coded 12 x 64.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def layername(model, num, kind=None):
    if kind == "crossattention_block":
        return f"text_encoder.encoder.layer.{num}.crossattention.self"
    if kind == "attention_block":
        return f"text_encoder.encoder.layer.{num}.attention.self"
    return f"text_encoder.encoder.layer.{num}" + (f".{kind}" if kind else "")


def _forward_logits(model, pixel_values, input_ids):
    image_embeds = model.vision_model(pixel_values=pixel_values)[0]
    image_attention_mask = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
    question_embeds = model.text_encoder(
        input_ids=input_ids, attention_mask=None, encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_attention_mask,
    ).last_hidden_state
    bos_ids = torch.full((question_embeds.size(0), 1), fill_value=model.decoder_start_token_id)
    return model.text_decoder(input_ids=bos_ids, encoder_hidden_states=question_embeds, encoder_attention_mask=None).logits


def trace_with_patch(model, clean, corrupt, answer_tokens, mode, states_to_patch, attn_head=None):
    patch_spec = defaultdict(list)
    for t, l in states_to_patch:
        patch_spec[l].append(t)
    if mode == "image":
        pixel_val_tensor = torch.cat([clean["pixel_values"], corrupt["pixel_values"], corrupt["pixel_values"]])
        input_ids_tensor = clean["input_ids"].expand(3, -1)
    else:
        pixel_val_tensor = clean["pixel_values"].expand(3, -1, -1, -1)
        input_ids_tensor = torch.cat([clean["input_ids"], corrupt["input_ids"], corrupt["input_ids"]])
    heads = model.config.text_config.num_attention_heads
    head_size = model.config.text_config.hidden_size // heads

    def untuple(x):
        return x[0] if isinstance(x, tuple) else x

    def transpose_for_scores(x):
        new_x_shape = x.size()[:-1] + (heads, head_size)
        return x.view(*new_x_shape).permute(0, 2, 1, 3)

    def inverse_transpose_for_scores(x):
        x = x.permute(0, 2, 1, 3)
        return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],))

    def patch_rep(x, layer):
        if layer not in patch_spec:
            return x
        h = untuple(x)
        if h.size(0) == 1:
            return x
        patched = False
        for t in patch_spec[layer]:
            if attn_head is not None:
                h = transpose_for_scores(h)
                h[2, attn_head, t, :] = h[0, attn_head, t, :].clone()
                h = inverse_transpose_for_scores(h)
            else:
                h[2, t] = h[0, t].clone()
            patched = True
        if patched:
            return (h,) + x[1:] if isinstance(x, tuple) else h
        return x

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: patch_rep(out, name)) for name in patch_spec]
    try:
        with torch.no_grad():
            logits = _forward_logits(model, pixel_val_tensor, input_ids_tensor)[:, -1, :]
    finally:
        for handle in handles:
            handle.remove()
    correct_token, incorrect_token = answer_tokens
    prob_corrupt_correct = torch.softmax(logits[1], dim=0)[correct_token]
    prob_patched_correct = torch.softmax(logits[2], dim=0)[correct_token]
    p_diff = prob_patched_correct - prob_corrupt_correct
    ld_clean = logits[0][correct_token] - logits[0][incorrect_token]
    ld_corrupt = logits[1][correct_token] - logits[1][incorrect_token]
    ld_patched = logits[2][correct_token] - logits[2][incorrect_token]
    logit_diff = ld_patched - ld_corrupt
    patching_effect = logit_diff / (ld_clean - ld_corrupt)
    return torch.tensor([prob_patched_correct, p_diff, logit_diff, patching_effect], dtype=torch.float64)


def trace_important_states(model, clean, corrupt, answer_tokens, mode, num_layers, kind=None, attn_head=None):
    """(tokens, layers, 4): restoration probability, P difference, LD difference, normalised effect."""
    num = clean["input_ids"].size(1)
    table = []
    for tnum in range(num):
        row = [trace_with_patch(model, clean, corrupt, answer_tokens, mode, [(tnum, layername(model, layer, kind))], attn_head)
               for layer in range(num_layers)]
        table.append(torch.stack(row))
    return torch.stack(table)
