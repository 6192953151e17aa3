"""
Quiet-STaR (Zelikman et al. 2024): a model that thinks before every token of ordinary text.
After each position t it samples a short thought <|startthought|> z_1..z_L <|endthought|>,
predicts the next tokens with and without it, mixes the two through a learned mixing head,
and is rewarded (REINFORCE) for thoughts that made the true next tokens more likely.

    python quietstar.py                                     # arithmetic text, CPU, both arms
    python quietstar.py --dataset gsm8k --data_dir ../shared/data/gsm8k
    python quietstar.py --out_dir out/quietstar --resume --generate "123+456="   # think while writing
    python quietstar.py --out_dir out/quietstar --resume --generate "123+456=" --hide_thoughts

What the script does: pretrain a small LM on the corpus (--pretrain_steps), then continue
training two copies for the same number of steps, one with thoughts and one without, and
compare held-out NLL on all tokens and on the tokens that need computing (digits after '=').
The arithmetic corpus gives the base model a skill a thought can draw on: half its lines
(--scratchpad) write a short scratchpad between '=' and the sum, the sum's digits from the
right, exactly a thought long ('47+85=-2310-132'); the thought tokens start as the embedding
of '-', so a thought after '=' begins as a scratchpad would. The held-out text is plain
'a+b=c' lines, where the sum must come without a written scratchpad.

How it is done, as in the paper and its code:
- parallel thoughts: for a sequence of T tokens, thoughts for all T positions are generated
  at once, one forward per thought token over all T positions, through a KV cache and a
  "diagonal" attention mask: the thought token at position t sees the text up to t and the
  earlier tokens of its own thought, nothing else. No Python loop over positions.
- teacher-forced lookahead: after <|endthought|> the true next --n_talk tokens are fed and
  scored, so a thought is rewarded for helping the next few tokens.
- mixing head: an MLP on [h_base, h_thought] giving w; the hidden fed to the LM head is
  (1 - w) h_base + w h_thought. w = tanh(mlp output) and the MLP's last layer starts at
  zero, so training starts exactly at the base model and the gradient on w is never cut off
  (w clamped to [0, 1] is pushed below 0 in the first steps and stays there with no gradient).
  w may go negative: the mix then leans away from the thought.
  Not the paper: --mix probs mixes probabilities instead, (1 - w) p_base + w p_thought with
  w = sigmoid, starting at 1/2 (tried because a sure but wrong thought costs many nats in a
  mix of logits; at this scale its head switched thoughts off within 60 steps, see docs/record.md).
- thought embeddings: <|startthought|>/<|endthought|> are rows of the embedding matrix,
  initialised from the embedding of "-" (the paper starts from "---"), and trained at
  --embed_lr_scale times the learning rate. The paper trains them 100 times faster (it stores
  them divided by 100); here 1, 10 and 100 were tried and 1 was best on validation
  (docs/record.md). The updates are scaled, not the gradients: AdamW's step does not depend
  on the gradient's scale.
- losses: NLL of the base prediction + NLL of the mixed predictions on the lookahead tokens
  + --reinforce_weight * REINFORCE on the thought tokens. A thought's reward is its summed
  mixed log-likelihood of the true lookahead tokens minus the mean over the other thoughts
  at the same position (the baseline); rewards are not clamped.

Simplifications: a tiny model pretrained from scratch stands in for Mistral-7B; the text is
cut in fixed-length chunks; no thoughts are generated for the last --n_talk positions' targets
beyond the chunk (those terms are masked).
"""

import argparse
import json
import random
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import loop
import model
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loop.add_task_args(p)
    loop.add_model_args(p)  # --block_size 0: just enough for a chunk, a thought and its lookahead
    g = p.add_argument_group("Quiet-STaR")
    g.add_argument("--scratchpad", type=loop.at_least(0.0, float, at_most=1.0), default=0.5,
                   help="arithmetic, byte-level tokenizer: fraction of training lines "
                   "written with a scratchpad the length of a thought (scratchpad_line), so the base model has a "
                   "skill a thought can draw on")
    g.add_argument("--arm_scratchpad", type=loop.at_least(0.0, float, at_most=1.0), default=None,
                   help="the same fraction in the two arms' training text (default: --scratchpad); 0: plain lines "
                   "only, as in the held-out text")
    g.add_argument("--seq_len", type=loop.at_least(1), default=48, help="T: tokens per training chunk")
    g.add_argument("--n_thoughts", type=loop.at_least(1), default=2,
                   help="thoughts sampled per position (REINFORCE needs 2 or more: "
                   "a thought's baseline is the mean of the others at its position)")
    g.add_argument("--thought_len", type=loop.at_least(1), default=4,
                   help="L: sampled tokens per thought (plus start and end)")
    g.add_argument("--n_talk", type=loop.at_least(1), default=4,
                   help="true tokens after a thought that it is scored on")
    g.add_argument("--thought_temperature", type=loop.more_than(0), default=1.0, help="temperature of thought tokens")
    g.add_argument("--mix", default="hidden", choices=["hidden", "probs"],
                   help="how the mixing head combines the predictions "
                   "with and without the thought: hidden states (the paper) or probabilities (see MixingHead)")
    g.add_argument("--gate", default="hidden", choices=["hidden", "token", "both"],
                   help="what the mixing head reads: the hidden states with and without the thought (the paper), "
                   "the token the thought follows (a learned logit per token and lookahead, 0 at the start), or both")
    g.add_argument("--head_steps", type=loop.at_least(0), default=0,
                   help="steps training the mixing head alone on the frozen model before the thought arm's --steps")
    g.add_argument("--reinforce_weight", type=loop.at_least(0.0, float), default=1.0,
                   help="weight of the REINFORCE term")
    g.add_argument("--embed_lr_scale", type=loop.at_least(0.0, float), default=1.0,
                   help="learning-rate multiplier of the start/end thought embeddings (the paper: 100)")
    g.add_argument("--pretrain_steps", type=loop.at_least(0), default=4000,
                   help="plain LM steps before the two arms split (none with --init)")
    g.add_argument("--pretrain_batch_size", type=loop.at_least(1), default=32, help="chunks per pretraining step")
    g.add_argument("--steps", type=loop.at_least(0), default=300, help="training steps of each arm")
    g.add_argument("--eval_chunks", type=loop.at_least(1), default=64, help="held-out chunks for the NLL comparison")
    g.add_argument("--n_val", type=loop.at_least(0), default=0,
                   help="training questions held out of the corpus, whose lines give --eval_chunks validation chunks "
                   "for choosing settings (0 = none)")
    g.add_argument("--generate", default=None, help="after training, continue this text, thinking before each token")
    g.add_argument("--n_generate", type=loop.at_least(0), default=12, help="tokens to write for --generate")
    g.add_argument("--hide_thoughts", action="store_true", help="print --generate's text without its thoughts")
    loop.add_run_args(p, "out/quietstar", compile_flag=False)
    p.set_defaults(batch_size=8, max_digits=3)  # 3-digit sums fit a 4-token thought
    args = p.parse_args(argv)
    if args.n_talk >= args.seq_len:
        p.error(f"--n_talk {args.n_talk} needs --seq_len above it: a thought is scored on the true tokens after it, "
                "in its chunk")
    return args


# -----------------------------------------------------------------------------
# the corpus: text where thinking helps predict the next token


def scratchpad_digits(answer, width):
    """The sum's digits from the right (the order the scratchpad finds them), zero-padded to `width`."""
    return answer[::-1].ljust(width, "0")


def scratchpad_line(e, width):
    """'a+b=-s-c': the scratchpad between dashes, then the sum. 47+85=-2310-132 for width 4."""
    return f"{e.question}=-{scratchpad_digits(e.answer, width)}-{e.answer}\n"


def corpus_text(examples, dataset, scratchpad=0.0, width=0, seed=0):
    """
    arithmetic: 'a+b=c' lines, of which a `scratchpad` fraction (drawn with `seed`) are written
    as scratchpad_line(e, width) instead; other datasets: question and solution texts.
    """
    if dataset == "arithmetic":
        rng = random.Random(seed)
        return "".join(scratchpad_line(e, width) if rng.random() < scratchpad else f"{e.question}={e.answer}\n"
                       for e in examples)
    return "".join(f"{e.question}\n{data.completion(e.rationale, e.answer)}\n\n" for e in examples)


def computed_mask(text):
    """True on every character that is a digit right after '=' (a result the writer had to compute)."""
    out, after_eq = [], False
    for ch in text:
        out.append(after_eq and ch.isdigit())
        if ch == "=":
            after_eq = True
        elif not (ch.isdigit() or ch in ",."):
            after_eq = False
    return out


def encode_corpus(tok, text):
    """Token ids and the 'computed' mask, one entry per token: a token is computed if its first byte is."""
    byte_mask = [m for ch, m in zip(text, computed_mask(text)) for _ in ch.encode("utf-8")]
    ids, mask, at = tok.encode(text), [], 0
    for t in ids:
        mask.append(byte_mask[at])
        at += len(tok.enc.decode_single_token_bytes(t))
    assert at == len(byte_mask)
    return torch.tensor(ids), torch.tensor(mask)


def random_chunks(ids, mask, T, B, rng):
    starts = [rng.randrange(0, len(ids) - T) for _ in range(B)]
    return torch.stack([ids[s : s + T] for s in starts]), torch.stack([mask[s : s + T] for s in starts])


def scratchpad_skill(gpt, tok, examples, width, batch_size=64):
    """
    What a thought could draw on, held-out NLL per token (nats), each line after a newline:
    the sum on a plain line, the scratchpad's digits, and the sum after a correct scratchpad.
    """
    parts = {
        "sum_plain": [(f"\n{e.question}=", e.answer) for e in examples],
        "scratchpad": [(f"\n{e.question}=-", scratchpad_digits(e.answer, width)) for e in examples],
        "sum_after_scratchpad": [(f"\n{e.question}=-{scratchpad_digits(e.answer, width)}-", e.answer)
                                 for e in examples],
    }
    out = {}
    for key, texts in parts.items():
        lp = loop.completion_logprobs(gpt, [(tok.encode(a), tok.encode(b)) for a, b in texts], batch_size)
        out[key] = -sum(v for v, _ in lp) / max(1, sum(n for _, n in lp))
    return out


# -----------------------------------------------------------------------------
# the mixing head and thought embeddings


class MixingHead(nn.Module):
    """
    The weight w of the thought, from an MLP on [h_base, h_thought] whose last layer starts at zero.
    mode "hidden" (the paper): w = tanh(z), starting at exactly 0, and the prediction is
    lm_head((1 - w) h_base + w h_thought), a mix of logits. mode "probs": w = sigmoid(z),
    starting at 1/2, and the prediction is (1 - w) p_base + w p_thought, a mix of probabilities,
    in which a wrong thought costs at most -log(1 - w) nats.
    With vocab_size, z also has a learned term for the token the thought follows and the
    lookahead k = 1..n_talk (zero at the start): a gate that can open for the token right after
    `=` without opening anywhere else; with mlp=False it is the whole of z.
    """

    def __init__(self, n_embd, mode="hidden", vocab_size=0, n_talk=1, mlp=True):
        super().__init__()
        if mode not in ("hidden", "probs"):
            raise ValueError(f"mixing mode {mode!r}: hidden or probs")
        self.mode, self.fc, self.out = mode, None, None
        if mlp:
            self.fc, self.out = nn.Linear(2 * n_embd, n_embd), nn.Linear(n_embd, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.token = nn.Embedding(vocab_size, n_talk) if vocab_size else None
        if self.token is not None:
            nn.init.zeros_(self.token.weight)

    def forward(self, h_base, h_thought, x=None):
        """
        w (..., 1). x: the token each thought follows, shaped as h_base without its last dim, or
        without its last two when h_base has a lookahead dim K; without it the prediction is k = 1.
        """
        if self.fc is not None:
            z = self.out(F.gelu(self.fc(torch.cat([h_base, h_thought], dim=-1))))
        else:
            z = h_base.new_zeros(*h_base.shape[:-1], 1)
        if self.token is not None:
            g = self.token(x)  # (*x.shape, n_talk)
            z = z + (g[..., : z.size(-2), None] if z.dim() == x.dim() + 2 else g[..., :1])
        return torch.tanh(z) if self.mode == "hidden" else torch.sigmoid(z)  # (..., 1)

    def mix(self, lm_head, h_base, h_thought, x=None):
        """(logits of the mixed prediction, w); for "probs" the logits are the mixture's log-probabilities."""
        w = self(h_base, h_thought, x)
        if self.mode == "hidden":
            return lm_head((1 - w) * h_base + w * h_thought), w
        lp_base, lp_thought = F.log_softmax(lm_head(h_base).float(), -1), F.log_softmax(lm_head(h_thought).float(), -1)
        return torch.logaddexp(torch.log1p(-w.float()) + lp_base, torch.log(w.float()) + lp_thought), w

    def target_logprobs(self, lm_head, h_base, h_thought, w, targets):
        """log p_mixed(targets) at weights w (..., 1), the LM head in chunks (model.target_logprobs): no full logits."""
        if self.mode == "hidden":
            return model.target_logprobs(lm_head, (1 - w) * h_base + w * h_thought, targets)
        w = w.float().squeeze(-1)
        return torch.logaddexp(torch.log1p(-w) + model.target_logprobs(lm_head, h_base, targets),
                               torch.log(w) + model.target_logprobs(lm_head, h_thought, targets))


def mixing_head(cfg, args):
    """The --mix / --gate head for a model of config cfg."""
    token = args.gate != "hidden"
    return MixingHead(cfg.n_embd, args.mix, cfg.vocab_size if token else 0, args.n_talk, mlp=args.gate != "token").to(
        args.device)


def add_thought_tokens(gpt, tok):
    """
    A pretrained tokenizer has no thought tokens: give <|startthought|> and <|endthought|> the
    next two ids, and the model embedding (and output) rows for them when its embedding is not
    already padded past the tokenizer. The byte-level tokenizer has them built in.
    """
    if tok.start_thought is not None:
        return
    tok.start_thought, tok.end_thought = tok.vocab_size, tok.vocab_size + 1
    rows = tok.vocab_size + 2
    if rows > gpt.config.vocab_size:
        old_emb, old_head = gpt.embed_tokens.weight.data, gpt.lm_head.weight.data
        gpt.embed_tokens = nn.Embedding(rows, gpt.config.n_embd).to(old_emb.device)
        gpt.embed_tokens.weight.data[: old_emb.size(0)] = old_emb
        gpt.lm_head = nn.Linear(gpt.config.n_embd, rows, bias=False).to(old_emb.device)
        if gpt.config.tie_embeddings:
            gpt.lm_head.weight = gpt.embed_tokens.weight
        else:
            gpt.lm_head.weight.data[: old_head.size(0)] = old_head
        gpt.config.vocab_size = rows


def init_thought_embeddings(gpt, tok, freeze_others=False):
    """
    Start/end thought embeddings start as the embedding of a pause: the em dash for a
    pretrained tokenizer (as the paper does), '-' for the byte-level one (the em dash is three
    bytes there). freeze_others (LoRA): every other row's gradient is zeroed, so the frozen
    matrix trains only its thought rows (though AdamW keeps state for all of it).
    """
    with torch.no_grad():
        dash = tok.encode("-" if isinstance(tok, data.Tokenizer) else "\u2014")[0]
        for t in (tok.start_thought, tok.end_thought):
            gpt.embed_tokens.weight[t] = gpt.embed_tokens.weight[dash]
    if freeze_others:
        rows = torch.zeros(gpt.config.vocab_size, 1)
        rows[[tok.start_thought, tok.end_thought]] = 1.0
        gpt.embed_tokens.weight.register_hook(lambda g: g * rows.to(g.device))


def faster_thought_rows(gpt, tok, scale):
    """
    model.train's on_step: every update of the start/end thought rows multiplied by `scale`,
    which is their learning rate times `scale` (AdamW's step does not depend on the gradient's
    scale, so multiplying the gradient would not do it; weight decay is 0 here).
    """
    w, rows = gpt.embed_tokens.weight, [tok.start_thought, tok.end_thought]
    last = w[rows].detach().clone()

    def on_step(step):
        with torch.no_grad():
            w[rows] = last + scale * (w[rows] - last)
            last.copy_(w[rows])

    return on_step


# -----------------------------------------------------------------------------
# parallel thoughts


def check_context(gpt, T, args):
    """The last thought token of the last position sits at T + thought_len + n_talk: it must have a rotary position."""
    need = T + args.thought_len + args.n_talk + 1
    if need > gpt.config.block_size:
        raise data.InputError(f"{T} tokens + a thought of {args.thought_len} + {args.n_talk} lookahead need "
                              "positions up to "
                              f"{need - 1}, beyond the model's block_size of {gpt.config.block_size}")


def diagonal_mask(T, j, device):
    """
    (1, 1, T, T + (j+1) T) mask of thought step j over [text | step 0 | ... | step j]:
    the step-j token at position t sees text 0..t and steps 0..j at position t only.
    """
    text = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    own = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat([text] + [own] * (j + 1), dim=1)[None, None]


def think(gpt, head, x, args, tok, noise, full_logits=True):
    """
    Thoughts for every position of x (B, T), n_thoughts each, all generated in parallel.
    noise: (B * n_thoughts, L, T, V) Gumbel noise; thought token j at (row, t) is
    argmax(logits / temperature + noise[row, j, t]), i.e. a sample at that temperature,
    made reproducible across implementations.
    Returns a dict with (R = B * n_thoughts rows, K = n_talk):
      thoughts (R, T, L); thought_logp (R, T) summed log-probs of the sampled thought tokens;
      base_logits (R, T, V); h_base, h_thought (R, T, K, C) the hidden states that predict x[t+k],
      k = 1..K, without and after the thought; w (R, T, K); valid (T, K); and with full_logits:
      talk_logits (R, T, K, V) the mixed logits, thought_logits (R, T, K, V) the same without mixing.
    """
    B, T = x.shape
    N, L, K = args.n_thoughts, args.thought_len, args.n_talk
    check_context(gpt, T, args)
    R, dev = B * N, x.device
    xr = x.repeat_interleave(N, dim=0)  # (R, T): rows b*N .. b*N+N-1 share a text
    cache = model.GrowingKVCache(gpt.config.n_layer)
    t_pos = torch.arange(T, device=dev)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None]
    h_text = gpt.hidden(xr, pos=t_pos.expand(R, T), cache=cache, mask=causal)  # (R, T, C)
    base_logits = gpt.lm_head(h_text)
    # what step j feeds: start, L sampled tokens, end, then the true tokens x[t+1..t+K-1]
    shifted = [torch.cat([xr[:, k:], xr.new_full((R, k), tok.eot)], dim=1) for k in range(K)]
    inp = xr.new_full((R, T), tok.start_thought)
    thoughts, thought_logp, talk_h = [], torch.zeros(R, T, device=dev), []
    for j in range(L + 1 + K):
        pos = (t_pos + 1 + j).expand(R, T)  # the thought continues its position's text
        h = gpt.hidden(inp, pos=pos, cache=cache, mask=diagonal_mask(T, j, dev))  # (R, T, C)
        if j < L:  # sample the next thought token
            logits = gpt.lm_head(h).float()
            z = (logits.detach() / args.thought_temperature + noise[:, j]).argmax(-1)  # (R, T)
            thought_logp = thought_logp + F.log_softmax(logits / args.thought_temperature,
                                                        -1).gather(-1, z[..., None]).squeeze(-1)
            thoughts.append(z)
            inp = z
        elif j == L:
            inp = xr.new_full((R, T), tok.end_thought)
        else:  # j = L + k: h predicts x[t+k]; feed x[t+k] next
            talk_h.append(h)
            inp = shifted[j - L] if j - L < K else inp
    h_thought = torch.stack(talk_h, dim=2)  # (R, T, K, C): after thought, predicting x[t+1..t+K]
    # the base hidden that predicts x[t+k] is the text hidden at t+k-1
    h_base = torch.stack([torch.cat([h_text[:, k:], h_text[:, -1:].expand(R, k, -1)], dim=1) for k in range(K)], dim=2)
    valid = (t_pos[:, None] + torch.arange(1, K + 1, device=dev)[None, :]) < T  # (T, K): x[t+k] inside the chunk
    out = {
        "thoughts": torch.stack(thoughts, dim=2) if thoughts else xr.new_zeros(R, T, 0),
        "thought_logp": thought_logp, "base_logits": base_logits, "h_base": h_base, "h_thought": h_thought,
        "w": head(h_base, h_thought, xr).squeeze(-1), "valid": valid,
    }
    if full_logits:  # the whole (R, T, K, V) predictions, for evaluation; training needs only the targets' log-probs
        out["talk_logits"] = head.mix(gpt.lm_head, h_base, h_thought, xr)[0]
        out["thought_logits"] = gpt.lm_head(h_thought)
    return out


def talk_targets(x, K, pad):
    """(B, T, K): x[t+k] for k = 1..K (pad past the end)."""
    B, T = x.shape
    return torch.stack([torch.cat([x[:, k:], x.new_full((B, k), pad)], dim=1) for k in range(1, K + 1)], dim=2)


def quietstar_loss(gpt, head, x, args, tok, noise, out=None):
    """
    NLL(base) + NLL(mixed, lookahead) + reinforce_weight * REINFORCE. Returns (loss, metrics, out).
    reward(thought) = sum_k log p_mixed(x[t+k]) - mean of the same over the other thoughts at t.
    """
    N, K = args.n_thoughts, args.n_talk
    out = think(gpt, head, x, args, tok, noise, full_logits=False) if out is None else out
    R, T = out["thought_logp"].shape
    xr = x.repeat_interleave(N, dim=0)
    nll_base = F.cross_entropy(out["base_logits"][:, :-1].flatten(0, 1).float(), xr[:, 1:].flatten())
    tgt = talk_targets(xr, K, tok.eot)  # (R, T, K)
    logp = head.target_logprobs(gpt.lm_head, out["h_base"], out["h_thought"], out["w"][..., None], tgt)  # (R, T, K)
    valid = out["valid"][None].expand(R, T, K).float()
    nll_mixed = -(logp * valid).sum() / valid.sum()
    ll = (logp * valid).sum(-1).detach().view(-1, N, T)  # (B, N, T): a thought's log-likelihood of the truth
    baseline = (ll.sum(1, keepdim=True) - ll) / max(1, N - 1)  # mean over the other thoughts at t
    reward = (ll - baseline).view(R, T) if N > 1 else torch.zeros(R, T, device=x.device)
    has_target = out["valid"][:, 0].float()[None]  # positions with at least one target
    reinforce = -(reward * out["thought_logp"] * has_target).sum() / (has_target.sum() * R)
    loss = nll_base + nll_mixed + args.reinforce_weight * reinforce
    metrics = {  # detached tensors; reward_abs: mean |reward| (the mean reward is 0 by construction of the baseline)
        "nll_base": nll_base.detach(), "nll_mixed": nll_mixed.detach(),
        "reward_abs": (reward.abs() * has_target).sum() / (has_target.sum() * R),
        "w": out["w"][..., 0].detach().mean(),
    }
    return loss, metrics, out


def gumbel(shape, generator, device):
    u = torch.rand(shape, generator=generator).clamp(1e-9, 1 - 1e-9)
    return (-torch.log(-torch.log(u))).to(device)


# -----------------------------------------------------------------------------
# thinking while generating


SAMPLE_TOKENS = 12  # tokens of the thinking sample each run prints and saves


def thinking_context(n_text, n_new, thought_len):
    """Positions generate_thinking needs: the text, the new tokens, and one thought with its start and end tokens."""
    return n_text + n_new + thought_len + 2


@torch.no_grad()
def generate_thinking(gpt, head, tok, text, n_new, args, generator, show_thoughts=True):
    """
    Continue `text` greedily for n_new tokens, thinking before each one: the thought is
    written into the KV cache after the text, used, then dropped by moving the cache's write
    position back (the next text token overwrites it). Returns the text, thoughts in [brackets].
    """
    dev = gpt.lm_head.weight.device
    ids = tok.encode(text)
    L = args.thought_len
    specials = {tok.eot, tok.pad, tok.start_thought, tok.end_thought, *tok.stop_tokens}
    need = thinking_context(len(ids), n_new, L)
    if need > gpt.config.block_size:
        raise data.InputError(f"text of {len(ids)} tokens + {n_new} new + a thought of {L + 2} exceeds block_size "
                              f"{gpt.config.block_size}")
    cache = gpt.new_cache(1, need)
    cache.valid[:] = True
    h = gpt.hidden(torch.tensor([ids], device=dev), cache=cache)[:, -1]
    out, last = [], torch.tensor([ids[-1]], device=dev)  # last: the token the next thought follows
    for _ in range(n_new):
        n_text = cache.length  # text tokens so far: the thought starts at position n_text
        tok_in, thought = tok.start_thought, []
        for j in range(L + 2):  # feed start, z_1..z_L, end
            pos = torch.tensor([[n_text + j]], device=dev)
            hj = gpt.hidden(torch.tensor([[tok_in]], device=dev), pos=pos, cache=cache)[:, -1]
            if j < L:
                logits = gpt.lm_head(hj).float() / args.thought_temperature
                tok_in = int(torch.multinomial(F.softmax(logits, -1), 1, generator=generator))
                thought.append(tok_in)
            elif j == L:
                tok_in = tok.end_thought
        nxt = int(head.mix(gpt.lm_head, h, hj, last)[0].argmax(-1))  # hj: the hidden after <|endthought|>
        last = torch.tensor([nxt], device=dev)
        cache.length = n_text  # drop the thought: the next text token overwrites its slots
        h = gpt.hidden(torch.tensor([[nxt]], device=dev), pos=torch.tensor([[n_text]], device=dev), cache=cache)[:, -1]
        if show_thoughts:
            out.append("[" + tok.decode([t for t in thought if t not in specials]) + "]")
        if nxt == tok.eot:
            break
        out.append(tok.decode([nxt]) if nxt not in specials else "")
    return text + "".join(out)


# -----------------------------------------------------------------------------
# training and evaluation


def train_arm(gpt, head, ids, mask, args, tok, *, steps, thoughts, seed, desc, log=None, batch_size=None, log_every=0):
    """
    `steps` of training: with thoughts (Quiet-STaR's loss) or without (the LM loss), batch_size chunks a step.
    Prints progress 5 times with thoughts, else every log_every steps (0: never).
    """
    batch_size = batch_size or args.batch_size
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    V = gpt.config.vocab_size
    params = list(gpt.parameters()) + (list(head.parameters()) if thoughts else [])

    def get_batch(step, micro):
        B, N = batch_size, args.n_thoughts
        x, _ = random_chunks(ids, mask, args.seq_len, B, rng)
        noise = gumbel((B * N, args.thought_len, args.seq_len, V), g, args.device) if thoughts else None
        rows = loop.my_rows(B)  # this process's rows of the batch, and their thoughts' noise
        if thoughts and len(rows) < B:
            noise = noise.view(B, N, *noise.shape[1:])[rows].flatten(0, 1)
        return x[rows].to(args.device), noise, loop.share([1] * B, rows)  # every loss term is a mean over rows

    def loss_fn(_, batch):  # gpt itself: these steps are never compiled
        x, noise, share = batch
        if not thoughts:
            logits, _ = gpt(x)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
            return loss * share, {"nll_base": loss.detach()}
        loss, metrics, _ = quietstar_loss(gpt, head, x, args, tok, noise)
        if log is not None:
            log.append(metrics)
        return loss * share, metrics

    cfg = model.TrainConfig(steps=steps, lr=args.lr, warmup=min(50, steps // 10),
                            parallel=loop.parallel_mode(gpt, False))
    return model.train(gpt, get_batch, cfg, loss_fn=loss_fn, params=params, desc=desc,
                       log_every=max(1, steps // 5) if thoughts else log_every,
                       on_step=faster_thought_rows(gpt, tok, args.embed_lr_scale)
                       if thoughts and args.embed_lr_scale != 1 else None)


@torch.no_grad()
def evaluate(gpt, head, chunks, hard, args, tok, *, thoughts, seed, gate=None):
    """
    Held-out next-token NLL on all predicted tokens and on the computed ones (digits after '=').
    With thoughts also: the same model's prediction without its thoughts on the computed tokens
    (nll_computed_base), and the mean mixing weight where the next token is computed (w_computed);
    with a gate lam (see gated_nll), the computed tokens' NLL under that hand-set mix (nll_computed_gated).
    """
    g = torch.Generator().manual_seed(seed)
    tot = {"nll": 0.0, "nll_computed": 0.0, "nll_computed_base": 0.0, "w_computed": 0.0, "nll_computed_gated": 0.0}
    n = n_hard = 0.0
    for i in range(0, len(chunks), args.batch_size):
        x, hm = chunks[i : i + args.batch_size].to(args.device), hard[i : i + args.batch_size].to(args.device)
        tgt, tmask = x[:, 1:], hm[:, 1:].float()
        if thoughts:
            N = args.n_thoughts
            noise = gumbel((x.size(0) * N, args.thought_len, args.seq_len, gpt.config.vocab_size), g, args.device)
            out = think(gpt, head, x, args, tok, noise)
            # the next-token (k = 1) mixed prediction, averaged in probability over the thoughts
            lp = F.log_softmax(out["talk_logits"][:, :-1, 0].float(), -1)  # (R, T-1, V)
            lp = lp.view(x.size(0), N, *lp.shape[1:]).logsumexp(1) - torch.log(torch.tensor(float(N)))
            lp_base = F.log_softmax(out["base_logits"][::N, :-1].float(), -1)  # rows b*N .. b*N+N-1 share a text
            nll_base = -lp_base.gather(-1, tgt[..., None]).squeeze(-1)
            tot["nll_computed_base"] += (nll_base * tmask).sum().item()
            tot["w_computed"] += (out["w"][:, :-1, 0].view(x.size(0), N, -1).mean(1) * tmask).sum().item()
            # the token after each '=' from (1 - gate) p_base + gate p_thought, every other from p_base
            if gate is not None:
                B, T = x.shape
                p_base = F.softmax(out["base_logits"][::N, :-1].float(), -1)  # (B, T-1, V): x[t+1] from the text to t
                p_thought = F.softmax(out["thought_logits"][:, :-1, 0].float(), -1)
                p_thought = p_thought.view(B, N, T - 1, -1).mean(1)  # after t's thoughts
                lam = gate * (x[:, :-1] == tok.encode("=")[0]).float()[..., None]
                p = ((1 - lam) * p_base + lam * p_thought).gather(-1, tgt[..., None]).squeeze(-1)
                tot["nll_computed_gated"] += (-p.log() * tmask).sum().item()
        else:
            lp = F.log_softmax(gpt(x)[0][:, :-1].float(), -1)
        nll = -lp.gather(-1, tgt[..., None]).squeeze(-1)
        tot["nll"] += nll.sum().item()
        n += nll.numel()
        tot["nll_computed"] += (nll * tmask).sum().item()
        n_hard += tmask.sum().item()
    res = {"nll": tot["nll"] / n, "nll_computed": tot["nll_computed"] / max(1, n_hard)}
    if thoughts:
        res.update({k: tot[k] / max(1, n_hard) for k in ("nll_computed_base", "w_computed")})
    if gate is not None:
        res["nll_computed_gated"] = tot["nll_computed_gated"] / max(1, n_hard)
    return res


def gated_nll(gpt, chunks, hard, args, tok, seed, lam=0.5):
    """
    What the thoughts hold, read by a hand-set head instead of a learned one: the token after
    each '=' is predicted by (1 - lam) p_base + lam p_thought (p_thought averaged over the
    thoughts, as in evaluate), every other token by p_base alone. Held-out NLL per computed token.
    """
    head = MixingHead(gpt.config.n_embd).to(args.device)  # w = 0; only think's unmixed predictions are used
    return evaluate(gpt, head, chunks, hard, args, tok, thoughts=True, seed=seed, gate=lam)["nll_computed_gated"]


def main(args):
    run, tok, init, corpus, cfg = setup(args)

    # 1. the base LM, shared by both arms: --init, or trained here on the corpus
    base = base_lm(run, init, cfg, corpus, args, tok)
    add_thought_tokens(base, tok)  # a pretrained tokenizer has none: two new rows
    cfg = base.config
    check_context(base, args.seq_len, args)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    results = {"pretrained": evaluate(base, None, corpus.eval_x, corpus.eval_m, args, tok, thoughts=False,
                                      seed=args.seed)}
    # 2. what a thought could draw on: the base's skill, and its own thoughts read by a hand-set gate
    if corpus.scratchpad:
        results["skill"] = skill(base, cfg, state, tok, corpus, args)

    # 3. the two arms, same steps, same data order: without thoughts, and with thoughts after every token
    #    (generated in parallel), a mixing head, and REINFORCE on the thoughts
    for arm, thoughts in (("no_thoughts", False), ("thoughts", True)):
        (results[arm],) = run.cached([f"{arm}.json"],
                                     lambda: [train_and_evaluate(run, arm, thoughts, cfg, state, tok, corpus, args)])
    loop.write_atomic(run.path("results.json"), json.dumps(results, indent=1))
    if args.generate:  # think while writing, with the trained thought model
        gpt, extra = model.load_checkpoint(run.path("thoughts.pt"), args.device)
        tok.start_thought, tok.end_thought = extra["thought_tokens"]
        head = mixing_head(gpt.config, args)
        head.load_state_dict(extra["head"])
        text = generate_thinking(gpt, head, tok, args.generate, args.n_generate, args,
                                 torch.Generator().manual_seed(args.seed), show_thoughts=not args.hide_thoughts)
        print(f"generated: {text!r}")
    p, a, b = results["pretrained"], results["no_thoughts"], results["thoughts"]
    print(f"held-out NLL (all / computed tokens): pretrained {p['nll']:.4f} / {p['nll_computed']:.4f} | "
          f"+{args.steps} steps without thoughts {a['nll']:.4f} / {a['nll_computed']:.4f} | "
          f"with thoughts {b['nll']:.4f} / {b['nll_computed']:.4f}")
    return results


def setup(args):
    """The device, the run directory, the tokenizer, the corpus, held-out chunks, and a context that fits them all."""
    args.device = loop.setup_device(args.device, args.threads)
    run = loop.Run(args.out_dir, vars(args), args.resume, "Quiet-STaR")
    init = loop.resolve_init(args.init, "arithmetic")  # auto: pretrain here, on either dataset
    tok = loop.tokenizer_for(init)
    args.lr = loop.learning_rate(args.lr, tok, args.scratch_lr)
    train_set, test = loop.task_from_args(args)
    if args.n_val >= len(train_set):
        raise data.InputError(f"--n_val {args.n_val} leaves no training questions of {len(train_set)}")
    train_set, val = train_set[: len(train_set) - args.n_val], train_set[len(train_set) - args.n_val :]
    # the scratchpad is one digit a token: a pretrained tokenizer's digit groups would not fill a thought's length
    scratchpad = args.scratchpad if args.dataset == "arithmetic" and isinstance(tok, data.Tokenizer) else 0.0
    if scratchpad and max(len(e.answer) for e in train_set + test) > args.thought_len:
        raise data.InputError("--scratchpad writes the sum's digits in a thought of --thought_len "
                              f"{args.thought_len} tokens: "
                              f"sums of --max_digits {args.max_digits} numbers need up to {args.max_digits + 1}")

    def train_text(share):  # the training questions' text with this share of scratchpad lines, encoded
        return encode_corpus(tok, corpus_text(train_set, args.dataset, share, args.thought_len, args.seed))

    ids, mask = train_text(scratchpad)  # the base LM's
    if args.arm_scratchpad is not None and not scratchpad:
        print(f"--arm_scratchpad {args.arm_scratchpad:g} has nothing to do: no text here has scratchpad lines "
              "(--scratchpad 0, another dataset, or a pretrained tokenizer)")
    arm = scratchpad if args.arm_scratchpad is None or not scratchpad else args.arm_scratchpad  # the arms' share
    arm_ids, arm_mask = (ids, mask) if arm == scratchpad else train_text(arm)
    tids, tmask = encode_corpus(tok, corpus_text(test, args.dataset))
    eval_x, eval_m = random_chunks(tids, tmask, args.seq_len, args.eval_chunks, random.Random(args.seed + 99))
    val_x = val_m = None
    if val:
        vids, vmask = encode_corpus(tok, corpus_text(val, args.dataset))
        val_x, val_m = random_chunks(vids, vmask, args.seq_len, args.eval_chunks, random.Random(args.seed + 98))
    print(f"corpus: {len(ids):,} train tokens ({int(mask.sum()):,} computed), {len(tids):,} held-out tokens")
    need = [args.seq_len + args.thought_len + 2 + args.n_talk]  # a chunk, a thought and its lookahead
    if scratchpad:  # the skill test reads whole scratchpad lines
        need.append(max(len(tok.encode(scratchpad_line(e, args.thought_len))) for e in test))
    # the thinking sample's prompt, and --generate's
    sample_prompt = args.generate or corpus_text(test[:1], args.dataset).split("=")[0] + "="
    need.append(thinking_context(len(tok.encode(sample_prompt)),
                                 max(SAMPLE_TOKENS, args.n_generate if args.generate else 0), args.thought_len))
    block = args.block_size or max(need)
    cfg = GPTConfig(block_size=block, vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_kv_head=args.n_head, n_embd=args.n_embd)
    corpus = SimpleNamespace(ids=ids, mask=mask, arm_ids=arm_ids, arm_mask=arm_mask, eval_x=eval_x, eval_m=eval_m,
                             val_x=val_x, val_m=val_m, test=test, scratchpad=scratchpad, sample_prompt=sample_prompt)
    return run, tok, init, corpus, cfg


def base_lm(run, init, cfg, corpus, args, tok):
    """The base LM: read back, a pretrained directory, a nanostar checkpoint, or trained here (--pretrain_steps)."""
    if run.exists("pretrained.pt"):
        print("resumed: pretrained model from pretrained.pt")
        return run.load("pretrained.pt", args.device)
    if loop.is_pretrained(init):
        import hf

        return hf.load_pretrained(init, args.device, cfg.block_size)
    if init:
        base = model.load_base(init, args.device)
    else:
        torch.manual_seed(args.seed)
        base = GPT(cfg).to(args.device)
        t0 = time.time()
        train_arm(base, None, corpus.ids, corpus.mask, args, tok, steps=args.pretrain_steps, thoughts=False,
                  seed=args.seed, desc="pretrain", batch_size=args.pretrain_batch_size,
                  log_every=max(1, args.pretrain_steps // 10))
        print(f"pretrained {base.num_params():,} parameters for {args.pretrain_steps} steps in {time.time() - t0:.0f}s")
    run.save("pretrained.pt", base)
    return base


def skill(base, cfg, state, tok, corpus, args):
    """The held-out NLL of what a thought could draw on, and of the base's own thoughts read by a hand-set gate."""
    out = scratchpad_skill(base, tok, corpus.test, args.thought_len)
    # the pretrained model's own thoughts (start/end as the arms start them), on the arms' held-out chunks
    thinker = GPT(cfg).to(args.device)
    thinker.load_state_dict(state)
    init_thought_embeddings(thinker, tok)
    out["computed_gated_thoughts"] = gated_nll(thinker, corpus.eval_x, corpus.eval_m, args, tok, args.seed + 2)
    print("held-out NLL per token of the pretrained model: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


def train_and_evaluate(run, arm, thoughts, cfg, state, tok, corpus, args):
    """One arm from the base weights: --steps of training (with thoughts: and the mixing head), then held-out NLL."""
    torch.manual_seed(args.seed + 1)
    lora = loop.lora_options(args, None)  # only the adapters train (and with thoughts the head and thought rows)
    gpt = loop.new_model(state, cfg, args.device, lora)
    head = mixing_head(cfg, args) if thoughts else None
    if thoughts:
        gpt.embed_tokens.weight.requires_grad_(True)
        init_thought_embeddings(gpt, tok, freeze_others=bool(lora))
    log = []
    t0 = time.time()
    if thoughts and args.head_steps:  # the head alone first, on the frozen model and its thoughts
        frozen = [p for p in gpt.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        train_arm(gpt, head, corpus.arm_ids, corpus.arm_mask, args, tok, steps=args.head_steps, thoughts=True,
                  seed=args.seed + 3, desc="mixing head alone", log=log)
        for p in frozen:
            p.requires_grad_(True)
    train_arm(gpt, head, corpus.arm_ids, corpus.arm_mask, args, tok, steps=args.steps, thoughts=thoughts,
              seed=args.seed + 1, desc=arm, log=log)
    res = evaluate(gpt, head, corpus.eval_x, corpus.eval_m, args, tok, thoughts=thoughts, seed=args.seed + 2)
    if corpus.val_x is not None:
        res["val"] = evaluate(gpt, head, corpus.val_x, corpus.val_m, args, tok, thoughts=thoughts, seed=args.seed + 4)
    res["time"] = time.time() - t0
    if thoughts:
        k = max(1, len(log) // 5)
        res["trajectory"] = [{key: float(sum(r[key] for r in log[i : i + k]) / len(log[i : i + k])) for key in log[0]}
                             | {"step": i} for i in range(0, len(log), k)]
        # the whole model, adapters merged: with LoRA its thought rows trained too
        run.save("thoughts.pt", model.merge_lora(gpt), head=head.state_dict(),
                 thought_tokens=[tok.start_thought, tok.end_thought])
        res["sample"] = generate_thinking(gpt, head, tok, corpus.sample_prompt, SAMPLE_TOKENS, args,
                                          torch.Generator().manual_seed(args.seed))
        print(f"thinking sample: {res['sample']!r}")
    own = (f" (the same model without its thoughts {res['nll_computed_base']:.4f}, mean w there "
           f"{res['w_computed']:.4f})"
           if thoughts else "")
    val = f"; validation: on computed tokens {res['val']['nll_computed']:.4f}" if "val" in res else ""
    print(f"{arm}: held-out NLL {res['nll']:.4f}, on computed tokens {res['nll_computed']:.4f}{own}{val} "
          f"({res['time']:.0f}s)")
    return res


if __name__ == "__main__":
    loop.run_cli(main, get_args())
