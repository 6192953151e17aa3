"""
STaR: the Self-Taught Reasoner (Zelikman et al. 2022), with RFT (Yuan et al. 2023) and
V-STaR (Hosseini et al. 2024) as modes. The model learns to reason from its own samples:

    0. warm start: fine-tune on a small seed set of worked examples (plain and with the hint)
    1. generate: sample a rationale for every training question; keep the ones whose answer is right
    2. rationalize: for each failure, sample again with the right answer as a hint; keep the
       rationales that reach it, stored *without* the hint
    3. fine-tune from the warm-start weights (not the last iteration's) on seed + kept rationales,
       with a step budget that grows each iteration
    4. evaluate on the test set; repeat until accuracy stops improving or --iters

Run it:

    python star.py                                          # built-in arithmetic task, CPU
    python star.py --no_rationalize                         # STaR without rationalization
    python star.py --samples 8 --temperature 0.7            # RFT: K samples, distinct correct paths kept
    python star.py --verifier --eval_samples 8              # V-STaR: a DPO verifier ranks N samples
    python star.py --answer_only                            # baseline: gold answers, no rationale
    python star.py --dataset gsm8k --data_dir ../shared/data/gsm8k
    python star.py --out_dir out/star --resume              # continue a killed run

How this departs from the papers:
- The model is a tiny transformer trained from scratch, so the few-shot prompt of STaR is
  replaced by a short fine-tune on `--n_seed` worked examples (the warm start).
- Rationalization uses a hint line in the prompt ("Hint: the answer is N") rather than the
  paper's hinted few-shot exemplars.
- RFT de-duplicates by the sequence of equations (GSM8K's <<..>> annotations, else the step
  lines) and, among duplicates, keeps the one farthest in edit distance from those kept.
- V-STaR's verifier score is its DPO implicit reward, beta * (log p_verifier(y|x) - log p_base(y|x)),
  summed over the completion's tokens, with the warm-start model as the reference.
"""

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict

import torch

import data
import model
from data import Tokenizer
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_task_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None, help="start from this checkpoint instead of a warm start from scratch")
    g.add_argument("--n_layer", type=int, default=3, help="transformer blocks (from scratch)")
    g.add_argument("--n_embd", type=int, default=96, help="model width (from scratch)")
    g.add_argument("--n_head", type=int, default=4, help="attention heads (from scratch)")
    g.add_argument("--block_size", type=int, default=0, help="context length (from scratch; 0 = 256 for arithmetic, 1024 for gsm8k)")
    g = p.add_argument_group("STaR")
    g.add_argument("--n_seed", type=int, default=256, help="worked examples for the warm start (taken from the train set)")
    g.add_argument("--warm_steps", type=int, default=1000, help="fine-tuning steps of the warm start")
    g.add_argument("--iters", type=int, default=5, help="most STaR iterations")
    g.add_argument("--patience", type=int, default=2, help="stop after this many iterations without a better test accuracy")
    g.add_argument("--steps", type=int, default=400, help="fine-tuning steps of the first iteration")
    g.add_argument("--step_growth", type=float, default=1.2, help="the step budget is multiplied by this each iteration")
    g.add_argument("--no_rationalize", action="store_true", help="ablation: do not rationalize failed questions")
    g.add_argument("--answer_only", action="store_true", help="baseline: fine-tune on gold answers of all questions, no rationales")
    g.add_argument("--samples", type=int, default=1, help="rationales sampled per question (RFT when > 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for generation (0 = greedy)")
    g.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    g.add_argument("--max_new_tokens", type=int, default=0, help="cut generations at this length (0 = from the task)")
    g = p.add_argument_group("evaluation and V-STaR")
    g.add_argument("--eval_samples", type=int, default=0, help="also sample N solutions per test question: maj@N, pass@N")
    g.add_argument("--eval_temperature", type=float, default=0.7, help="temperature of those N samples")
    g.add_argument("--verifier", action="store_true", help="V-STaR: train a DPO verifier on all samples, rank N test samples")
    g.add_argument("--verifier_steps", type=int, default=300, help="DPO steps of the verifier")
    g.add_argument("--verifier_pairs", type=int, default=4, help="most (correct, incorrect) pairs per question")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta of the verifier")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--batch_size", type=int, default=32, help="sequences per training step")
    g.add_argument("--gen_batch", type=int, default=512, help="prompts per sampling batch")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="out/star", help="where the run's files go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its last finished step")
    g.add_argument("--seed", type=int, default=1337, help="seed of init, sampling and batching")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.samples > 1 and args.temperature == 0:
        p.error("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    if args.verifier and args.eval_samples < 2:
        args.eval_samples = 8
    return args


# -----------------------------------------------------------------------------
# files of a run: every write is atomic, so a crash leaves the last finished step intact


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


RUN_ARGS = {"resume", "out_dir", "device", "threads", "gen_batch", "compile"}  # may differ on resume


def open_run(args):
    """Create out_dir, or check on --resume that it belongs to the same settings."""
    cfg_path = os.path.join(args.out_dir, "config.json")
    mine = {k: v for k, v in vars(args).items() if k not in RUN_ARGS}
    if os.path.exists(cfg_path):
        if not args.resume:
            sys.exit(f"{args.out_dir} already holds a run: pass --resume to continue it, or another --out_dir")
        with open(cfg_path) as f:
            theirs = {k: v for k, v in json.load(f).items() if k not in RUN_ARGS}
        diff = {k: (theirs.get(k), mine.get(k)) for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k)}
        if diff:
            sys.exit(f"--resume with other settings than the run in {args.out_dir}: {diff}")
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        write_atomic(cfg_path, json.dumps(vars(args), indent=2))


# -----------------------------------------------------------------------------
# sampling, filtering, de-duplication


def sample(m, tok, questions, args, k, temperature, seed, hints=None, desc="sample"):
    """
    k completions (decoded text) for each question, KV-cached and batched.
    hints: the answers to show in the prompt (rationalization), or None.
    Returns a list of len(questions) lists of k (text, finished) pairs.
    """
    from tqdm import tqdm

    g = model.make_generator(seed, m.lm_head.weight.device)
    prompts = [tok.encode(data.hint_prompt(q, h) if hints else data.prompt(q)) for q, h in zip(questions, hints or questions)]
    out = []
    per_batch = max(1, args.gen_batch // k)
    for i in tqdm(range(0, len(prompts), per_batch), desc=desc, leave=False, disable=None):
        chunk = prompts[i : i + per_batch]
        max_new = min(args.max_new_tokens, m.config.block_size - max(len(p) for p in chunk))
        s = model.generate(m, chunk, max_new, temperature, args.top_k, tok.eot, g, num_samples=k)
        texts = [tok.decode(c) for c in s.completions()]
        fin = s.finished.tolist()
        for j in range(len(chunk)):
            out.append(list(zip(texts[j * k : (j + 1) * k], fin[j * k : (j + 1) * k])))
    return out


def correct(text, finished, answer):
    """A sample counts only if it ended by itself (not cut at the length limit) with the right answer."""
    return finished and data.is_correct(text, answer)


def edit_distance(a, b):
    """Levenshtein distance between two strings (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def dedup(texts):
    """
    RFT's de-duplication of one question's correct samples: one per distinct reasoning path
    (data.reasoning_path); among the samples of a path, the one farthest in edit distance from
    those already kept. Returns the kept texts, first-seen path first.
    """
    groups = {}
    for t in texts:
        groups.setdefault(data.reasoning_path(data.strip_answer(t)), []).append(t)
    kept = []
    for members in groups.values():
        if not kept or len(members) == 1:
            kept.append(members[0])
        else:
            kept.append(max(members, key=lambda t: min(edit_distance(t, k) for k in kept)))
    return kept


def collect(m, tok, questions, args, it):
    """
    One generation round: sample, filter, de-duplicate, rationalize. Returns (kept rows,
    all sample rows for the verifier, stats). A kept row is a training example, never with a hint.
    """
    base_seed = args.seed * 1000 + it * 10
    samples = sample(m, tok, [e.question for e in questions], args, args.samples, args.temperature, base_seed, desc=f"iter {it} generate")
    kept, every, failed = [], [], []
    n_correct_samples = 0
    for qi, (e, outs) in enumerate(zip(questions, samples)):
        good = []
        for text, fin in outs:
            ok = correct(text, fin, e.answer)
            every.append({"q": qi, "completion": text, "correct": ok})
            if ok:
                good.append(text)
        n_correct_samples += len(good)
        for text in dedup(good) if args.samples > 1 else good[:1]:
            kept.append({"q": qi, "question": e.question, "completion": text, "rationalized": False})
        if not good:
            failed.append(qi)
    n_rationalized = 0
    if failed and not args.no_rationalize:
        fq = [questions[i] for i in failed]
        hinted = sample(m, tok, [e.question for e in fq], args, 1, args.temperature, base_seed + 1,
                        hints=[e.answer for e in fq], desc=f"iter {it} rationalize")
        for qi, e, outs in zip(failed, fq, hinted):
            text, fin = outs[0]
            if correct(text, fin, e.answer):
                # stored without the hint: the model learns to reach the answer from the question alone
                kept.append({"q": qi, "question": e.question, "completion": text, "rationalized": True})
                n_rationalized += 1
    solved = len({r["q"] for r in kept if not r["rationalized"]})
    stats = {
        "solved": solved, "solved_frac": solved / max(1, len(questions)), "rationalized": n_rationalized,
        "kept": len(kept), "correct_samples": n_correct_samples,
        "correct_per_question": n_correct_samples / max(1, len(questions)),
        "distinct_per_question": sum(not r["rationalized"] for r in kept) / max(1, len(questions)),
    }
    return kept, every, stats


# -----------------------------------------------------------------------------
# fine-tuning and evaluation


def fine_tune(base_state, config, pairs, steps, args, seed, desc):
    """A fresh copy of the base weights fine-tuned on (prompt_ids, completion_ids) pairs."""
    torch.manual_seed(seed)
    m = GPT(config).to(args.device)
    m.load_state_dict(base_state)
    rng = random.Random(seed)
    order = []

    def get_batch(step, micro):
        batch = []
        while len(batch) < args.batch_size:
            if not order:  # shuffled epochs: every example is seen once before any is seen twice
                order.extend(rng.sample(range(len(pairs)), len(pairs)))
            batch.append(pairs[order.pop()])
        return data.collate(batch, config.block_size, args.device)

    cfg = model.TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=min(20, steps // 10), compile=args.compile)
    losses = model.train(m, get_batch, cfg, desc=desc)
    return m, losses[-1] if losses else float("nan")


def seed_pairs(tok, seed_set, answer_only=False):
    """The warm-start data: every seed example plain and, for rationalization, with its hint."""
    pairs = []
    for e in seed_set:
        text = data.completion("" if answer_only else e.rationale, e.answer)
        pairs.append(data.encode_example(tok, e.question, text))
        if not answer_only:
            pairs.append(data.encode_example(tok, e.question, text, hint=e.answer))
    return pairs


def majority(answers):
    """The most common parsed answer (ties: the first seen), or None."""
    answers = [a for a in answers if a is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def evaluate(m, tok, test, args, seed, verifier=None, ref=None):
    """Greedy accuracy; with --eval_samples N also maj@N and pass@N; with a verifier, best-of-N."""
    res = {}
    greedy = sample(m, tok, [e.question for e in test], args, 1, 0.0, seed, desc="eval greedy")
    res["acc"] = sum(correct(o[0][0], o[0][1], e.answer) for e, o in zip(test, greedy)) / len(test)
    if args.eval_samples > 1:
        n = args.eval_samples
        outs = sample(m, tok, [e.question for e in test], args, n, args.eval_temperature, seed + 1, desc=f"eval {n} samples")
        maj, oracle, best = 0, 0, 0
        for e, o in zip(test, outs):
            ans = [data.extract_answer(t) if f else None for t, f in o]
            maj += data.answers_match(majority(ans), e.answer)
            oracle += any(correct(t, f, e.answer) for t, f in o)
        res[f"maj@{n}"], res[f"pass@{n}"] = maj / len(test), oracle / len(test)
        if verifier is not None:
            for e, o in zip(test, outs):
                scores = verifier_scores(verifier, ref, tok, [(e.question, t) for t, _ in o], args)
                t, f = o[int(torch.tensor(scores).argmax())]
                best += correct(t, f, e.answer)
            res[f"verifier@{n}"] = best / len(test)
    return res


# -----------------------------------------------------------------------------
# V-STaR: a verifier trained with DPO on correct vs incorrect samples


def verifier_scores(verifier, ref, tok, qa, args):
    """DPO implicit reward beta * (log p_verifier - log p_ref) of each (question, completion)."""
    pairs = [data.encode_example(tok, q, c) for q, c in qa]
    x, y = data.collate(pairs, verifier.config.block_size, args.device)
    with torch.no_grad(), model.autocast(args.device):
        s = args.beta * (model.sequence_logprobs(verifier, x, y) - model.sequence_logprobs(ref, x, y))
    return s.float().tolist()


def preference_pairs(questions, sample_rows, per_question, seed):
    """(question, chosen=correct, rejected=incorrect) for the same question, at most per_question each."""
    by_q = {}
    for r in sample_rows:
        by_q.setdefault(r["q"], ([], []))[0 if r["correct"] else 1].append(r["completion"])
    rng = random.Random(seed)
    out = []
    for qi, (good, bad) in sorted(by_q.items()):
        good, bad = sorted(set(good)), sorted(set(bad))
        combos = [(g, b) for g in good for b in bad]
        for g, b in rng.sample(combos, min(per_question, len(combos))):
            out.append((questions[qi].question, g, b))
    return out


def train_verifier(base_state, config, tok, pairs, args):
    """DPO from the warm-start weights; the frozen warm-start model is the reference."""
    ref = GPT(config).to(args.device)
    ref.load_state_dict(base_state)
    ref.requires_grad_(False)
    verifier = GPT(config).to(args.device)
    verifier.load_state_dict(base_state)
    enc = [(data.encode_example(tok, q, g), data.encode_example(tok, q, b)) for q, g, b in pairs]
    rng = random.Random(args.seed + 7)

    def get_batch(step, micro):
        batch = rng.sample(enc, min(args.batch_size // 2, len(enc)))
        x, y = data.collate([c for c, _ in batch] + [r for _, r in batch], config.block_size, args.device)
        with torch.no_grad():  # reference log-probs carry no gradient
            ref_lp = model.sequence_logprobs(ref, x, y)
        return x, y, ref_lp

    def loss_fn(m, batch):
        x, y, ref_lp = batch
        lp = model.sequence_logprobs(m, x, y)
        n = x.size(0) // 2
        return model.dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], args.beta)

    cfg = model.TrainConfig(steps=args.verifier_steps, lr=args.lr / 3, warmup=20, compile=args.compile)
    losses = model.train(verifier, get_batch, cfg, loss_fn=loss_fn, desc="verifier DPO")
    return verifier, ref, losses[-1]


# -----------------------------------------------------------------------------
# the loop


def base_block_size(args):
    """The context of the model the run starts from: --init's, --block_size, or the task's default."""
    if args.init:
        return model.load_checkpoint(args.init)[0].config.block_size
    return args.block_size or (1024 if args.dataset == "gsm8k" else 256)


def main(args):
    args.device = model.autodetect_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    open_run(args)
    path = lambda name: os.path.join(args.out_dir, name)
    print(f"nanostar STaR: {json.dumps(vars(args))}")
    tok = Tokenizer()
    train_set, test = data.task_from_args(args)
    block_size = base_block_size(args)
    fits = lambda e: len(tok.encode(data.hint_prompt(e.question, e.answer) + data.completion(e.rationale, e.answer))) + 1 <= block_size
    for name, split in (("train", train_set), ("test", test)):
        kept_split = [e for e in split if fits(e)]
        if len(kept_split) < len(split):
            print(f"dropped {len(split) - len(kept_split)} of {len(split)} {name} examples longer than block_size {block_size}")
        split[:] = kept_split
    if args.n_seed >= len(train_set):
        sys.exit(f"--n_seed {args.n_seed} leaves no training questions out of {len(train_set)}")
    seed_set, questions = train_set[: args.n_seed], train_set[args.n_seed :]
    if args.max_new_tokens == 0:  # room for the longest gold solution, and a quarter more
        longest = max(len(tok.encode(data.completion(e.rationale, e.answer))) for e in train_set)
        args.max_new_tokens = min(int(longest * 1.25) + 8, block_size)
    print(f"task {args.dataset}: {len(seed_set)} seed, {len(questions)} train questions, {len(test)} test; "
          f"generations cut at {args.max_new_tokens} tokens")

    # --- 0. warm start (the base model every iteration fine-tunes from)
    metrics = read_jsonl(path("metrics.jsonl")) if os.path.exists(path("metrics.jsonl")) else []
    t0 = time.time()
    if os.path.exists(path("base.pt")):
        base, _ = model.load_checkpoint(path("base.pt"), args.device)
        print("resumed: warm-start model from base.pt")
    elif args.init:
        base, _ = model.load_checkpoint(args.init, args.device)
        model.save_checkpoint(path("base.pt"), base)
    else:
        config = GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_kv_head=args.n_head, n_embd=args.n_embd)
        torch.manual_seed(args.seed)
        init_state = GPT(config).state_dict()
        base, loss = fine_tune(init_state, config, seed_pairs(tok, seed_set, args.answer_only), args.warm_steps, args, args.seed, "warm start")
        model.save_checkpoint(path("base.pt"), base)
        print(f"warm start: {base.num_params():,} parameters, {args.warm_steps} steps, loss {loss:.4f}, {time.time() - t0:.0f}s")
    config, base_state = base.config, {k: v.clone() for k, v in base.state_dict().items()}
    if not metrics:
        res = evaluate(base, tok, test, args, args.seed)
        metrics.append({"iter": 0, **res, "time": time.time() - t0})
        write_jsonl(path("metrics.jsonl"), metrics)
    print(f"iter 0 (warm start): " + " ".join(f"{k} {v:.3f}" for k, v in metrics[0].items() if k not in ("iter", "time")))

    # --- 1-4. iterate
    current = model.load_checkpoint(path("model.pt"), args.device)[0] if len(metrics) > 1 else base
    best, stale = -1.0, 0  # best test accuracy so far, iterations since it last improved
    for r in metrics:
        best, stale = (r["acc"], 0) if r["acc"] > best else (best, stale + 1)
    for it in range(len(metrics), args.iters + 1):
        if stale >= args.patience:
            print(f"stopping: no better test accuracy for {args.patience} iterations")
            break
        t0 = time.time()
        kept_path = path(f"iter{it}_kept.jsonl")
        if args.answer_only:  # the baseline: gold answers for every question, no rationale
            kept = [{"q": i, "question": e.question, "completion": data.completion("", e.answer), "rationalized": False}
                    for i, e in enumerate(questions)]
            stats = {"kept": len(kept)}
        elif os.path.exists(kept_path):
            kept, stats = read_jsonl(kept_path), read_jsonl(path(f"iter{it}_stats.jsonl"))[0]
            print(f"resumed: iteration {it}'s {len(kept)} kept rationales from {kept_path}")
        else:
            kept, every, stats = collect(current, tok, questions, args, it)
            if args.verifier:
                write_jsonl(path(f"iter{it}_samples.jsonl"), every)
            write_jsonl(path(f"iter{it}_stats.jsonl"), [stats])
            write_jsonl(kept_path, kept)  # written last: its presence means the round finished
        if not kept:
            print(f"iteration {it} kept no rationales (no sample reached a right answer): stopping")
            break
        steps = int(round(args.steps * args.step_growth ** (it - 1)))
        pairs = seed_pairs(tok, seed_set, args.answer_only) + [data.encode_example(tok, r["question"], r["completion"]) for r in kept]
        current, loss = fine_tune(base_state, config, pairs, steps, args, args.seed + it, f"iter {it} fine-tune")
        res = evaluate(current, tok, test, args, args.seed)
        model.save_checkpoint(path("model.pt"), current, iter=it)
        row = {"iter": it, **res, **stats, "steps": steps, "loss": loss, "time": time.time() - t0}
        metrics.append(row)
        write_jsonl(path("metrics.jsonl"), metrics)
        stale = 0 if res["acc"] > best else stale + 1
        best = max(best, res["acc"])
        extra = " ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "acc")
        print(f"iter {it}: test acc {res['acc']:.3f} {extra} | kept {stats.get('kept')} "
              f"(rationalized {stats.get('rationalized', 0)}, solved {stats.get('solved_frac', 0):.3f} of train) "
              f"| {steps} steps, loss {loss:.4f} | {row['time']:.0f}s")

    # --- V-STaR: verifier trained on every sample of every iteration
    if args.verifier:
        rows = []
        for it in range(1, args.iters + 1):
            if os.path.exists(path(f"iter{it}_samples.jsonl")):
                rows += read_jsonl(path(f"iter{it}_samples.jsonl"))
        prefs = preference_pairs(questions, rows, args.verifier_pairs, args.seed)
        if not prefs:
            print("V-STaR: no question has both a correct and an incorrect sample; no verifier trained")
        else:
            verifier, ref, loss = train_verifier(base_state, config, tok, prefs, args)
            model.save_checkpoint(path("verifier.pt"), verifier)
            res = evaluate(current, tok, test, args, args.seed, verifier, ref)
            n = args.eval_samples
            write_jsonl(path("verifier.jsonl"), [{**res, "pairs": len(prefs), "loss": loss}])
            print(f"V-STaR ({len(prefs)} pairs, DPO loss {loss:.4f}): greedy {res['acc']:.3f} | maj@{n} {res[f'maj@{n}']:.3f} "
                  f"| verifier best-of-{n} {res[f'verifier@{n}']:.3f} | pass@{n} {res[f'pass@{n}']:.3f}")
    return metrics


if __name__ == "__main__":
    main(get_args())
