"""A look-up circuit set into a random-init toy before its pretraining: the inductive bias that lets it read a policy.

Reading a compact policy is one look-up per CoT step: having written a section id ("#1.2"), copy the word that
follows that id in the policy (" yellow", " Case 2"). A pretrained LM does this with an *induction head*: a
previous-token head in an early layer writes "the token before me was #1.2" into each position, and a later head
whose query is the current token attends to the position whose previous token matches, and copies it. From random
init our toy never formed one: every base so far copied by offset or by line position, not by content
(docs/results-history.md), and drills designed to force a content look-up stayed on that plateau. So the two heads
are *set* here, in the random-init weights, and kept as set while the rest of the toy pretrains around them
(`freeze_lookup_circuit`: left trainable, 2,000 steps of pretraining wore the circuit down; with layer 0 trainable,
the residual it passes on grew 28-fold and drowned the codes):

- layer 0, head 0 attends to the previous token: constant query and key (biases only) whose rotary phases line up
  at offset 1; its value carries the id code of that token into `R_prev`, a few residual coordinates;
- layer 1, the first head of the second key-value group: query = the current token's id code (`R_id`, set in the
  id tokens' embeddings), key = `R_prev`; on the lowest-frequency rotary pairs, so the match does not depend on the
  distance. Tokens that are not ids attend to a sink (`<|im_start|>`); the value names which of the copyable words
  (the 15 attribute words, " Case k") the attended token is, and the output raises that word's logit.

The codes are +-e_i +-e_j over the code coordinates: a code matches itself twice as well as any other code. The
residual coordinates used (`reserved`) are the circuit's lanes: cleared in every other embedding, in the visual
tokens and in every layer's writes, and kept so. `mpi/tests/test_toy_circuit.py` checks that the random-init toy
then copies the word after an id by content (shuffled policy lines too), does not without it, and that training
moves every weight but the circuit's.
"""

from __future__ import annotations

import itertools
import math

import torch

SINK_TOKEN = "<|im_start|>"  # opens every turn: the look-up head rests there when the current token is not an id


def _codes(n_dims: int) -> list[torch.Tensor]:
    """Unit vectors (+-e_i +-e_j)/sqrt(2), i < j: a code's dot product with itself is 1, with any other <= 1/2."""
    out = []
    for i, j in itertools.combinations(range(n_dims), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = torch.zeros(n_dims)
            v[i], v[j] = si, sj
            out.append(v / math.sqrt(2))
    return out


def copy_words(tokenizer, n: int) -> list[int]:
    """Token ids of the words a look-up copies: the 15 attribute words (with their leading space, as they follow
    an id) and " Case 1", " Case 2", ...; the first `n` (one value coordinate each)."""
    from mpi.data.scenes import ATTRIBUTES

    words = [tokenizer(" " + v, add_special_tokens=False)["input_ids"] for vs in ATTRIBUTES.values() for v in vs]
    if any(len(w) != 1 for w in words):
        raise ValueError("the look-up circuit needs every ' <attribute word>' to be one token of the toy tokenizer")
    cases = [tokenizer.convert_tokens_to_ids(f" Case {k}") for k in range(1, n + 1)]
    return ([w[0] for w in words] + cases)[:n]


@torch.no_grad()
def install_lookup_circuit(model, tokenizer, calibration_text: str, *, code_scale: float = 0.1, match_logit: float = 20.0,
                           sink_share: float = 0.75, prev_logit_scale: float = 11.0, copy_gain: float = 3.0,
                           max_distance: int = 400) -> dict:
    """Set the previous-token head and the look-up head in a random-init toy (see the module docstring).

    calibration_text: a compact policy text (`mpi.toy_base.circuit_calibration_text()` in the
    builds), on which the residual's scale entering layer 1 is measured once.

    match_logit: the look-up head's attention score for a matching id (a code's own match; any other code scores
    at most half of it, the sink `sink_share` of it). copy_gain multiplies the copyable words' output rows, so the
    copied word's logit can stand out of the random ones. Returns where the circuit sits, with `frozen`: for each
    parameter name, a mask of the entries `freeze_lookup_circuit` keeps as set here."""
    from mpi.toy import COMPACT_TOKENS

    lm = model.model.language_model
    hidden = lm.config.hidden_size
    head_dim = hidden // lm.config.num_attention_heads
    half = head_dim // 2
    group = lm.config.num_attention_heads // lm.config.num_key_value_heads
    if lm.config.num_key_value_heads < 2 or len(lm.layers) < 2:
        raise ValueError("the look-up circuit needs >= 2 layers and >= 2 key-value heads")
    inv_freq = lm.rotary_emb.inv_freq.float()
    # rotary pairs that turn by < 0.5 rad over max_distance tokens: a match there does not depend on the distance
    slow = [i for i in range(half) if inv_freq[i] * max_distance < 0.5]
    fast = [i for i in range(half) if i not in slow][:6]
    dims = slow + [i + half for i in slow]
    code_dims, sink_dim = dims[:-1], dims[-1]
    n_code = len(code_dims)
    reserved = list(range(hidden - 2 * n_code - 1, hidden))
    r_id, r_prev, r_sink = reserved[:n_code], reserved[n_code:2 * n_code], reserved[-1]
    names = {id(p): n for n, p in model.named_parameters()}
    frozen: dict[str, torch.Tensor] = {}

    def keep(param, index):  # mark param[index] as the circuit's: set here, never trained
        mask = frozen.setdefault(names[id(param)], torch.zeros_like(param, dtype=torch.bool))
        mask[index] = True

    # the reserved coordinates are the circuit's lanes: only the id codes, the sink flag and head 0 write them
    emb = model.get_input_embeddings().weight
    emb[:, reserved] = 0
    keep(emb, (slice(None), reserved))
    ids = [t for t in COMPACT_TOKENS if t.startswith("#")]
    for token, code in zip(ids, _codes(n_code)):  # ids beyond the codes (deeper than any policy here) get none
        emb[tokenizer.convert_tokens_to_ids(token), r_id] = code_scale * code.to(emb.dtype)
    emb[tokenizer.convert_tokens_to_ids(SINK_TOKEN), r_sink] = code_scale
    writers = [w for layer in lm.layers for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
    merger_out = model.model.visual.merger.mlp[-1]  # the visual tokens' embeddings
    for w in writers + [merger_out.weight, merger_out.bias]:
        w[reserved] = 0
        keep(w, reserved)

    # layer 0, head 0: the score sum_i s^2 cos((offset - 1) f_i) over the fast pairs peaks at offset 1
    a0 = lm.layers[0].self_attn
    rows = list(fast) + [i + half for i in fast]
    a0.q_proj.weight[:head_dim] = 0  # head 0's query is a constant: attention by position only
    a0.q_proj.bias[:head_dim] = 0
    a0.k_proj.weight[rows] = 0  # the key of key-value head 0 (shared with heads 1..group-1) on the fast pairs
    a0.k_proj.bias[rows] = 0
    for i in fast:
        a0.q_proj.bias[i] = prev_logit_scale
        a0.k_proj.bias[i] = prev_logit_scale * torch.cos(inv_freq[i])
        a0.k_proj.bias[i + half] = prev_logit_scale * torch.sin(inv_freq[i])
    a0.v_proj.weight[:n_code] = 0
    a0.v_proj.bias[:n_code] = 0
    a0.o_proj.weight[:, :head_dim] = 0
    emb_rms = float(emb.float().pow(2).mean(-1).sqrt().mean())
    for d in range(n_code):  # value d = the previous token's code coordinate d (after the norm: x code_scale/emb_rms)
        a0.v_proj.weight[d, r_id[d]] = 1.0
        a0.o_proj.weight[r_prev[d], d] = emb_rms  # back to the embedding's scale in R_prev
    # Layer 1's norm divides by the residual's scale, so the codes' weight in the match depends on it: left free, layer 0
    # grew the residual entering layer 1 28-fold in 1,000 steps (0.032 -> 0.88 rms) and drowned the codes. So all of
    # layer 0 stays as set (head 0 above; its other heads and MLP at their small random init).
    for param in lm.layers[0].parameters():
        keep(param, slice(None))

    # layer 1: the look-up head. Its inputs pass layer 1's norm; measure the residual's scale there once.
    scale = _residual_rms(model, tokenizer, calibration_text, layer=1)
    x = code_scale / scale  # a unit code's coordinate after the norm
    a1 = lm.layers[1].self_attn
    q_rows, kv_rows = slice(group * head_dim, (group + 1) * head_dim), slice(head_dim, 2 * head_dim)
    qw, qb = a1.q_proj.weight[q_rows], a1.q_proj.bias[q_rows]
    kw, kb = a1.k_proj.weight[kv_rows], a1.k_proj.bias[kv_rows]
    vw, vb, ow = a1.v_proj.weight[kv_rows], a1.v_proj.bias[kv_rows], a1.o_proj.weight[:, q_rows]
    qw.zero_()  # the look-up head's query is the current id's code and the sink's constant, nothing else
    qb.zero_()
    kw[dims] = 0
    kb[dims] = 0
    q_gain = match_logit * math.sqrt(head_dim) / (x * x)
    for d, c in enumerate(code_dims):
        qw[c, r_id[d]] = q_gain
        kw[c, r_prev[d]] = 1.0
    qb[sink_dim] = match_logit * sink_share * math.sqrt(head_dim) / x
    kw[sink_dim, r_sink] = 1.0
    words = copy_words(tokenizer, head_dim)
    vw.zero_()
    vb.zero_()
    ow.zero_()
    head = model.lm_head.weight
    for m, token in enumerate(words):
        e = emb[token].float()
        vw[m] = (e / e.norm() * scale / e.norm()).to(vw.dtype)  # 1 when the attended token is this word
        head[token] *= copy_gain
        ow[:, m] = (head[token] / head[token].norm()).to(ow.dtype)
    ow[reserved] = 0
    for w in (a1.q_proj.weight, a1.q_proj.bias):
        keep(w, q_rows)
    for w in (a1.v_proj.weight, a1.v_proj.bias):
        keep(w, kv_rows)
    for w in (a1.k_proj.weight, a1.k_proj.bias):
        keep(w, [head_dim + d for d in dims])
    keep(a1.o_proj.weight, (slice(None), q_rows))
    keep(emb, words)  # the look-up head's value reads the copyable words' embeddings: they stay as set too
    return {"reserved": reserved, "code_dims": code_dims, "sink_dim": sink_dim, "copy_words": words,
            "lookup_head": (1, group), "previous_token_head": (0, 0), "residual_rms": scale, "frozen": frozen}


def freeze_lookup_circuit(model, frozen: dict[str, torch.Tensor]) -> list:
    """Keep the circuit as set: zero the gradient of its entries (Adam then never moves them; AdamW's weight decay
    still shrinks them by ~2% over a 4,000-step build). Without this, 2,000 steps of pretraining wore the circuit
    down (case copy 100% at init -> 44%: docs/results-history.md). Returns the hooks (`.remove()` to lift it)."""
    params = dict(model.named_parameters())
    return [params[name].register_hook(lambda grad, m=mask.to(params[name].device): grad.masked_fill(m, 0))
            for name, mask in frozen.items()]


def _residual_rms(model, tokenizer, text: str, layer: int) -> float:
    """Mean root-mean-square of the residual stream entering `layer`, on `text`."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    seen = []
    hook = model.model.language_model.layers[layer].input_layernorm.register_forward_hook(
        lambda module, args, out: seen.append(float(args[0].detach().float().pow(2).mean(-1).sqrt().mean())))
    try:
        model.model.language_model(input_ids=ids)
    finally:
        hook.remove()
    return seen[0]
