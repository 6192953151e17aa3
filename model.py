"""
One small, self-contained transformer for nanostar, and everything the scripts do with it.

- `GPT`: the Llama-family layout (RMSNorm, rotary positions with Llama 3's rescaling, SwiGLU
  MLP, grouped-query attention, optional q/k/v bias, Qwen3's q/k norm and head width,
  optional tied embeddings). Tiny from-scratch models and pretrained Llama/Qwen2/Qwen3/SmolLM2
  weights (hf.py's `load_pretrained`, from a Hugging Face directory) use the same code.
- `KVCache` + `generate`: batched KV-cached sampling for prompts of *different* lengths
  (left-padded; each row has its own positions), `num_samples` rollouts per prompt that share
  the prompt's cache, counter-based noise per row (`noise_keys`: the same samples in any
  batch) or a seeded generator, per-row stop at any of the stop ids or at a blank line; with
  compile=True the decode step of compiled.py.
- `sequence_logprobs`, `dpo_loss`, `dpo_sft_loss`: the log-prob and preference pieces shared
  by star.py's verifier and stepdpo.py.
- `train`: the one fine-tuning loop every script calls; `save_checkpoint`/`load_checkpoint`.

Importing this file does nothing but define things.
"""

import math
import os
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from torch.utils.checkpoint import checkpoint

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (prompt + generation) the model sees
    vocab_size: int = 260  # data.py's tokenizer: 256 bytes + 4 special tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 4  # key/value heads (grouped-query attention when < n_head)
    n_embd: int = 256  # residual stream width
    intermediate_size: int = 0  # SwiGLU hidden width; 0 means round(8/3 * n_embd) up to 32
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2 has it, Llama does not)
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    head_dim: int = 0  # per-head width; 0 means n_embd // n_head (Qwen3 sets it explicitly)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3)
    rope_scaling: dict = field(default=None)  # Llama 3.x: {"rope_type": "llama3", "factor", "low_freq_factor", ...}

    def __post_init__(self):
        if self.head_dim == 0:
            assert self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head"
            self.head_dim = self.n_embd // self.n_head
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        if self.intermediate_size == 0:
            self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)


# most logits (B x T x vocab) that exist at once in a loss: 2^28 fp32 values are 1 GiB (a Qwen vocab of 151,936 at
# 8 x 1,024 positions would be 5 GB before its gradient); nanostar's own small vocab never reaches it
LOGITS_CHUNK = 2**28


def autodetect_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


# -----------------------------------------------------------------------------
# the model


def rotate_half(x):
    # the Llama/HF rotary convention: pairs are (i, i + D/2), so pretrained weights load unchanged
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_frequencies(config):
    """Rotary inverse frequencies (D/2,), with Llama 3's long-context rescaling when the config asks for it."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    rs = config.rope_scaling
    if not rs:
        return inv_freq
    # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, a smooth blend between
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


class KVCache:
    """
    Preallocated keys/values for every layer, written by index, never concatenated.
    Slot s of row b holds the token fed s-th into that row (left padding included); `valid`
    says which slots hold real tokens, so padding is never attended to. `length` is the
    number of slots written so far; the next forward writes slots [length, length + T).
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def max_len(self):
        return self.k.size(3)

    def expand(self, n):
        """Repeat every row n times (row b becomes rows b*n .. b*n+n-1): n rollouts share one prefill."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.valid = self.valid.repeat_interleave(n, dim=0)

    def update(self, layer, k, v):
        """Write this call's keys/values at slots [length, length + T); return every written slot (views)."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def check(self, T):
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {T} tokens > {self.max_len} slots")

    def advance(self, T):
        self.length += T

    def default_mask(self, T):
        """(B, 1, T, end) mask for T new tokens: causal over slots, padding hidden, each token sees itself."""
        start, end = self.length, self.length + T
        keys = self.valid[:, None, None, :end]  # (B, 1, 1, end)
        if T == 1:
            return keys  # one new token: every written slot is in its past
        q = torch.arange(start, end, device=keys.device)[:, None]
        j = torch.arange(end, device=keys.device)[None, :]
        return (keys & (j <= q)) | (j == q)  # the `j == q` keeps padded rows from attending to nothing


class GrowingKVCache:
    """
    A cache autograd can run through, for training over cached positions (Quiet-STaR's thoughts):
    keys/values are appended with torch.cat, so nothing saved for backward is ever overwritten.
    Sampling uses the preallocated KVCache above. Callers pass the attention mask explicitly.
    """

    def __init__(self, n_layer):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.length = 0
        self.max_len = float("inf")

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def check(self, T):
        pass

    def advance(self, T):
        self.length += T


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        if config.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by all heads
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q = q * cos + rotate_half(q) * sin  # cos, sin: (B, 1, T, D)
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, length + T, D)
        if mask is None:  # plain causal over this call's tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        else:  # mask: (B, 1, T, S) bool, True = attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # rotary table for every position the model can see; not saved in checkpoints
        inv_freq = rope_frequencies(config)
        angles = torch.outer(torch.arange(config.block_size).float(), inv_freq)  # (block_size, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (block_size, D), matching rotate_half
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, pos=None, cache=None, mask=None):
        """
        Final (normed) hidden states, (B, T, C).
        idx: (B, T) token ids. pos: (B, T) rotary positions (default 0..T-1, or continuing the cache).
        cache: a KVCache; the T tokens are written at slots [cache.length, cache.length + T).
        mask: (B, 1, T, S) bool, True = may attend; S = T without a cache, cache.length + T with one.
              Default: causal (and, with a cache, padding slots hidden).
        """
        B, T = idx.size()
        if pos is None:
            start = cache.length if cache is not None else 0
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)
        if cache is not None:
            cache.check(T)
            if mask is None:
                mask = cache.default_mask(T)
        cos = self.rope_cos[pos].unsqueeze(1)  # (B, 1, T, D)
        sin = self.rope_sin[pos].unsqueeze(1)
        x = self.embed_tokens(idx)  # (B, T, C)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, idx, targets=None, pos=None, cache=None, mask=None):
        """
        Returns (logits, loss).
        logits: (B, T, vocab). loss: None without targets; with targets (B, T, ids, -1 = ignore) the
        per-token cross-entropy, reduction='none', shape (B, T), 0 where ignored. Every log-prob
        in nanostar (SFT, DPO, verifier scores) is minus this number. Where B x T x vocab is
        above LOGITS_CHUNK the loss is computed in chunks of positions and logits is None.
        """
        h = self.hidden(idx, pos, cache, mask)
        if targets is None:
            return self.lm_head(h), None
        B, T = targets.shape
        chunk = max(1, LOGITS_CHUNK // (B * self.config.vocab_size))  # positions whose logits exist at once
        if chunk >= T:
            logits = self.lm_head(h)
            return logits, self._token_losses(logits, targets)
        # a wide vocab: the head and its loss run a chunk of positions at a time, and backward computes each chunk's
        # logits again (checkpoint), so (B, T, vocab) never exists; no logits are returned
        losses = [checkpoint(lambda h, t: self._token_losses(self.lm_head(h), t), h[:, i : i + chunk],
                             targets[:, i : i + chunk], use_reentrant=False) for i in range(0, T, chunk)]
        return None, torch.cat(losses, dim=1)

    @staticmethod
    def _token_losses(logits, targets):
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return loss.view(targets.shape)

    def new_cache(self, batch_size, max_len):
        p = self.lm_head.weight
        dtype = torch.bfloat16 if p.device.type == "cuda" else p.dtype
        return KVCache(self.config, batch_size, max_len, p.device, dtype)


def target_logprobs(head, h, targets):
    """
    log_softmax(head(h))[targets] for hidden states h (..., C): where the logits of all rows
    would pass LOGITS_CHUNK, a chunk of rows at a time, computed again in backward (checkpoint).
    """
    lp = lambda h, t: F.log_softmax(head(h).float(), -1).gather(-1, t[..., None]).squeeze(-1)
    rows = max(1, LOGITS_CHUNK // head.weight.size(0))
    if targets.numel() <= rows:
        return lp(h, targets)
    h, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    parts = [checkpoint(lp, h[i : i + rows], t[i : i + rows], use_reentrant=False) for i in range(0, len(t), rows)]
    return torch.cat(parts).view(targets.shape)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): low-rank adapters on a frozen model

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """
    A frozen linear layer plus a trainable low-rank update, y = x W^T + b + (alpha / r) x A^T B^T.
    It holds the layer's own weight and bias, so the state dict's names do not change. B starts
    at zero: a fresh adapter leaves the layer exactly as it was. The update is applied on the fly
    (see add_lora); the adapters are kept in fp32.
    """

    def __init__(self, layer, rank, alpha):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.lora_A = nn.Parameter(torch.empty(rank, layer.in_features, device=layer.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank, device=layer.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank

    def forward(self, x):  # the adapters cast to x's dtype: no fp32 copy of the activations is made and saved
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A.to(x.dtype)),
                                                               self.lora_B.to(x.dtype)) * self.scale


def add_lora(gpt, rank, alpha, targets=LORA_TARGETS, base=None):
    """
    Freeze gpt (bf16 on a GPU) and give the target projections fresh adapters, in place; only the
    adapters train. base: where the frozen weights come from (a nanostar checkpoint or a Hugging
    Face directory), saved with the adapters. Sampling runs the adapters on the fly rather than
    merged into a copy: no second copy of the weights (15 GB for a 7B model), the frozen base
    stays bit for bit the base, and a resumed run rebuilds exactly the model it stopped with.
    """
    if gpt.lm_head.weight.is_cuda:
        gpt.to(torch.bfloat16)
    gpt.requires_grad_(False)
    for block in gpt.layers:
        for part in (block.self_attn, block.mlp):
            for name, layer in list(part.named_children()):
                if name in targets:
                    setattr(part, name, LoRALinear(layer, rank, alpha))
    gpt.lora = {"rank": rank, "alpha": alpha, "targets": list(targets), "base": base}
    return gpt


def merge_lora(gpt):
    """A plain GPT with every adapter folded into its weight, W + (alpha / r) B A; a model without adapters itself."""
    if not getattr(gpt, "lora", None):
        return gpt
    state = {k: v for k, v in gpt.state_dict().items() if ".lora_" not in k}
    for name, layer in gpt.named_modules():
        if isinstance(layer, LoRALinear):
            state[f"{name}.weight"] = layer.weight.float() + layer.scale * layer.lora_B @ layer.lora_A
    plain = GPT(gpt.config).to(gpt.lm_head.weight.device)
    plain.load_state_dict(state)
    return plain.eval()


# -----------------------------------------------------------------------------
# sampling


def sample_next_token(logits, generator=None, temperature=1.0, top_k=None, keys=None, step=0):
    """
    logits (B, V) -> (B,) token ids. temperature 0 means argmax; top_k keeps the k largest.
    keys: (B,) noise keys (`noise_keys`): row b's number counter_uniform(keys, step)[b] picks
    where it falls in the row's cumulative distribution (inverse-CDF sampling), so a row's
    token depends on its own logits, key and step only; else torch.multinomial with `generator`.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if keys is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.double().cumsum(dim=-1)  # float64: the sum over a 150k vocab stays exact enough
    u = (counter_uniform(keys, step) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=logits.size(-1) - 1)


# Counter-based sampling noise: a row's random numbers are a hash of (its key, the token
# position), not draws from a generator shared by the batch, so the samples of a question do
# not depend on the batch, the batch size or the process it lands in. The hash works on
# 32-bit values held in int64, where every product stays below 2**63 (no overflow on any device).

_M32 = 0xFFFFFFFF


def hash32(x):
    """An integer hash (two multiply-xorshift rounds) of int64 values, elementwise, to [0, 2**32)."""
    x = x & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def noise_keys(seed, rows, samples, device="cpu"):
    """(len(rows) * samples,) int64 keys, prompt-major like `generate`'s rows: row r's sample j is hash(seed, r, j)."""
    r = torch.as_tensor(rows, dtype=torch.long, device=device)
    base = hash32(hash32(torch.full_like(r, seed & _M32)) ^ r)
    j = torch.arange(samples, dtype=torch.long, device=device)
    return hash32(hash32(base[:, None]) ^ j).flatten()


def counter_uniform(keys, step):
    """(B,) uniforms in (0, 1) for token `step` of rows with these keys."""
    h = hash32(keys ^ hash32(torch.full_like(keys, step + 0x9E3779B9)))
    return (h.double() + 0.5) / 2.0**32


@dataclass
class Samples:
    """What `generate` returns. Rows are prompt-major: row i*num_samples + j is sample j of prompt i."""

    tokens: torch.Tensor  # (N, L) left-padded prompt, then generated tokens (stop token included)
    prompt_mask: torch.Tensor  # (N, L) True on the prompt's own tokens (not padding)
    gen_mask: torch.Tensor  # (N, L) True on generated tokens, up to and including the stop token
    finished: torch.Tensor  # (N,) True where the row emitted a stop token (or wrote a blank line) within the limit
    logprobs: torch.Tensor = None  # (N, L) model log-prob (temperature 1) of each generated token, else 0
    at_blank_line: torch.Tensor = None  # (N,) True where the row ended at a blank line (generate's blank_line)

    def completions(self, strip_stop=True):
        """Generated token ids of every row as lists, without the stop token (a blank line's last token is kept)."""
        out = []
        blank = self.at_blank_line.tolist() if self.at_blank_line is not None else [False] * len(self.tokens)
        for toks, m, fin, b in zip(self.tokens.tolist(), self.gen_mask.tolist(), self.finished.tolist(), blank):
            c = [t for t, keep in zip(toks, m) if keep]
            out.append(c[:-1] if (strip_stop and fin and not b) else c)
        return out


def _stops(stop_token, device):
    """Stop ids as a tensor (or None) and the id that pads finished rows."""
    if stop_token is None:
        return None, 0
    ids = [stop_token] if isinstance(stop_token, int) else list(stop_token)
    return torch.tensor(ids, device=device), ids[0]


def _limit(logits, vocab_limit):
    """Logits with the ids at and beyond vocab_limit made impossible."""
    if vocab_limit is None or vocab_limit >= logits.size(-1):
        return logits
    return torch.cat([logits[:, :vocab_limit], torch.full_like(logits[:, vocab_limit:], float("-inf"))], dim=-1)


def _left_pad(prompts, pad_id, extra, device):
    """Left-pad a list of token lists into (B, P + extra); returns tokens, valid mask, positions, P."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P + extra), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P + extra, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p) : P] = True
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, L) each row's own 0, 1, 2, ...
    return tokens.to(device), valid.to(device), pos.to(device), P


def _check_length(model, P, max_new_tokens):
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt of {P} tokens + {max_new_tokens} new tokens = {P + max_new_tokens} "
            f"exceeds the model's block_size of {model.config.block_size}"
        )


@torch.no_grad()
def generate(
    model,
    prompts,
    max_new_tokens,
    *,
    temperature=1.0,
    top_k=None,
    stop_token=None,
    generator=None,
    num_samples=1,
    return_logprobs=False,
    vocab_limit=None,
    compile=False,
    keys=None,
    blank_line=None,
):
    """
    KV-cached batched sampling. prompts: a list of token-id lists of any lengths.
    Each prompt is prefilled once; with num_samples > 1 its cache is then repeated for its
    num_samples rollouts (rows i*num_samples .. i*num_samples + num_samples - 1).
    A row stops at stop_token (an id or a list of ids); rows that never emit one are cut at
    max_new_tokens (finished=False). vocab_limit: never sample ids >= this (an embedding padded
    beyond its tokenizer, as Qwen2.5's 151,936 rows for 151,665 tokens). compile: run the
    one-token decode step through torch.compile over a StaticKVCache (CUDA graphs on a GPU);
    worth it only when the same shapes are sampled many times, since each new batch or
    length shape compiles again. keys: (len(prompts) * num_samples,) int64 noise keys (see
    `noise_keys`): each row's noise comes from its key and position (`counter_uniform`), so
    a row samples the same tokens in any batch; without keys, `generator` draws the noise.
    blank_line: a (vocab, 3) bool table of each id's text (starts with a newline, ends with
    one, holds a blank line; data.blank_line_table): a row also ends (finished, at_blank_line)
    at the token that completes its first blank line, as a base model under a few-shot prompt
    goes on to write the next exemplar. Checked on ids as they are sampled, never decoding.
    """
    device = model.lm_head.weight.device
    stops, pad_id = _stops(stop_token, device)
    tokens, valid, pos, P = _left_pad(prompts, pad_id, 0, device)
    _check_length(model, P, max_new_tokens)
    B = len(prompts) * num_samples
    cache = model.new_cache(len(prompts), P + max_new_tokens)
    cache.valid[:, :P] = valid
    with autocast(device):  # prefill; only the last position's logits are needed (the vocab can be 150k wide)
        logits = model.lm_head(model.hidden(tokens, pos=pos, cache=cache)[:, -1])  # (b, V)
    next_pos = pos[:, -1:] + 1  # (b, 1)
    if num_samples > 1:
        cache.expand(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        next_pos = next_pos.repeat_interleave(num_samples, dim=0)
        tokens = tokens.repeat_interleave(num_samples, dim=0)
        valid = valid.repeat_interleave(num_samples, dim=0)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    out_lp = torch.zeros(B, max_new_tokens, device=device) if return_logprobs else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    at_blank = torch.zeros(B, dtype=torch.bool, device=device)  # rows that ended at a blank line
    after_newline = torch.zeros(B, dtype=torch.bool, device=device)  # the row's text so far ends with '\n'
    cache.valid[:, P:] = True  # every generated slot is a real token (rows already done are never read back)
    n = 0
    for n in range(max_new_tokens):
        logits = _limit(logits, vocab_limit)
        tok = sample_next_token(logits, generator, temperature, top_k, keys, n)
        tok = tok.masked_fill(done, pad_id)
        out[:, n] = tok
        out_mask[:, n] = ~done
        if return_logprobs:
            lp = F.log_softmax(logits.float(), dim=-1).gather(1, tok[:, None]).squeeze(1)
            out_lp[:, n] = lp.masked_fill(done, 0.0)
        if blank_line is not None:
            starts, ends, holds = blank_line[tok].unbind(-1)  # (B,) each
            at_blank = at_blank | (~done & (holds | (after_newline & starts)))
            after_newline = ends
            done = done | at_blank
        if stops is not None:
            done = done | torch.isin(tok, stops)
        if stops is not None or blank_line is not None:
            if done.all():  # a CPU-GPU sync point, once per token; it lets a batch end early
                break
        if n == max_new_tokens - 1:
            break
        if compile:
            import compiled  # the optional piece (compiled.py), loaded only here

            if n == 0:
                cache = compiled.StaticKVCache(cache)
            # the slots written once this token is
            window = None if device.type == "cuda" or not compiled.CPU_WINDOW else P + n + 1
            logits = compiled.compiled_decode_step(device)(model, tok[:, None], next_pos, cache, window).clone()
            cache.slot += 1  # in place: a CUDA graph replays on the same tensor
        else:
            logits = decode_step(model, tok[:, None], next_pos, cache)
        next_pos = next_pos + 1
    finished = done if stops is not None or blank_line is not None else torch.zeros(B, dtype=torch.bool, device=device)
    L = n + 1
    all_tokens = torch.cat([tokens[:, :P], out[:, :L]], dim=1)
    prompt_mask = torch.cat([valid[:, :P], torch.zeros(B, L, dtype=torch.bool, device=device)], dim=1)
    gen_mask = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=device), out_mask[:, :L]], dim=1)
    lp = None
    if return_logprobs:
        lp = torch.cat([torch.zeros(B, P, device=device), out_lp[:, :L]], dim=1)
    return Samples(all_tokens, prompt_mask, gen_mask, finished, lp, at_blank if blank_line is not None else None)


def sampling_copy(model):
    """
    The model to sample from: on a GPU a bf16 copy of fp32 weights (half the bytes read per
    decoded token; the rotary table is cast too, as transformers does), else the model itself.
    Training keeps the fp32 weights and uses autocast.
    """
    w = model.lm_head.weight
    if w.device.type != "cuda" or w.dtype == torch.bfloat16:
        return model
    return cached_copy(model, torch.bfloat16)


_COPIES = weakref.WeakKeyDictionary()  # model -> (its parameters' versions, its copy)


def cached_copy(model, dtype):
    """
    A copy of model in dtype, made once and reused until a parameter of model changes in place
    (its tensor version counter moves, as an optimizer step does) or model is freed; evaluate
    samples twice from one model, and only one copy per model is kept.
    """
    version = tuple(p._version for p in model.parameters())
    hit = _COPIES.get(model)
    if hit is not None and hit[0] == version:
        return hit[1]
    _COPIES.pop(model, None)  # the stale copy goes before the new one is made
    import copy

    out = copy.deepcopy(model).to(dtype=dtype).eval()  # on the GPU: no CPU round trip
    _COPIES[model] = (version, out)
    return out


def decode_step(model, tok, pos, cache):
    """One token per row through the cache: (B, 1) ids at (B, 1) positions -> (B, V) logits."""
    with autocast(pos.device):
        return model.lm_head(model.hidden(tok, pos=pos, cache=cache)[:, -1])


# -----------------------------------------------------------------------------
# log-probs and the DPO loss


def sequence_logprobs(model, x, y):
    """
    Summed (not averaged) log-probs of the target tokens of each row: x, y (B, T) as from
    data.collate, y = -1 where a token is not scored (prompt, padding). Returns (B,).
    """
    _, loss = model(x, targets=y)
    return -(loss * (y != -1)).sum(dim=1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """
    The DPO loss (Rafailov et al. 2023, eq. 7) from per-sequence summed log-probs, each (B,):

        L = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

    y_w is the chosen (preferred) response, y_l the rejected one. Returns the mean loss and
    detached diagnostics (tensors, so nothing syncs with the GPU here): the implicit rewards
    beta * (log pi - log ref) of each side and the fraction of pairs the policy already ranks right.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    metrics = {
        "chosen_reward": chosen_reward.detach().mean(),
        "rejected_reward": rejected_reward.detach().mean(),
        "reward_acc": (chosen_reward > rejected_reward).float().mean(),
    }
    return losses.mean(), metrics


def dpo_sft_loss(model, x, y, ref_logprobs, beta, sft_weight=0.0, pair_scale=1.0, token_scale=1.0):
    """
    DPO plus an optional SFT term on the chosen side, on one forward of a batch of pairs:

        L = dpo_loss(...) + sft_weight * (- sum of chosen-token log-probs / number of chosen tokens)

    x, y: (2n, T) from data.collate, rows 0..n-1 the chosen and n..2n-1 the rejected side of
    the same n pairs; ref_logprobs: (n, 2) the frozen reference's summed log-probs (chosen,
    rejected). The SFT term is the mean token NLL of the chosen completions. pair_scale and
    token_scale multiply the two means: a process holding part of a batch weighs its part by
    its share of the pairs and of the chosen tokens (times the number of processes).
    """
    n = x.size(0) // 2
    lp = sequence_logprobs(model, x, y)  # (2n,)
    loss, metrics = dpo_loss(lp[:n], lp[n:], ref_logprobs[:, 0], ref_logprobs[:, 1], beta)
    loss = loss * pair_scale
    if sft_weight:
        loss = loss + sft_weight * token_scale * -lp[:n].sum() / (y[:n] != -1).sum()
    return loss, metrics


# -----------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    warmup: int = 20  # linear warmup steps, then cosine decay
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max grad norm (0 = off)
    compile: bool = False  # torch.compile the model for training
    parallel: str = ""  # under torchrun: "ddp" averages gradients over ranks; "fsdp": the model is FSDP2-sharded


def get_lr(step, cfg):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * coeff)


def lm_loss(model, batch):
    """Mean cross-entropy over scored tokens (y != -1): the SFT loss. batch = (x, y) from data.collate, or (x, y, pos,
    mask) from data.pack."""
    x, y, pos, mask = batch if len(batch) == 4 else (*batch, None, None)
    _, loss = model(x, targets=y, pos=pos, mask=mask)
    n = (y != -1).sum().clamp(min=1)
    return loss.sum() / n, {}


def train(model, get_batch, cfg, loss_fn=lm_loss, params=None, desc="train", log_every=0, on_step=None):
    """
    The one fine-tuning loop. get_batch(step, micro) -> a batch for loss_fn(model, batch) ->
    (loss, metrics), both tensors. params: what to optimize (default: all of the model's).
    on_step(step): called after each optimizer update (every process calls it).
    Returns the per-step losses as a list of floats. Losses and metrics stay on the device
    until a step is logged (every log_every steps, and the last), where .item() is the one
    CPU-GPU sync; the losses are fetched once at the end.
    Several processes (cfg.parallel): each one's get_batch returns its part of the step's
    batch with a loss already weighted so that the mean over processes is the whole batch's
    loss; "ddp": gradients are averaged over processes before the update (the arithmetic of
    DistributedDataParallel, written out so that any forward path works, as Quiet-STaR's);
    "fsdp": FSDP2 reduces them itself. The returned losses are the whole batch's.
    """
    from tqdm import tqdm

    device = model.lm_head.weight.device
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    # weight decay 0: these are short fine-tunes from a good start, not pretraining
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay}], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0, fused=device.type == "cuda" and cfg.parallel != "fsdp")
    fwd = torch.compile(model) if cfg.compile else model
    model.train()
    losses = []
    every = log_every or max(1, cfg.steps // 20)  # progress bar refresh; printed lines only with log_every
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, disable=None if cfg.steps >= 10 else True, mininterval=1.0)
    for step in bar:
        lr = get_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = get_batch(step, micro)
            with autocast(device):
                loss, metrics = loss_fn(fwd, batch)
            (loss / cfg.grad_accum).backward()
            total += loss.detach()
        if cfg.parallel == "ddp":
            _all_reduce_mean([p.grad for p in decay + no_decay if p.grad is not None])
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(decay + no_decay, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / cfg.grad_accum)
        if on_step is not None:
            on_step(step)
        if step % every == 0 or step == cfg.steps - 1:
            loss_value = losses[-1].item()  # the one sync, on logged steps only
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}")
            if log_every:
                extra = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items())
                print(f"{desc} step {step}/{cfg.steps} loss {loss_value:.4f} {extra}")
    model.eval()
    if not losses:
        return []
    losses = torch.stack(losses)
    if cfg.parallel:
        _all_reduce_mean([losses])
    return losses.tolist()


def _all_reduce_mean(tensors):
    """Every process's tensors replaced, in place, by their mean over processes (SUM, then divide: gloo has no AVG)."""
    import torch.distributed as dist

    for work in [dist.all_reduce(t, async_op=True) for t in tensors]:
        work.wait()
    torch._foreach_mul_(tensors, 1.0 / dist.get_world_size())


# -----------------------------------------------------------------------------
# checkpoints


def atomic_save(obj, path):
    """torch.save to a temp file, then os.replace: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path, model, **extra):
    """
    Weights + the config they belong to (as a plain dict) + any extra plain data. A LoRA model
    saves its adapters and where its frozen base comes from: megabytes, not the whole model.
    """
    state, lora = model.state_dict(), getattr(model, "lora", None)
    if lora:
        state = {k: v for k, v in state.items() if ".lora_" in k}
    atomic_save({"config": asdict(model.config), "model": state, "extra": extra, **({"lora": lora} if lora else {})},
                path)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or not one this code can load."""


def _read_checkpoint(path, device, mmap=False):
    """The checkpoint dict and its GPTConfig; mmap=True maps the file instead of reading the weights."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
        return ckpt, GPTConfig(**ckpt["config"])
    except Exception as e:  # a truncated zip, a pickle we refuse, missing keys...
        raise CheckpointError(f"could not load checkpoint {path}: it is corrupt or not a nanostar "
                              f"checkpoint ({e})") from e


def checkpoint_config(path):
    """(config, extra) of a checkpoint without reading its weights: what start-up needs to know before loading."""
    ckpt, config = _read_checkpoint(path, "cpu", mmap=True)
    return config, ckpt.get("extra", {})


def load_checkpoint(path, device="cpu"):
    """Rebuild the model from a checkpoint. Returns (model, extra). Clear errors for bad files."""
    ckpt, config = _read_checkpoint(path, device)
    lora = ckpt.get("lora")
    if lora:  # the frozen base, then the saved adapters on it
        model = add_lora(load_base(lora["base"], device, config.block_size), lora["rank"], lora["alpha"],
                         lora["targets"], lora["base"])
    try:
        if not lora:
            model = GPT(config)
        model.load_state_dict(ckpt["model"], strict=not lora)
        if lora and set(ckpt["model"]) != {k for k in model.state_dict() if ".lora_" in k}:
            raise KeyError(f"adapters saved {sorted(ckpt['model'])[:4]}..., the model has other ones")
    except Exception as e:  # missing keys, wrong shapes...
        raise CheckpointError(f"could not load checkpoint {path}: it is corrupt or not a nanostar "
                              f"checkpoint ({e})") from e
    model.to(device).eval()
    return model, ckpt.get("extra", {})


def load_base(source, device="cpu", block_size=0):
    """A plain model from a nanostar checkpoint (adapters merged in) or a Hugging Face directory."""
    if os.path.isdir(source):
        import hf

        return hf.load_pretrained(source, device, block_size)
    return merge_lora(load_checkpoint(source, device)[0])
