"""
STaR: the Self-Taught Reasoner (Zelikman et al. 2022), with RFT (Yuan et al. 2023) and
V-STaR (Hosseini et al. 2024) as modes. The model learns to reason from its own samples:

    0. the base model. From scratch (the arithmetic default): a warm start, a short fine-tune on
       --n_seed worked examples (plain and with the hint). Pretrained (--init, the gsm8k
       default): the pretrained weights, prompted with --few_shot worked examples.
    1. generate: sample a rationale for every training question; keep the ones whose answer is right
    2. rationalize: for each failure, sample again with the right answer as a hint; keep the
       rationales that reach it without leaning on the hint too much (--max_hint_gain), stored
       *without* the hint
    3. fine-tune from the base weights (not the last iteration's) on the kept rationales (plus
       the seed examples when they are not in the prompt), with a step budget that grows each iteration
    4. evaluate on the validation split (--n_val training questions never trained on) and the
       test set; repeat until validation accuracy stops improving or --iters

Which prompt each phase uses:
- from scratch: generation and evaluation "Q: <question>\nA:\n"; rationalization adds
  "Hint: the answer is <answer>\n" before "A:"; the model learned both in its warm start.
- pretrained: the same, each after a few-shot prefix of --few_shot seed examples in the
  solution format (hinted exemplars before a hinted prompt, as STaR's rationalization prompt);
  a completion ends at the end token or at the blank line that ends an exemplar. Fine-tuning
  data carries no prefix: (question, rationale, answer), as in the paper.

Run it:

    python star.py                                          # built-in arithmetic task, CPU
    python star.py --dataset word_problems                  # built-in multi-step word problems, several paths each
    python star.py --no_rationalize                         # STaR without rationalization
    python star.py --samples 8 --temperature 0.7            # RFT: K samples, distinct correct paths kept
    python star.py --verifier --eval_samples 16             # V-STaR: a DPO verifier ranks N samples
    python star.py --answer_only                            # baseline: gold answers, no rationale
    python star.py --dataset gsm8k                          # Qwen2.5-0.5B from the hub, one GPU
    python star.py --dataset gsm8k --init DIR --data_dir ../shared/data/gsm8k   # offline
    python star.py --out_dir out/star --resume              # continue a killed run (add --iters N to go further)
    torchrun --standalone --nproc_per_node 8 star.py --dataset gsm8k   # 8 GPUs (add --fsdp to shard the model)

How this departs from the papers:
- From scratch, the few-shot prompt of STaR is replaced by the warm start (a tiny model
  cannot follow a prompt it was never trained on).
- Rationalization uses a hint line in the prompt ("Hint: the answer is N"), and a rationalized
  rationale is kept only if the hint raised its log-prob by at most --max_hint_gain nats per
  token (default 0.2; inf keeps every one, as the paper). On the arithmetic task a model can
  copy the answer's digits from the hint into steps whose carries are wrong; such rationales
  reach the right answer, and trained on they stalled runs (docs/record.md, "the copy trap").
- RFT de-duplicates by the sequence of equations (GSM8K's <<..>> annotations, else the step
  lines) and, among duplicates, keeps the one farthest in edit distance from those kept.
- V-STaR's verifier starts from the generator after its last fine-tune (the paper's SFT
  model) and is trained with DPO on the correct-over-incorrect pairs of every iteration's
  samples; its score is the DPO implicit reward beta * (log p_verifier(y|x) - log p_generator(y|x)),
  summed over the completion's tokens. Best-of-N is also reported under the other SCORES
  (the verifier's own log-prob; the generator's, which needs no verifier), on the validation
  split and the test set, so that a score is chosen on validation.
"""

import argparse
import os
import random
import time

import torch

import data
import loop
import model

# -----------------------------------------------------------------------------
# arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loop.add_task_args(p)
    loop.add_model_args(p)
    loop.add_warm_start_args(p)
    g = p.add_argument_group("STaR")
    g.add_argument("--iters", type=loop.at_least(0), default=8,
                   help="most STaR iterations (--patience may stop a run before)")
    g.add_argument("--patience", type=loop.at_least(1), default=2,
                   help="stop after this many iterations without a better validation accuracy")
    g.add_argument("--n_val", type=loop.at_least(1), default=200,
                   help="training questions held out as the validation split (never trained "
                   "on): it decides when to stop, and settings are chosen on it, never on the test set")
    g.add_argument("--steps", type=loop.at_least(0), default=400, help="fine-tuning steps of the first iteration")
    g.add_argument("--step_growth", type=loop.more_than(0), default=1.2,
                   help="the step budget is multiplied by this each iteration")
    g.add_argument("--no_rationalize", action="store_true", help="ablation: do not rationalize failed questions")
    g.add_argument("--max_hint_gain", type=float, default=0.2,
                   help="keep a rationalized rationale only if the hint raised its "
                   "log-prob by at most this many nats per token (log p(r|q, hint) - log p(r|q)); inf keeps all, "
                   "as the paper")
    g.add_argument("--answer_only", action="store_true",
                   help="baseline: fine-tune on gold answers of all questions, no rationales")
    g.add_argument("--samples", type=loop.at_least(1), default=1, help="rationales sampled per question (RFT when > 1)")
    g.add_argument("--temperature", type=loop.at_least(0.0, float), default=0.0,
                   help="sampling temperature for generation (0 = greedy)")
    g.add_argument("--top_k", type=loop.at_least(1), default=None, help="sample only from the k most likely tokens")
    g = p.add_argument_group("evaluation and V-STaR")
    g.add_argument("--eval_samples", type=loop.at_least(0), default=0,
                   help="also sample N solutions per test question: maj@N, pass@N")
    g.add_argument("--eval_temperature", type=loop.at_least(0.0, float), default=0.7,
                   help="temperature of those N samples")
    g.add_argument("--verifier", action="store_true",
                   help="V-STaR: train a DPO verifier on all samples, rank N test samples")
    g.add_argument("--verifier_steps", type=loop.at_least(0), default=300, help="DPO steps of the verifier")
    g.add_argument("--verifier_lr", type=loop.more_than(0), default=None,
                   help="learning rate of the verifier's DPO and of the ORM; None: --lr / 3")
    g.add_argument("--orm_steps", type=loop.at_least(0), default=0,
                   help="also train an outcome reward model for this many steps (the paper's "
                   "ORM baseline: the generator with a linear head, binary cross-entropy on right/wrong samples; "
                   "score 'orm')")
    g.add_argument("--verifier_pairs", type=loop.at_least(1), default=4,
                   help="most (correct, incorrect) pairs per question")
    g.add_argument("--beta", type=loop.more_than(0), default=0.1, help="DPO beta of the verifier")
    g.add_argument("--verifier_score", choices=[*SCORES, "orm"], default="reward",
                   help="how the verifier ranks the N samples "
                   "(best-of-N is reported under every score, on validation and test; this one is printed first)")
    loop.add_run_args(p, "out/star", scratch_lr=1e-3)
    args = p.parse_args(argv)
    if args.samples > 1 and args.temperature == 0:
        p.error("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    if args.verifier_score == "orm" and args.orm_steps <= 0:
        p.error("--verifier_score orm needs an ORM: pass --orm_steps N")
    if args.verifier and args.eval_samples < 2:
        args.eval_samples = 16
    return args


# -----------------------------------------------------------------------------
# sampling, filtering, de-duplication


def collect(gpt, tok, questions, args, it, shots=()):
    """
    One generation round: sample, filter, de-duplicate, rationalize. Returns (kept rows,
    all sample rows for the verifier, stats). A kept row is a training example, never with a hint.
    shots: the few-shot exemplars put before every prompt (hinted ones for rationalization).
    """
    base_seed = args.seed * 1000 + it * 10
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch, top_k=args.top_k,
               stop_at_blank_line=bool(shots), compile=args.compile_sampler)
    prefix, hint_prefix = data.few_shot_prefix(shots), data.few_shot_prefix(shots, hint=True)
    t0 = time.time()
    samples = loop.sample(gpt, tok, [prefix + data.prompt(e.question) for e in questions], args.samples,
                          temperature=args.temperature, seed=base_seed, desc=f"iter {it} generate", **gen)
    t_generate, t0 = time.time() - t0, time.time()
    kept, every, failed = [], [], []
    n_correct_samples = 0
    for qi, (e, outs) in enumerate(zip(questions, samples)):
        good = []
        for text, fin in outs:
            ok = data.sample_correct(text, fin, e.answer)
            every.append({"index": qi, "completion": text, "correct": ok})
            if ok:
                good.append(text)
        n_correct_samples += len(good)
        for text in data.dedup(good) if args.samples > 1 else good[:1]:
            kept.append({"index": qi, "question": e.question, "completion": text, "rationalized": False})
        if not good:
            failed.append(qi)
    n_rationalized = n_dropped = 0
    if failed and not args.no_rationalize:
        fq = [questions[i] for i in failed]
        hinted = loop.sample(gpt, tok, [hint_prefix + data.hint_prompt(e.question, e.answer) for e in fq], 1,
                             temperature=args.temperature, seed=base_seed + 1, desc=f"iter {it} rationalize", **gen)
        found = [(qi, e, outs[0][0]) for qi, e, outs in zip(failed, fq, hinted)
                 if data.sample_correct(*outs[0], e.answer)]
        filtered = args.max_hint_gain < float("inf")
        gains = hint_gain(gpt, tok, found, prefix, hint_prefix, args.gen_batch) if filtered else [None] * len(found)
        for (qi, e, text), gain in zip(found, gains):
            if not filtered or gain <= args.max_hint_gain:
                # stored without the hint: the model learns to reach the answer from the question alone
                kept.append({"index": qi, "question": e.question, "completion": text, "rationalized": True,
                             **({"hint_gain": gain} if filtered else {})})
                n_rationalized += 1
        n_dropped = len(found) - n_rationalized
    solved = len({r["index"] for r in kept if not r["rationalized"]})
    stats = {
        "questions": len(questions), "solved": solved, "solved_frac": solved / max(1, len(questions)),
        "rationalized": n_rationalized,
        "rationalized_dropped": n_dropped,
        "kept": len(kept), "correct_samples": n_correct_samples,
        "correct_per_question": n_correct_samples / max(1, len(questions)),
        "distinct_per_question": sum(not r["rationalized"] for r in kept) / max(1, len(questions)),
        "time_generate": t_generate, "time_rationalize": time.time() - t0,
    }
    return kept, every, stats


def hint_gain(gpt, tok, found, prefix, hint_prefix, batch_size):
    """
    How much each rationalized rationale leans on its hint: (log p(r | q, hint) - log p(r | q)) / tokens,
    under the model that wrote it. A rationale that copies the answer's digits from the hint
    into steps that do not compute them is likely with the hint and unlikely without it.
    found: (index, example, completion text) triples. Returns a float per triple.
    """
    if not found:
        return []
    free = [(tok.encode_prompt(prefix + data.prompt(e.question)), tok.encode(t) + [tok.eot]) for _, e, t in found]
    hinted = [(tok.encode_prompt(hint_prefix + data.hint_prompt(e.question, e.answer)), c)
              for (_, e, _), (_, c) in zip(found, free)]
    lp = loop.completion_logprobs(gpt, free + hinted, batch_size)
    n = len(found)
    return [(h - f) / max(1, k) for (f, k), (h, _) in zip(lp[:n], lp[n:])]


# -----------------------------------------------------------------------------
# V-STaR: a verifier trained with DPO on correct vs incorrect samples


# How a sample is ranked among the N, from v = log p_verifier(y|x), g = log p_generator(y|x)
# (summed over the completion's n tokens). "reward" is the paper's; the others are there to
# find out why it loses to majority voting here: "verifier" is the verifier's own likelihood,
# "generator" ranks by the generator's confidence and uses no verifier at all (a control).
SCORES = {
    "reward": lambda v, g, n, beta: beta * (v - g),  # the DPO implicit reward (V-STaR)
    "reward_per_token": lambda v, g, n, beta: beta * (v - g) / n,
    "verifier": lambda v, g, n, beta: v,
    "verifier_per_token": lambda v, g, n, beta: v / n,
    "generator_per_token": lambda v, g, n, beta: g / n,
}


def verifier_diagnosis(rows, beta):
    """
    Why the verifier ranks as it does, from saved samples (rows of verifier_val_samples.jsonl):
    over every (right, wrong) pair of samples of one question, how often each score in SCORES
    ranks the right one higher (a tie counts half, so a random choice scores 0.5), and how the
    reward follows completion length (Pearson r over all samples; mean length right and wrong).
    """
    wins, rewards, lengths, by_outcome = {k: [] for k in SCORES}, [], [], {True: [], False: []}
    for r in rows:
        terms = list(zip(r["logprob_verifier"], r["logprob_generator"], r["tokens"]))
        ok = [data.sample_correct(t, f, r["answer"]) for t, f in zip(r["samples"], r["finished"])]
        for (v, g, n), right in zip(terms, ok):
            rewards.append(SCORES["reward"](v, g, n, beta))
            lengths.append(n)
            by_outcome[right].append(n)
        for kind, f in SCORES.items():
            s = [f(*t, beta) for t in terms]
            wins[kind] += [float(s[i] > s[j]) + 0.5 * (s[i] == s[j]) for i in range(len(s)) for j in range(len(s))
                           if ok[i] and not ok[j]]
    out = {f"pairwise_{k}": sum(w) / len(w) for k, w in wins.items() if w}
    out["pairs"] = len(wins["reward"])
    out["tokens_right"], out["tokens_wrong"] = (sum(x) / len(x) if x else None
                                                for x in (by_outcome[True], by_outcome[False]))
    if len(set(rewards)) > 1 and len(set(lengths)) > 1:
        mr, ml = sum(rewards) / len(rewards), sum(lengths) / len(lengths)
        cov = sum((a - mr) * (b - ml) for a, b in zip(rewards, lengths))
        spread_r, spread_l = sum((a - mr) ** 2 for a in rewards), sum((b - ml) ** 2 for b in lengths)
        out["reward_length_r"] = cov / (spread_r * spread_l) ** 0.5
    return out


def per_question(flat, items):
    """A flat list, an entry per completion of every (question, completions) item, cut back into a list per question."""
    it = iter(flat)
    return [[next(it) for _ in completions] for _, completions in items]


def verifier_logprobs(verifier, ref, tok, items, batch_size):
    """
    (v, g, n) for every completion of every (question, completions) item, one list per question:
    its summed log-prob under the verifier and the reference (generator), and its tokens. All
    completions go through each model in batches of batch_size, not question by question.
    """
    pairs = [data.encode_example(tok, q, c) for q, completions in items for c in completions]
    v, g = loop.completion_logprobs(verifier, pairs, batch_size), loop.completion_logprobs(ref, pairs, batch_size)
    return per_question([(a, b, n) for (a, n), (b, _) in zip(v, g)], items)


def best_of_n_curve(golds, greedy, samples, terms, beta, n_max, extra=None):
    """
    The paper's figure, accuracy against N, from the first n of the N samples: maj@n, pass@n and
    best-of-n under every score in SCORES. golds, greedy, samples: as loop.outputs returns them;
    terms: (v, g, n) per sample, as samples; extra: {name: scores per sample, as samples}, more
    scores to rank by (the ORM's).
    """
    scores = {kind: [[f(*t, beta) for t in q] for q in terms] for kind, f in SCORES.items()}
    scores.update(extra or {})
    curve, n = [], 1
    while n <= n_max:
        row = {"n": n}
        for kind, sc in scores.items():
            r = loop.tally(golds, greedy, [o[:n] for o in samples], [q[:n] for q in sc])
            row[kind] = r[f"best@{n}"]
        row["maj"], row["pass"] = r[f"maj@{n}"], r[f"pass@{n}"]
        curve.append(row)
        n *= 2
    return curve


def preference_pairs(questions, sample_rows, per_question, seed):
    """(question, chosen=correct, rejected=incorrect) for the same question, at most per_question each."""
    by_q = {}
    for r in sample_rows:
        by_q.setdefault(r["index"], ([], []))[0 if r["correct"] else 1].append(r["completion"])
    rng = random.Random(seed)
    out = []
    for qi, (good, bad) in sorted(by_q.items()):
        good, bad = sorted(set(good)), sorted(set(bad))
        combos = [(g, b) for g in good for b in bad]
        for g, b in rng.sample(combos, min(per_question, len(combos))):
            out.append((questions[qi].question, g, b))
    return out


def train_verifier(generator, tok, pairs, args, lora=None):
    """
    DPO from the generator after its last fine-tune (the paper's SFT model), which is also the
    frozen reference. lora: adapters on the generator (its own adapters merged in).
    """
    enc = [(data.encode_example(tok, q, g), data.encode_example(tok, q, b)) for q, g, b in pairs]
    generator = model.merge_lora(generator)
    return loop.dpo_train(generator.state_dict(), generator.config, enc, steps=args.verifier_steps, lr=args.verifier_lr,
                          beta=args.beta, batch_size=args.batch_size, seed=args.seed + 7, device=args.device,
                          compile=args.compile, desc="verifier DPO", grad_accum=args.grad_accum, fsdp=args.fsdp,
                          lora=lora)


def orm_logits(gpt, head, x, y):
    """The ORM's score of each row: its head on the hidden state of the last scored position (it has read it all)."""
    # the first position where the count of scored tokens peaks: the last one
    last = (y != -1).long().cumsum(1).argmax(1)
    return head(gpt.hidden(x)[torch.arange(x.size(0), device=x.device), last]).squeeze(-1)


def train_orm(generator, tok, examples, args, lora=None):
    """
    An outcome reward model (the baseline the V-STaR paper compares its verifier with): the
    generator's weights plus a linear head (starting at zero) that reads the last hidden state of
    a completion, trained with binary cross-entropy to tell right samples from wrong ones.
    examples: (question, completion, correct) triples. Returns (model, head).
    """
    torch.manual_seed(args.seed + 8)
    gpt = loop.new_model(model.merge_lora(generator).state_dict(), generator.config, args.device, lora)
    head = torch.nn.Linear(gpt.config.n_embd, 1).to(args.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    enc = [(data.encode_example(tok, q, c), float(ok)) for q, c, ok in examples]
    rng = random.Random(args.seed + 8)

    def get_batch(step, micro):
        idx = rng.sample(range(len(enc)), min(args.batch_size, len(enc)))
        x, y = data.collate([enc[i][0] for i in idx], gpt.config.block_size, args.device)
        return x, y, torch.tensor([enc[i][1] for i in idx], device=args.device)

    def loss_fn(gpt, batch):
        x, y, label = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(orm_logits(gpt, head, x, y).float(), label), {}

    cfg = model.TrainConfig(steps=args.orm_steps, lr=args.verifier_lr, warmup=min(20, args.orm_steps // 10),
                            parallel=loop.parallel_mode(gpt, False))
    model.train(gpt, get_batch, cfg, loss_fn=loss_fn, params=list(gpt.parameters()) + list(head.parameters()),
                desc="ORM")
    return gpt, head


@torch.no_grad()
def orm_scores(gpt, head, tok, items, batch_size):
    """The ORM's logit (higher: more likely right) of every completion of every (question, completions) item."""
    pairs = [data.encode_example(tok, q, c) for q, completions in items for c in completions]
    out = loop.score_pairs(gpt, pairs, batch_size, lambda gpt, x, y: orm_logits(gpt, head, x, y).float().tolist())
    return per_question(out, items)


# -----------------------------------------------------------------------------
# the loop


def main(args):
    run, tok, init, task = loop.setup(args, "STaR", {"lr": (args.scratch_lr, loop.PRETRAINED_LR)}, few_shot=True)
    args.verifier_lr = args.verifier_lr or args.lr / 3  # the verifier's DPO and the ORM
    sampling = dict(seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch,
                    temperature=args.eval_temperature, prefix=data.few_shot_prefix(task.shots),
                    compile=args.compile_sampler)  # how every evaluation samples
    measure = lambda gpt: {**loop.evaluate(gpt, tok, task.test, n_samples=args.eval_samples, **sampling),
                           "val_acc": loop.evaluate(gpt, tok, task.val, **sampling)["acc"]}  # val: greedy

    # 0. the base model every iteration starts from: a warm start on the seed examples, or the pretrained weights
    t0 = time.time()
    config = model.GPTConfig(block_size=task.block_size, vocab_size=tok.vocab_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_kv_head=args.n_head, n_embd=args.n_embd)
    base = loop.warm_start(run.path("base.pt"), tok, task.seed, config, steps=args.warm_steps, lr=args.warm_lr,
                           batch_size=args.batch_size, seed=args.seed, device=args.device, init=init,
                           compile=args.compile, answer_only=args.answer_only, holdout=args.warm_holdout,
                           lora=args.lora)
    config, base_state = base.config, {k: v.to("cpu", copy=True) for k, v in base.state_dict().items()}  # off the GPU
    t_warm, t0 = time.time() - t0, time.time()
    (metrics,) = run.cached(["metrics.jsonl"], lambda b=base: [[{"iter": 0, **measure(b), "time_warm_start": t_warm,
                                                          "time_evaluate": time.time() - t0,
                                                          "time": t_warm + time.time() - t0}]])
    report_start(metrics)
    current = run.load("model.pt", args.device) if len(metrics) > 1 else base
    del base  # its weights live on as base_state, on the CPU
    seed_pairs = [] if task.shots else data.seed_pairs(tok, task.seed, args.answer_only)  # in the prompt or in the data

    for it in range(len(metrics), args.iters + 1):
        if iterations_since_best(metrics) >= args.patience:
            print(f"stopping: no better validation accuracy for {args.patience} iterations")
            break
        t0 = time.time()
        # 1-2. sample a rationale for every question, keep the right ones, rationalize failures with the answer given
        kept, stats = rationales(run, current, tok, task, args, it)
        if not kept:
            print(f"iteration {it} kept no rationales (no sample reached a right answer): stopping")
            break
        # 3. fine-tune from the base weights (not the last iteration's) on the kept rationales
        steps = int(round(args.steps * args.step_growth ** (it - 1)))
        pairs = seed_pairs + [data.encode_example(tok, r["question"], r["completion"]) for r in kept]
        t1 = time.time()
        current, loss = loop.fine_tune(base_state, config, pairs, steps=steps, lr=args.lr, batch_size=args.batch_size,
                                       seed=args.seed + it, device=args.device, compile=args.compile,
                                       desc=f"iter {it} fine-tune", grad_accum=args.grad_accum, fsdp=args.fsdp,
                                       lora=args.lora)
        # 4. evaluate on the test set and the validation split (which decides when to stop)
        t2 = time.time()
        res = measure(current)
        stats = {**stats, "time_fine_tune": t2 - t1, "time_evaluate": time.time() - t2}
        run.save("model.pt", current, iter=it, tokenizer_dir=tok.source)
        metrics.append({"iter": it, **res, **stats, "steps": steps, "loss": loss, "time": time.time() - t0})
        run.write("metrics.jsonl", metrics)
        report_iteration(metrics[-1], res, args)

    report_end(metrics, run.path("model.pt") if metrics[-1]["iter"] else run.path("base.pt")
               if os.path.exists(run.path("base.pt")) else init)
    if args.verifier:  # V-STaR: a verifier trained on every sample of every iteration ranks N test samples
        vstar(run, current, tok, task, args, sampling)
    return metrics


def rationales(run, gpt, tok, task, args, it):
    """Iteration it's kept rationales and stats, sampled with gpt (or read back if the round finished before)."""
    if args.answer_only:  # the baseline: gold answers for every question, no rationale
        kept = [{"index": i, "question": e.question, "completion": data.completion("", e.answer), "rationalized": False}
                for i, e in enumerate(task.train)]
        return kept, {"kept": len(kept)}

    def compute():
        kept, every, stats = collect(gpt, tok, task.train, args, it, task.shots)
        return [every if args.verifier else None, [stats], kept]

    _, stats, kept = run.cached([f"iter{it}_samples.jsonl", f"iter{it}_stats.jsonl", f"iter{it}_kept.jsonl"], compute)
    return kept, stats[0]


def iterations_since_best(metrics):
    """Iterations since the validation accuracy last improved (ties do not count as better)."""
    best, stale = -1.0, 0
    for r in metrics:
        best, stale = (r["val_acc"], 0) if r["val_acc"] > best else (best, stale + 1)
    return stale


def report_start(metrics):
    print("iter 0 (warm start): " + " ".join(f"{k} {v:.3f}" for k, v in metrics[0].items()
                                             if k not in ("iter", "time")))
    for r in metrics[1:]:  # a resumed run: what it had finished
        print(f"iter {r['iter']}: test acc {r['acc']:.3f} val_acc {r['val_acc']:.3f} | kept {r.get('kept')} "
              "(finished before)")


def report_iteration(row, res, args):
    extra = " ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "acc")
    print(f"iter {row['iter']}: test acc {row['acc']:.3f} {extra} | kept {row.get('kept')} (rationalized "
          f"{row.get('rationalized', 0)}, {row.get('rationalized_dropped', 0)} more dropped by the hint filter, solved "
          f"{row.get('solved_frac', 0):.3f} of train) | {row['steps']} steps, loss {row['loss']:.4f} | "
          f"{row['time']:.0f}s")
    if args.samples > 1 and not args.answer_only:
        print(f"  RFT: {row['correct_per_question']:.2f} correct samples per question, "
              f"{row['distinct_per_question']:.2f} distinct paths kept after de-duplication")


def report_end(metrics, final):
    top, last = max(metrics, key=lambda r: r["val_acc"]), metrics[-1]  # max: the first of equal ones, as the stop rule
    print(f"done: {last['iter']} iterations, {sum(r['time'] for r in metrics):.0f}s; best validation accuracy "
          f"{top['val_acc']:.3f} at iteration {top['iter']} (test {top['acc']:.3f}); {final} is iteration "
          f"{last['iter']}'s "
          f"model (test {last['acc']:.3f})")


def vstar(run, generator, tok, task, args, sampling):
    """
    V-STaR: a DPO verifier trained on (correct, incorrect) pairs of every iteration's samples
    ranks N samples of each question; best-of-N under every score, on validation and test.
    """
    names = ["verifier_val_samples.jsonl", "verifier_test_samples.jsonl", "verifier.jsonl"]
    *_, result = run.cached(names, lambda: verify_and_rank(run, generator, tok, task, args, sampling))
    if result is None:
        return
    result = result[0]
    print(f"V-STaR ({result['pairs']} pairs, DPO loss {result['loss']:.4f}); best-of-N by --verifier_score "
          f"{args.verifier_score}, then every score (maj@N and pass@N for comparison):")
    for name in ("val", "test"):
        print(f"  {name}: greedy {result[name]['acc']:.3f}")
        for c in result[name]["curve"]:
            others = " ".join(f"{k} {c[k]:.3f}" for k in [*SCORES, "orm"] if k in c and k != args.verifier_score)
            print(f"    N = {c['n']:3d}: maj@N {c['maj']:.3f} | best-of-N {c[args.verifier_score]:.3f} | pass@N "
                  f"{c['pass']:.3f} | {others}")


def verify_and_rank(run, generator, tok, task, args, sampling):
    """The verifier (and the ORM) trained, then N samples of every validation and test question scored: what
    vstar's three files hold (None each without a pair to train on)."""
    rows = [r for it in range(1, args.iters + 1) if run.exists(f"iter{it}_samples.jsonl")
            for r in run.read(f"iter{it}_samples.jsonl")]
    prefs = preference_pairs(task.train, rows, args.verifier_pairs, args.seed)
    if not prefs:
        print("V-STaR: no question has both a correct and an incorrect sample; no verifier trained")
        return [None, None, None]
    # with LoRA the verifier's and the ORM's adapters sit on the generator's checkpoint (or the base's)
    lora = args.lora and {**args.lora, "base": run.path("model.pt") if run.exists("model.pt") else args.lora["base"]}
    verifier, loss = train_verifier(generator, tok, prefs, args, lora)
    run.save("verifier.pt", verifier, tokenizer_dir=tok.source)
    orm = None
    if args.orm_steps > 0:  # the ORM baseline, on every sample (not only the paired ones)
        orm = train_orm(generator, tok,
                        [(task.train[r["index"]].question, r["completion"], r["correct"]) for r in rows], args, lora)
        run.save("orm.pt", orm[0], tokenizer_dir=tok.source, head={k: v.cpu() for k, v in orm[1].state_dict().items()})
    result, files = {"pairs": len(prefs), "loss": loss, "score": args.verifier_score}, []
    for name, split in (("val", task.val), ("test", task.test)):  # a score is chosen on validation, then read on test
        golds, greedy, samples = loop.outputs(generator, tok, split, n_samples=args.eval_samples, **sampling)
        items = [(e.question, [t for t, _ in outs]) for e, outs in zip(split, samples)]
        terms = verifier_logprobs(verifier, generator, tok, items, args.gen_batch)
        extra = {"orm": orm_scores(*orm, tok, items, args.gen_batch)} if orm else {}
        result[name] = {"acc": loop.tally(golds, greedy)["acc"],
                        "curve": best_of_n_curve(golds, greedy, samples, terms, args.beta, args.eval_samples, extra)}
        files.append([{"question": e.question, "answer": e.answer, "samples": [t for t, _ in outs],
                       "finished": [f for _, f in outs],
                       "logprob_verifier": [t[0] for t in tq], "logprob_generator": [t[1] for t in tq],
                       "tokens": [t[2] for t in tq], **({"orm": extra["orm"][i]} if orm else {})}
                      for i, (e, outs, tq) in enumerate(zip(split, samples, terms))])
    return [*files, [result]]


if __name__ == "__main__":
    loop.run_cli(main, get_args())
