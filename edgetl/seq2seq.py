"""Sequence-to-sequence models: a transformers encoder-decoder behind one torch module, and the warm start that turns
a pretrained BERT-family encoder into one when no seq2seq checkpoint is at hand.

Warm start (Rothe et al. 2020, "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks", BERT2BERT): encoder
and decoder both start from the encoder's weights, the LM head is tied to the word embeddings. BERT2BERT starts the
cross-attention random; here it starts as a copy of the same layer's self-attention (query / key / value / output and
its LayerNorm), a query-key map that already attends by content, which on CPU budgets leaves the loss plateau of a
randomly attending decoder sooner (docs/benchmarks.md). transformers' ``EncoderDecoderModel`` builds BERT2BERT, but
optimum's exporter refuses a BERT decoder with past key values (no KV cache on the device), so the weights are placed
in transformers' ``BartForConditionalGeneration``: BERT and BART layers are the same post-LayerNorm blocks (q / k / v /
output projection, LayerNorm, GELU FFN, LayerNorm), BART's learned positions start at offset 2 and BERT's token-type-0
embedding folds into them. The encoder then computes what the BERT encoder computes (up to LayerNorm's epsilon: BERT
1e-12, BART 1e-5; tested), and optimum exports it with a KV cache (``text2text-generation-with-past``).

``Seq2Seq`` is what the pipeline trains and exports: ``forward(input_ids, attention_mask, decoder_input_ids)`` gives
teacher-forced logits (the one ``fit`` loop trains it like any other model); without ``decoder_input_ids`` it
generates (transformers' ``generate``: greedy or beam search) and returns the token ids padded with the pad id, so
``measure`` compares it with the ONNX runtime's generation loop (``runner.Generator``) as it compares logits.
"""

from __future__ import annotations

from typing import Any

from edgetl.lazy import lazy_classes, picklable

# BERT parameter names -> BART's, per layer (the decoder's self-attention and FFN take the same weights)
_LAYER = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "final_layer_norm",
}


def is_seq2seq_checkpoint(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def warm_start(encoder, bos_id: int, eos_id: int, pad_id: int, dropout: float | None = None):
    """A ``BartForConditionalGeneration`` whose encoder and decoder both carry ``encoder``'s (a BERT-family
    ``PreTrainedModel``) weights, the decoder's cross-attention a copy of its self-attention (BERT2BERT starts it
    random), the LM head tied to the word embeddings."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from edgetl.errors import EdgetlError

    c = encoder.config
    if getattr(c, "position_embedding_type", "absolute") != "absolute" or not hasattr(encoder, "embeddings"):
        raise EdgetlError(
            f"backbone {c.model_type}: warm-starting a seq2seq model needs a BERT-style encoder with absolute "
            "positions; name a seq2seq checkpoint (T5, BART, Marian) instead"
        )
    drop = c.hidden_dropout_prob if dropout is None else dropout
    cfg = BartConfig(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        encoder_layers=c.num_hidden_layers,
        decoder_layers=c.num_hidden_layers,
        encoder_attention_heads=c.num_attention_heads,
        decoder_attention_heads=c.num_attention_heads,
        encoder_ffn_dim=c.intermediate_size,
        decoder_ffn_dim=c.intermediate_size,
        activation_function=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        dropout=drop,
        attention_dropout=c.attention_probs_dropout_prob,
        activation_dropout=0.0,
        scale_embedding=False,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        decoder_start_token_id=bos_id,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(cfg)
    bert = encoder.state_dict()
    new = model.state_dict()
    prefix = "" if "embeddings.word_embeddings.weight" in bert else encoder.base_model_prefix + "."
    emb = bert[prefix + "embeddings.word_embeddings.weight"]
    pos = bert[prefix + "embeddings.position_embeddings.weight"]
    if prefix + "embeddings.token_type_embeddings.weight" in bert:
        pos = pos + bert[prefix + "embeddings.token_type_embeddings.weight"][0]
    mapped = {"model.shared.weight": emb}
    for side in ("encoder", "decoder"):
        positions = new[f"model.{side}.embed_positions.weight"].clone()
        positions[2:] = pos  # BART's learned positions are indexed from 2
        mapped[f"model.{side}.embed_positions.weight"] = positions
        mapped[f"model.{side}.embed_tokens.weight"] = emb
        for w in ("weight", "bias"):
            mapped[f"model.{side}.layernorm_embedding.{w}"] = bert[f"{prefix}embeddings.LayerNorm.{w}"]
        for i in range(c.num_hidden_layers):
            for src, dst in _LAYER.items():
                for w in ("weight", "bias"):
                    mapped[f"model.{side}.layers.{i}.{dst}.{w}"] = bert[f"{prefix}encoder.layer.{i}.{src}.{w}"]
        for i in range(c.num_hidden_layers) if side == "decoder" else ():
            for src, dst in _LAYER.items():  # cross-attention starts as a copy of the layer's self-attention
                if dst.startswith("self_attn"):
                    cross = dst.replace("self_attn", "encoder_attn")
                    for w in ("weight", "bias"):
                        mapped[f"model.decoder.layers.{i}.{cross}.{w}"] = bert[f"{prefix}encoder.layer.{i}.{src}.{w}"]
    for key, value in mapped.items():
        if new[key].shape != value.shape:
            raise EdgetlError(
                f"warm start: {key} has shape {tuple(new[key].shape)}, the encoder's {tuple(value.shape)}"
            )
        new[key] = value.clone()
    model.load_state_dict(new)
    model.tie_weights()
    return model


@picklable
def seq2seq_module():
    import torch

    class Seq2Seq(torch.nn.Module):
        """A transformers seq2seq model: teacher-forced logits with ``decoder_input_ids``, generated ids without."""

        def __init__(self, model, generation: dict):
            super().__init__()
            self.model = model
            self.generation = dict(generation)  # max_new_tokens, num_beams

        def forward(self, input_ids, attention_mask, decoder_input_ids=None):
            if decoder_input_ids is not None:
                return self.model(
                    input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
                ).logits
            return self.generate(input_ids, attention_mask)

        def generate(self, input_ids, attention_mask, **kw: Any):
            """Token ids after the decoder start token, padded with the pad id to ``max_new_tokens`` columns."""
            import torch

            opts = {**self.generation, **kw}
            cfg = self.model.config
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=opts["max_new_tokens"],
                    num_beams=opts.get("num_beams", 1),
                    do_sample=False,
                    early_stopping=True,
                    length_penalty=opts.get("length_penalty", 1.0),
                    no_repeat_ngram_size=0,
                    min_length=0,
                    decoder_start_token_id=cfg.decoder_start_token_id,
                    eos_token_id=cfg.eos_token_id,
                    pad_token_id=cfg.pad_token_id,
                    forced_bos_token_id=None,
                    forced_eos_token_id=None,
                )[:, 1:]
            width = opts["max_new_tokens"]
            padded = torch.full((out.shape[0], width), cfg.pad_token_id, dtype=torch.int64)
            padded[:, : out.shape[1]] = out[:, :width]
            # after the end token: padding (beam search fills with the end token where the pad id is 0)
            after = (padded == cfg.eos_token_id).int().cumsum(1) - (padded == cfg.eos_token_id).int() > 0
            return padded.masked_fill(after, cfg.pad_token_id)

    return Seq2Seq


def shift_right(labels, start_id: int, pad_id: int):
    """Decoder inputs for teacher forcing: the start token, then the labels without their last position (ignored
    positions, -100, read as padding)."""
    import torch

    out = torch.full_like(labels, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill(out == -100, pad_id)


# unpickling a cached model finds its class
__getattr__ = lazy_classes(__name__, {"Seq2Seq": seq2seq_module})
