"""
Speed, measured side by side in one run. Nothing here is a test: tests check correctness,
this file shows ratios.

    python bench.py                      # sampler: cached vs no-cache vs transformers' generate()
    python bench.py --sections sampler --full   # also the no-cache path at the larger shape
    python bench.py --dtype bf16                # the sampler with bf16 weights and cache on both sides
    python bench.py --sections rollouts         # stepdpo.py's shared-prefix rollouts vs recomputed prefixes
    python bench.py --sections thoughts         # quietstar.py's parallel thoughts vs a per-position loop; memory
    python bench.py --sections pretrained       # Qwen2.5-0.5B's shape: sampler vs generate(), training step (GPU: MFU)
    python bench.py --sections training         # SFT step of the default model: padded vs packed, eager vs torch.compile
    python bench.py --sections fewshot          # few-shot sampling: the blank-line stop in the sampler vs a text cut after
    python bench.py --sections memory           # GPU memory of a training step, full vs LoRA, 0.5B-8B (computed)

Sections:
- sampler: tokens/s of nanostar's KV-cached batched sampler against its own no-cache path,
  and against `LlamaForCausalLM.generate()` (random weights, same shapes, KV cache on)
  when `transformers` happens to be installed. Greedy, no early stop: every row makes
  exactly `new` tokens, so every path does the same work.
- rollouts: stepdpo.py's K rollouts per step prefix, with the prefix's KV cache shared by
  its K rollouts against the prefix recomputed for each.
- thoughts: Quiet-STaR's parallel thought generation against the per-position loop, and
  the activation memory of a training step as T and the thought length grow.
- pretrained: a model of Qwen2.5-0.5B's shape (random weights, 494M parameters, vocab
  151,936) loaded from a saved Hugging Face directory through hf.load_pretrained: the
  sampler at batch 1 and 16 against Qwen2ForCausalLM.generate(), and one full fine-tuning
  step (tokens/s, peak memory; on a GPU the model FLOP utilization, 6 x params x tokens).
- fewshot: sampling under a few-shot prompt, where a base model writes its answer, a blank
  line and then an exemplar of its own: decode steps and time with the row stopped inside
  the sampler at its first blank line, against sampling to the limit and cutting the text
  after (what nanostar did before), and a check that both give the same completions.
"""

import argparse
import time

import torch

import model
import quietstar
from loop import at_least
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# the slow references the fast paths are checked against (test_all.py) and timed against (here)


@torch.no_grad()
def generate_reference(gpt, prompts, max_new_tokens, *, temperature=1.0, top_k=None, stop_token=None, generator=None,
                       vocab_limit=None, keys=None):
    """
    The plain path: no cache, the whole sequence re-run for every new token (O(T^2) work).
    Same left padding and sampling as `generate`, so with the same seed it must give the same
    tokens; kept as the independent reference for tests and bench.py. Returns generated lists.
    """
    device = gpt.lm_head.weight.device
    stops, pad_id = model._stops(stop_token, device)
    tokens, valid, pos, P = model._left_pad(prompts, pad_id, max_new_tokens, device)
    model._check_length(gpt, P, max_new_tokens)
    B, L = tokens.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [[] for _ in range(B)]
    for n in range(max_new_tokens):
        T = P + n
        mask = ((valid[:, None, :T] & causal[:T, :T]) | eye[:T, :T])[:, None]  # (B, 1, T, T)
        with model.autocast(device):
            logits, _ = gpt(tokens[:, :T], pos=pos[:, :T], mask=mask)
        logits = model._limit(logits[:, -1], vocab_limit)
        tok = model.sample_next_token(logits, generator, temperature, top_k, keys, n).masked_fill(done, pad_id)
        tokens[:, T] = tok
        valid[:, T] = True
        pos[:, T] = pos[:, T - 1] + 1
        for i in range(B):
            if not done[i]:
                out[i].append(tok[i].item())
        if stops is not None:
            done = done | torch.isin(tok, stops)
            if done.all():
                break
    return [o[:-1] if (stops is not None and o and o[-1] in stops.tolist()) else o for o in out]


# -----------------------------------------------------------------------------
# quietstar.py's thoughts the slow way: one position and one row at a time, full forwards


@torch.no_grad()
def think_reference(gpt, head, x, args, tok, noise):
    """The same thoughts and mixed logits as `think`, one position and one row at a time, full forwards."""
    B, T = x.shape
    N, L, K = args.n_thoughts, args.thought_len, args.n_talk
    quietstar.check_context(gpt, T, args)
    xr = x.repeat_interleave(N, dim=0)
    R = xr.size(0)
    V = gpt.config.vocab_size
    thoughts = torch.zeros(R, T, L, dtype=torch.long)
    talk = torch.zeros(R, T, K, V)
    base_h = gpt.hidden(xr)
    for r in range(R):
        for t in range(T):
            seq = xr[r, : t + 1].tolist() + [tok.start_thought]
            for j in range(L):
                pos = torch.tensor([list(range(len(seq)))])  # a thought continues its position's text
                logits = gpt(torch.tensor([seq]), pos=pos)[0][0, -1].float()
                z = int((logits / args.thought_temperature + noise[r, j, t]).argmax())
                thoughts[r, t, j] = z
                seq.append(z)
            seq.append(tok.end_thought)
            h_b, h_th = [], []
            for k in range(1, K + 1):
                pos = torch.tensor([list(range(len(seq)))])
                h_th.append(gpt.hidden(torch.tensor([seq]), pos=pos)[0, -1])
                h_b.append(base_h[r, min(t + k - 1, T - 1)])
                seq.append(int(xr[r, t + k]) if t + k < T else tok.eot)
            talk[r, t] = head.mix(gpt.lm_head, torch.stack(h_b), torch.stack(h_th), xr[r, t])[0]  # (K, V)
    return thoughts, talk


# -----------------------------------------------------------------------------


def timeit(fn, repeat):
    """Best wall time of `repeat` runs after one warm-up run (best-of hides other processes' noise)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def hf_llama(cfg):
    """The same model shape as a transformers LlamaForCausalLM, or None if transformers is missing."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(hf_cfg).eval()


def hf_compile_config():
    """transformers compiles generate()'s forward with a static cache only on accelerators unless told to on every device."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True)
    cc._compile_all_devices = True  # a private switch (transformers 5.x): without it the CPU runs the static cache eagerly
    return cc


def bench_sampler(args):
    shapes = [
        ("4L x 256 wide, 4 heads, vocab 512", dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, vocab_size=512)),
        ("8L x 512 wide, 8 heads (2 kv), vocab 512", dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=2, vocab_size=512)),
    ]
    P, N = args.prompt_len, args.new_tokens
    print(f"sampler: {P} prompt + {N} new tokens, greedy, {args.dtype}, tokens/s = batch * {N} / best of {args.repeat} runs")
    print(f"{'shape':42s} {'batch':>5s} {'nanostar':>10s}" + (f" {'compiled':>10s}" if args.compiled else "")
          + f" {'no-cache':>10s} {'HF generate':>12s}" + (f" {'HF static+compile':>18s}" if args.compiled else "")
          + f" {'vs no-cache':>12s} {'vs HF':>7s}" + (f" {'compiled vs HF':>15s} {'compiled vs HF compiled':>24s}" if args.compiled else ""))
    for si, (name, kw) in enumerate(shapes):
        cfg = GPTConfig(block_size=P + N, **kw)
        torch.manual_seed(0)
        m = GPT(cfg).eval()
        hf = hf_llama(cfg) if not args.no_hf else None
        if args.dtype == "bf16":  # both sides in bf16: weights, activations and KV cache
            m = model.cached_copy(m, torch.bfloat16)
            hf = hf.to(torch.bfloat16) if hf is not None else None
        for B in args.batches:
            prompts = torch.randint(3, cfg.vocab_size, (B, P))
            plist = prompts.tolist()
            ours = timeit(lambda: model.generate(m, plist, N, temperature=0.0), args.repeat)
            tps = lambda sec: B * N / sec
            row = f"{name:42s} {B:5d} {tps(ours):10.0f}"
            if args.compiled:
                comp = timeit(lambda: model.generate(m, plist, N, temperature=0.0, compile=True), args.repeat)
                row += f" {tps(comp):10.0f}"
            if si == 0 or args.full:
                ref = timeit(lambda: generate_reference(m, plist, N, temperature=0.0), 1 if B > 1 else args.repeat)
                row += f" {tps(ref):10.0f}"
            else:
                ref = None
                row += f" {'-':>10s}"
            hft = hfc = None
            if hf is not None:
                def run_hf(**kw):
                    with torch.no_grad():
                        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=N, min_new_tokens=N,
                                    do_sample=False, use_cache=True, pad_token_id=0, **kw)
                hft = timeit(run_hf, args.repeat)
                row += f" {tps(hft):12.0f}"
                if args.compiled:  # transformers' strongest setting: a static cache and a compiled forward
                    hfc = timeit(lambda: run_hf(cache_implementation="static", compile_config=hf_compile_config()), args.repeat)
                    row += f" {tps(hfc):18.0f}"
            else:
                row += f" {'(absent)':>12s}" + (f" {'(absent)':>18s}" if args.compiled else "")
            row += f" {ref / ours:11.1f}x" if ref else f" {'-':>12s}"
            row += f" {hft / ours:6.1f}x" if hft else f" {'-':>7s}"
            if args.compiled:
                row += f" {hft / comp:14.1f}x" if hft else f" {'-':>15s}"
                row += f" {hfc / comp:23.1f}x" if hfc else f" {'-':>24s}"
            print(row, flush=True)
            if si == 0:
                roofline(m, B, P, N, ours / N, args.repeat, comp / N if args.compiled else None)


def roofline(m, B, P, N, step_time, repeat, compiled_step=None):
    """
    Where a decode step's time goes, from measurements at its own shapes: every matmul of the
    step timed alone at B rows (its GFLOP/s is the rate this CPU gives for these shapes), and
    the attention's reads of the KV cache timed against this CPU's measured read bandwidth.
    """
    import torch.nn.functional as F

    cfg = m.config
    lins = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]  # q, k, v, o, gate, up, down per layer, lm_head
    dt = lins[0].dtype  # fp32, or bf16 with --dtype bf16: the cache is kept in the weights' dtype on a CPU
    x = {w.shape[1]: torch.randn(B, w.shape[1], dtype=dt) for w in lins}
    with torch.no_grad():
        mm = timeit(lambda: [F.linear(x[w.shape[1]], w) for w in lins], repeat * 10)
    flops = 2 * B * sum(w.numel() for w in lins)
    S = P + N // 2  # average keys attended per decode step
    kv_bytes = cfg.n_layer * 2 * B * cfg.n_kv_head * S * cfg.head_dim * lins[0].element_size()
    big = torch.randn(64 * 2**20 // 4)
    bw = big.numel() * 4 / timeit(lambda: big.sum(), repeat * 5)
    q = torch.randn(B, cfg.n_head, 1, cfg.head_dim, dtype=dt)
    # every layer's keys and values, separate tensors, read as generate reads them (views of a preallocated cache)
    k, v = (torch.randn(cfg.n_layer, B, cfg.n_kv_head, P + N, cfg.head_dim, dtype=dt)[:, :, :, :S] for _ in range(2))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    att = timeit(lambda: [F.scaled_dot_product_attention(q, k[i], v[i], attn_mask=mask) for i in range(cfg.n_layer)], repeat * 10)
    print(f"{'':42s}   decode step at batch {B}: {step_time * 1e3:.2f} ms = {flops / step_time / 1e9:.0f} GFLOP/s achieved; "
          f"its matmuls alone {mm * 1e3:.2f} ms ({flops / mm / 1e9:.0f} GFLOP/s at these shapes); attention {att * 1e3:.2f} ms "
          f"for {kv_bytes / 2**20:.1f} MiB of K/V ({kv_bytes / att / 1e9:.0f} GB/s, this CPU reads {bw / 1e9:.0f} GB/s); "
          f"step / (matmuls + attention) = {step_time / (mm + att):.2f}x"
          + (f"; compiled step {compiled_step * 1e3:.2f} ms = {compiled_step / (mm + att):.2f}x" if compiled_step else ""), flush=True)


def bench_training(args):
    """
    SFT speed of the default model (3 layers x 96, star.py's warm start) on arithmetic batches
    of 32 examples: padded to the longest (data.collate) and packed several to a row
    (data.pack, what loop.fine_tune uses), eager and with torch.compile (the --compile flag),
    each after its warm-up steps. The same examples either way, so scored tokens/s compare.
    """
    import random

    import data

    tok = data.Tokenizer()
    train, _ = data.arithmetic_task(2000, 10, 1, 5, 0)
    pairs = [data.encode_example(tok, e.question, data.completion(e.rationale, e.answer)) for e in train]
    rng = random.Random(0)
    examples = [rng.sample(pairs, 32) for _ in range(8)]
    layouts = {"padded": [data.collate(b, 256) for b in examples], "packed": [data.pack(b, 256) for b in examples]}
    scored = sum(len(c) for b in examples for _, c in b) / len(examples)
    size = {k: sum(b[0].numel() for b in v) / len(v) for k, v in layouts.items()}
    print(f"training: 3L x 96 model, batch 32 arithmetic examples, {scored:.0f} scored tokens per batch; "
          f"{size['padded']:.0f} token slots padded, {size['packed']:.0f} packed")
    times = {}
    for compile in (False, True):
        for layout, batches in layouts.items():
            torch.manual_seed(0)
            m = GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=4, n_embd=96))
            cfg = model.TrainConfig(steps=args.train_steps * 4, lr=1e-3, warmup=1, compile=compile)
            get = lambda step, micro: batches[step % len(batches)]
            t0 = time.perf_counter()
            model.train(m, get, cfg)  # warm-up (and compilation)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.train(m, get, cfg)
            dt = times[compile, layout] = (time.perf_counter() - t0) / cfg.steps
            print(f"  {'compiled' if compile else 'eager':8s} {layout}: {dt * 1e3:6.1f} ms/step, {scored / dt:8.0f} scored tokens/s, "
                  f"{times[False, 'padded'] / dt:.2f}x eager padded (first {cfg.steps} steps incl. warm-up/compile: {warm:.1f}s)",
                  flush=True)


def bench_rollouts(args):
    """
    stepdpo.py's Monte-Carlo rollouts: K continuations from each of many step prefixes. Shared:
    each prefix prefilled once and its KV cache repeated for its K rollouts (generate's
    num_samples); recomputed: the prefix repeated K times as separate prompts. Same seed, same
    samples (test_all.py checks it); only the prefill work differs.
    """
    cfg = GPTConfig(block_size=256, n_layer=4, n_embd=256, n_head=4, n_kv_head=4, vocab_size=512)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    n_prefix, K, new = args.prefixes, args.rollouts, args.rollout_tokens
    print(f"rollouts: {n_prefix} prefixes of 64..{args.prefix_len} tokens x {K} rollouts x {new} new tokens, "
          f"temperature 1, best of {args.repeat} runs")
    g = torch.Generator()
    lens = torch.randint(64, args.prefix_len + 1, (n_prefix,), generator=g.manual_seed(1)).tolist()
    prefixes = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    shared = timeit(lambda: model.generate(m, prefixes, new, temperature=1.0, generator=g.manual_seed(0), num_samples=K), args.repeat)
    repeated = [p for p in prefixes for _ in range(K)]
    recomputed = timeit(lambda: model.generate(m, repeated, new, temperature=1.0, generator=g.manual_seed(0)), args.repeat)
    n = n_prefix * K
    print(f"  shared prefix:     {n / shared:8.1f} rollouts/s ({shared:.2f} s)")
    print(f"  recomputed prefix: {n / recomputed:8.1f} rollouts/s ({recomputed:.2f} s)")
    print(f"  sharing saves {1 - shared / recomputed:.0%} of the time ({recomputed / shared:.2f}x)")


def bench_fewshot(args):
    """
    The base is the default 3 x 96 model trained here (--fewshot_steps) on arithmetic worked
    examples that run on into the next one after a blank line, as a pretrained LM's text does;
    then greedy sampling of 64 test questions under a 3-shot prompt, both ways.
    """
    import data
    import loop

    tok = data.Tokenizer()
    train, test = data.arithmetic_task(2000, 64, 1, 5, 0)
    shots, rest = train[:3], train[3:]
    text = lambda e: data.prompt(e.question) + data.completion(e.rationale, e.answer)
    pairs = [data.encode_example(tok, e.question, data.completion(e.rationale, e.answer) + data.EXEMPLAR_SEP + text(nxt),
                                 complete=False) for e, nxt in zip(rest, rest[1:])]
    config = GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=4, n_embd=96)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    m, loss = loop.fine_tune(GPT(config).state_dict(), config, pairs, steps=args.fewshot_steps, lr=1e-3, batch_size=32, seed=0,
                             device="cpu", desc="base LM")
    m.eval()
    prompts = [data.few_shot_prefix(shots) + data.prompt(e.question) for e in test]
    print(f"fewshot: base LM trained {args.fewshot_steps} steps on running exemplars (loss {loss:.3f}, "
          f"{time.perf_counter() - t0:.0f}s); {len(prompts)} questions, 3-shot prompt, greedy, at most {args.new_tokens} new tokens")
    steps, real = [0], model.decode_step
    def counted(*a):
        steps[0] += 1
        return real(*a)
    model.decode_step = counted
    run = lambda stop: loop.sample(m, tok, prompts, 1, temperature=0.0, max_new_tokens=args.new_tokens, batch_size=64, seed=0,
                                    stop_at_blank_line=stop)
    result = {}
    for stop in (False, True):
        steps[0] = 0
        outs = run(stop)
        n = steps[0]
        result[stop] = outs, n, timeit(lambda: run(stop), args.repeat)
    model.decode_step = real
    (full, n_full, t_full), (cut, n_cut, t_cut) = result[False], result[True]
    same = cut == [[(t.split(data.EXEMPLAR_SEP)[0], f or data.EXEMPLAR_SEP in t) for t, f in o] for o in full]
    done = sum(f for o in cut for _, f in o)
    print(f"  text cut after sampling:  {n_full:4d} decode steps, {t_full:.2f} s")
    print(f"  blank-line stop in sampler: {n_cut:4d} decode steps, {t_cut:.2f} s ({n_full / max(1, n_cut):.2f}x fewer steps, "
          f"{t_full / t_cut:.2f}x faster); {done} of {len(cut)} completions ended by themselves; same completions: {same}")


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward during fn(): a training step's activation memory."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def bench_thoughts(args):
    """
    quietstar.py: thoughts for all T positions generated in parallel (one forward per thought
    token through the diagonal mask) against the per-position reference loop that makes the
    same thoughts (the test suite checks they match), and the activation memory of one
    training step as T and the thought length grow.
    """
    from data import Tokenizer

    tok = Tokenizer()
    T, L, K, N = args.thought_T, 4, 4, 2
    qargs = quietstar.get_args(["--n_thoughts", str(N), "--thought_len", str(L), "--n_talk", str(K), "--device", "cpu"])
    cfg = GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=3, n_embd=96, n_head=4, n_kv_head=4)
    torch.manual_seed(0)
    m, head = GPT(cfg).eval(), quietstar.MixingHead(cfg.n_embd)
    x = torch.randint(0, 256, (1, T))
    noise = quietstar.gumbel((N, L, T, cfg.vocab_size), torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        par = timeit(lambda: quietstar.think(m, head, x, qargs, tok, noise), args.repeat)
    ref = timeit(lambda: think_reference(m, head, x, qargs, tok, noise), 1)
    print(f"thoughts: T={T}, {N} thoughts x {L} tokens, {K} lookahead, 3L x 96 model, batch 1")
    print(f"  parallel (diagonal mask, KV cache): {par * 1e3:8.1f} ms")
    print(f"  per-position reference loop:        {ref * 1e3:8.1f} ms   ({ref / par:.0f}x slower)")
    print("activation memory of one Quiet-STaR training step (tensors saved for backward), batch 4:")
    print(f"  {'T':>5s} " + " ".join(f"{'L=' + str(l):>9s}" for l in (2, 4, 8)) + f" {'no thoughts':>12s}")
    for t in (32, 64, 128):
        row = []
        xb = torch.randint(0, 256, (4, t))
        for l in (2, 4, 8):
            qa = quietstar.get_args(["--n_thoughts", str(N), "--thought_len", str(l), "--n_talk", str(K), "--device", "cpu"])
            nz = quietstar.gumbel((4 * N, l, t, cfg.vocab_size), torch.Generator().manual_seed(0), "cpu")
            row.append(saved_bytes(lambda: quietstar.quietstar_loss(m, head, xb, qa, tok, nz)[0]))
        plain = saved_bytes(lambda: m(xb)[0].sum())
        print(f"  {t:5d} " + " ".join(f"{b / 2**20:7.1f}MB" for b in row) + f" {plain / 2**20:10.1f}MB")


def bench_pretrained(args):
    import tempfile

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hf import load_pretrained

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    hf_cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        t0 = time.perf_counter()
        m = load_pretrained(d, dev, block_size=1024)
        print(f"pretrained: Qwen2.5-0.5B shape, {m.num_params():,} parameters, loaded in {time.perf_counter() - t0:.1f}s on {dev}"
              + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""))
    P, N = args.prompt_len, args.new_tokens if dev == "cuda" else min(args.new_tokens, 16)
    wdtype = torch.bfloat16 if dev == "cuda" else torch.float32
    hf = hf.to(dev, wdtype)
    fast = m if dev == "cpu" else model.GPT(m.config).to(dev, torch.bfloat16).eval()
    if dev == "cuda":
        fast.load_state_dict(m.state_dict())
    bytes_per_token = sum(p.numel() * p.element_size() for p in fast.parameters())
    print(f"  sampler: {P} prompt + {N} new tokens, greedy, weights {str(wdtype).split('.')[-1]}; best of {args.repeat}")
    for B in (1, 16):
        prompts = torch.randint(0, 151000, (B, P)).tolist()
        timed = lambda fn: (sync(), timeit(lambda: (fn(), sync()), args.repeat))[1]
        ours = timed(lambda: model.generate(fast, prompts, N, temperature=0.0))
        comp = timed(lambda: model.generate(fast, prompts, N, temperature=0.0, compile=True)) if args.compiled else None
        ids = torch.tensor(prompts, device=dev)
        with torch.no_grad():
            theirs = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                                               do_sample=False, pad_token_id=0))
        line = f"  batch {B:3d}: nanostar {B * N / ours:8.0f} tok/s | HF generate() {B * N / theirs:8.0f} tok/s | {theirs / ours:.2f}x"
        if comp:
            line += f" | compiled {B * N / comp:8.0f} tok/s ({theirs / comp:.2f}x HF)"
            ours = comp
        if dev == "cuda" and B == 1:
            bw = 3.35e12 if "H100" in torch.cuda.get_device_name() else 4.8e12  # HBM3 / HBM3e peak, bytes/s
            line += f" | weights read {bytes_per_token / 1e9:.2f} GB/token: {bytes_per_token * N / ours / 1e9:.0f} GB/s, {bytes_per_token * N / ours / bw:.0%} of HBM peak"
        print(line)
    del hf, fast
    # one full fine-tuning step: fp32 weights and AdamW state, bf16 autocast on the GPU
    B, T = (8, 512) if dev == "cuda" else (1, 64)
    x = torch.randint(0, 151000, (B, T), device=dev)
    batch = (x, x.roll(-1, 1))
    cfg = model.TrainConfig(steps=args.train_steps, lr=1e-5, warmup=1)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train(m, lambda s, mi: batch, cfg)  # warm-up (allocator, kernels)
    sync()
    t0 = time.perf_counter()
    model.train(m, lambda s, mi: batch, cfg)
    sync()
    dt = (time.perf_counter() - t0) / args.train_steps
    n = m.num_params()
    line = f"  train step: batch {B} x {T} tokens, {B * T / dt:,.0f} tok/s ({dt * 1e3:.0f} ms/step)"
    if dev == "cuda":
        peak = 989e12  # dense bf16 of an H100 or H200 SXM
        line += f", MFU {6 * n * B * T / dt / peak:.1%} (6 x params x tokens, attention not counted), " \
                f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(line)


# shapes from the models' config.json files (hidden, layers, heads, key/value heads, MLP width, vocab, tied head)
MEMORY_MODELS = {
    "Qwen2.5-0.5B": dict(n_embd=896, n_layer=24, n_head=14, n_kv_head=2, intermediate_size=4864, vocab_size=151936,
                         qkv_bias=True, tie_embeddings=True),
    "Qwen2.5-1.5B": dict(n_embd=1536, n_layer=28, n_head=12, n_kv_head=2, intermediate_size=8960, vocab_size=151936,
                         qkv_bias=True, tie_embeddings=True),
    "Qwen2.5-7B": dict(n_embd=3584, n_layer=28, n_head=28, n_kv_head=4, intermediate_size=18944, vocab_size=152064,
                       qkv_bias=True, tie_embeddings=False),
    "Llama-3.1-8B": dict(n_embd=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, vocab_size=128256,
                         tie_embeddings=False),
}


def block_activation_bytes(cfg, lora_rank, T=64):
    """
    Bytes per token that autograd saves for backward in one transformer block, bf16, measured on
    the CPU on one block: tensors counted once (by storage), weights not counted; the slope
    between T and 2T tokens, as the bf16 copies of the adapters do not grow with tokens.
    """
    block = model.Block(cfg).to(torch.bfloat16)
    if lora_rank:
        block.requires_grad_(False)
        for part in (block.self_attn, block.mlp):
            for name, layer in list(part.named_children()):
                if name in model.LORA_TARGETS:
                    setattr(part, name, model.LoRALinear(layer, lora_rank, 2 * lora_rank))
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def saved(T):
        angles = torch.outer(torch.arange(T).float(), model.rope_frequencies(cfg))
        cos, sin = [f(torch.cat((angles, angles), -1))[None, None].to(torch.bfloat16) for f in (torch.cos, torch.sin)]
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(1, T, cfg.n_embd, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, cos, sin, None).float().sum()
        return sum(seen.values())

    return (saved(2 * T) - saved(T)) / T


def bench_memory(args):
    """
    GPU memory of one training step, full fine-tune against LoRA, computed: weights, gradients
    and AdamW state from the parameter counts; activations per token from one block measured
    here (block_activation_bytes), times layers and tokens, plus the LM head's chunk.
    """
    rank, rows, T = args.lora_rank, 8, 1024  # 8 x 1,024 tokens: about the default --batch_size 32 of GSM8K, packed
    gib = lambda b: f"{b / 2**30:.1f}"
    print(f"memory of one training step at {rows} x {T} tokens, GiB (computed): full fine-tune (fp32 weights, "
          f"bf16 autocast) | LoRA r={rank} on {', '.join(model.LORA_TARGETS)} (bf16 frozen base)")
    print("| model | params | full: weights + grads + AdamW | full: activations | full: total | LoRA: adapters | "
          "LoRA: base + adapters + grads + AdamW | LoRA: activations | LoRA: total |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, shape in MEMORY_MODELS.items():
        cfg = model.GPTConfig(block_size=T, **shape)
        with torch.device("meta"):
            n = model.GPT(cfg).num_params()
        per_proj = {"q_proj": (cfg.n_embd, cfg.n_head * cfg.head_dim), "k_proj": (cfg.n_embd, cfg.n_kv_head * cfg.head_dim),
                    "v_proj": (cfg.n_embd, cfg.n_kv_head * cfg.head_dim), "o_proj": (cfg.n_head * cfg.head_dim, cfg.n_embd),
                    "gate_proj": (cfg.n_embd, cfg.intermediate_size), "up_proj": (cfg.n_embd, cfg.intermediate_size),
                    "down_proj": (cfg.intermediate_size, cfg.n_embd)}
        adapters = cfg.n_layer * sum(rank * (i + o) for i, o in per_proj.values())
        tokens = rows * T
        head = 2 * 4 * min(rows * T * cfg.vocab_size, model.LOGITS_CHUNK)  # one chunk's fp32 logits and their gradient
        act_full = cfg.n_layer * tokens * block_activation_bytes(cfg, 0) + head
        act_lora = cfg.n_layer * tokens * block_activation_bytes(cfg, rank) + head
        full_state, lora_state = 16 * n, 2 * n + 16 * adapters
        print(f"| {name} | {n / 1e9:.2f}B | {gib(full_state)} | {gib(act_full)} | {gib(full_state + act_full)} | "
              f"{adapters / 1e6:.1f}M | {gib(lora_state)} | {gib(act_lora)} | {gib(lora_state + act_lora)} |")


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["sampler"], choices=["sampler", "rollouts", "thoughts", "pretrained", "training", "fewshot", "memory"], help="what to time (memory: computed)")
    parser.add_argument("--train_steps", type=at_least(1), default=3, help="pretrained: timed training steps")
    parser.add_argument("--compiled", action="store_true", help="sampler, pretrained: also time generate(compile=True), and transformers' generate() with a static cache and compile")
    parser.add_argument("--batches", type=at_least(1), nargs="+", default=[1, 64], help="sampler batch sizes")
    parser.add_argument("--prompt_len", type=at_least(1), default=32, help="sampler prompt length")
    parser.add_argument("--new_tokens", type=at_least(1), default=128, help="sampler tokens generated per row")
    parser.add_argument("--repeat", type=at_least(1), default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="sampler: the weights' and KV cache's dtype, "
                        "both sides (nanostar samples in fp32 on a CPU, bf16 on a GPU)")
    parser.add_argument("--full", action="store_true", help="also time the slow no-cache path at the larger shape")
    parser.add_argument("--no_hf", action="store_true", help="skip transformers even when it is installed")
    parser.add_argument("--prefixes", type=at_least(1), default=32, help="rollouts: step prefixes")
    parser.add_argument("--prefix_len", type=at_least(64), default=160, help="rollouts: longest prefix (shortest is 64)")
    parser.add_argument("--rollouts", type=at_least(1), default=8, help="rollouts: K per prefix")
    parser.add_argument("--rollout_tokens", type=at_least(1), default=32, help="rollouts: new tokens per rollout")
    parser.add_argument("--thought_T", type=at_least(1), default=128, help="thoughts: sequence length")
    parser.add_argument("--fewshot_steps", type=at_least(1), default=600, help="fewshot: training steps of its base LM")
    parser.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--lora_rank", type=at_least(1), default=16, help="memory: the LoRA rank")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "sampler" in args.sections:
        bench_sampler(args)
    if "rollouts" in args.sections:
        bench_rollouts(args)
    if "thoughts" in args.sections:
        bench_thoughts(args)
    if "pretrained" in args.sections:
        bench_pretrained(args)
    if "training" in args.sections:
        bench_training(args)
    if "fewshot" in args.sections:
        bench_fewshot(args)
    if "memory" in args.sections:
        bench_memory(args)
