"""
Per-step DPO on incorrect synthetic data (Setlur et al. 2024, "RL on Incorrect Synthetic Data
Scales the Efficiency of LLM Math Reasoning by Eight-Fold"). Self-generated *wrong* solutions,
used right, teach as much as many more right ones:

    1. start from an SFT model (star.py's warm start, or --init); it is also the DPO reference
    2. sample N solutions per training question; split each into steps (one per line); grade it
    3. Monte-Carlo step values: from every step prefix of a wrong solution, K rollouts with the
       same policy; Q(x, y_1..i) = fraction that reach the right answer. Rollouts are batched
       across prefixes and questions, and each prefix is prefilled once, its KV cache shared
       by its K rollouts
    4. critical step: the first step with the lowest Q (the "first pit"); the DPO pair is
       (chosen = a correct solution to the same question, rejected = the wrong one cut after
       its critical step)
    5. DPO (summed token log-probs of the response, --beta, reference log-probs computed once),
       plus SFT on the chosen side (--sft_weight; on by default for a model from scratch)
    6. greedy accuracy on the test set, as star.py reports it, and on a validation split of the
       training questions (--n_val, never sampled): settings are chosen on it

    python stepdpo.py                                   # per-step DPO from a fresh warm start
    python stepdpo.py --init out/star/base.pt           # ... from star.py's warm start
    python stepdpo.py --variant plain                   # plain DPO: correct vs whole wrong, random pairs
    python stepdpo.py --variant rft                     # SFT on the correct samples only (RFT)
    python stepdpo.py --out_dir out/stepdpo --resume    # continue a killed run
    torchrun --standalone --nproc_per_node 2 stepdpo.py # rollouts and DPO split across 2 processes

How this departs from the paper: the paper weights every step by its advantage (an
advantage-weighted DPO objective); here, as in its simplest form, each wrong solution gives
one pair cut at its first pit. Q of the last step is the solution's own grade (no rollout).
"""

import argparse
import random
import time

import data
import loop
import model

# -----------------------------------------------------------------------------
# arguments


# DPO's defaults by where the SFT model comes from: (from scratch, chosen on the validation split in docs/record.md;
# pretrained, the DPO papers' order of magnitude, untuned). RFT is SFT and uses none of them.
DPO_DEFAULTS = {"dpo_lr": (1e-5, 1e-6), "beta": (2.0, 0.1), "sft_weight": (1.0, 0.0)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loop.add_task_args(p)
    loop.add_model_args(p)
    loop.add_warm_start_args(p)
    g = p.add_argument_group("per-step DPO")
    g.add_argument("--variant", default="perstep", choices=["perstep", "plain", "rft"],
                   help="perstep: rejected cut at the critical step; plain: whole wrong solution; rft: SFT on correct "
                       "samples only")
    g.add_argument("--n_questions", type=loop.at_least(1), default=1000,
                   help="training questions to sample solutions for")
    g.add_argument("--n_val", type=loop.at_least(1), default=200,
                   help="the last training questions, held out as a validation split (never "
                   "sampled for training): choose --dpo_lr, --beta, epochs on its accuracy, never on the test set's")
    g.add_argument("--samples", type=loop.at_least(1), default=4,
                   help="N: solutions sampled per question (the synthetic data)")
    g.add_argument("--temperature", type=loop.at_least(0.0, float), default=0.7,
                   help="temperature of solutions and rollouts")
    g.add_argument("--rollouts", type=loop.at_least(1), default=4, help="K: Monte-Carlo rollouts per step prefix")
    g.add_argument("--no_share_prefix", action="store_true",
                   help="recompute each prefix for each rollout (for comparison)")
    by_origin = lambda flag: "default: {:g} from scratch, {:g} for a pretrained model or a checkpoint tuned from one" \
        .format(*DPO_DEFAULTS[flag])
    g.add_argument("--beta", type=loop.more_than(0), default=None, help=f"DPO beta; {by_origin('beta')}")
    g.add_argument("--sft_weight", type=loop.at_least(0.0, float), default=None,
                   help=f"weight of an SFT loss on the chosen side; {by_origin('sft_weight')}")
    g.add_argument("--train_steps", type=loop.at_least(0), default=300, help="DPO (or RFT) training steps")
    g.add_argument("--train_epochs", type=loop.at_least(0.0, float), default=0,
                   help="if > 0: the budget in epochs over the pairs (or RFT solutions) instead of steps")
    g.add_argument("--dpo_lr", type=loop.more_than(0), default=None,
                   help=f"DPO learning rate (RFT uses --lr); {by_origin('dpo_lr')}")
    g.add_argument("--show", type=loop.at_least(0), default=3,
                   help="print this many wrong solutions with their Q values")
    loop.add_run_args(p, "out/stepdpo", scratch_lr=1e-3)  # from scratch: star.py's warm start, the same base model
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Monte-Carlo step values


def mc_q_values(gpt, tok, items, args, seed, share_prefix=True):
    """
    items: list of (question, answer, steps, correct). Returns for each a list of Q values, one
    per step: Q[i] = fraction of K rollouts from prompt + steps[:i+1] that reach the answer.
    The last step's Q is the solution's own grade. All prefixes of all items go through the
    sampler together; with share_prefix each prefix is prefilled once for its K rollouts.
    """
    K = args.rollouts
    prefixes, owner = [], []  # owner: (item, step) of each prefix
    for j, (question, _, steps, _) in enumerate(items):
        for i in range(len(steps) - 1):
            prefixes.append(data.prompt(question) + "".join(steps[: i + 1]))
            owner.append((j, i))
    q_values = [[0.0] * (len(steps) - 1) + [float(ok)] for _, _, steps, ok in items]
    rollouts = loop.sample(gpt, tok, prefixes, K, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                           batch_size=args.gen_batch, seed=seed, share_prefix=share_prefix, desc="rollouts",
                           compile=args.compile_sampler)
    for prefix, (j, i), outs in zip(prefixes, owner, rollouts):
        answer = items[j][1]
        q_values[j][i] = sum(data.sample_correct(prefix + text, fin, answer) for text, fin in outs) / K
    return q_values


def critical_step(q_values):
    """The first step with the lowest Q: where the solution first falls into its deepest pit."""
    return min(range(len(q_values)), key=lambda i: (q_values[i], i))


def show_steps(question, steps, q_values, critical):
    print(f"Q: {question}")
    for i, (step, v) in enumerate(zip(steps, q_values)):
        mark = "  <- critical step" if i == critical else ""
        print(f"  Q={v:.2f} | {step.rstrip()}{mark}")


# -----------------------------------------------------------------------------
# pairs


def right_by_question(samples):
    """{question index: [its right completions, in sample order]}."""
    right = {}
    for s in samples:
        if s["correct"]:
            right.setdefault(s["index"], []).append(s["completion"])
    return right


def make_pairs(samples, q_rows, variant, seed):
    """
    DPO pairs from graded samples: one per wrong solution of a question that also has a right
    one. perstep: rejected = the wrong solution cut after its critical step; plain: the whole
    wrong solution. chosen: a right solution of the same question, drawn at random.
    """
    rng = random.Random(seed)
    right = right_by_question(samples)
    q_by_sample = {r["sample"]: r for r in q_rows}
    pairs = []
    for n, s in enumerate(samples):
        if s["correct"] or s["index"] not in right:
            continue
        pair = {"index": s["index"], "question": s["question"], "chosen": rng.choice(right[s["index"]])}
        if variant == "perstep":
            r = q_by_sample[n]
            cut = "".join(r["steps"][: r["critical"] + 1])
            complete = r["critical"] == len(r["steps"]) - 1 and s["finished"]
            pair.update(rejected=cut, rejected_complete=complete, q_values=r["q_values"], critical=r["critical"])
        else:
            pair.update(rejected=s["completion"], rejected_complete=s["finished"])
        pairs.append(pair)
    return pairs


# -----------------------------------------------------------------------------
# main


def main(args):
    defaults = {"lr": (args.scratch_lr, loop.PRETRAINED_LR), **(DPO_DEFAULTS if args.variant != "rft" else {})}
    run, tok, init, task = loop.setup(args, "per-step DPO", defaults)
    questions = task.train[: args.n_questions]
    accuracy = lambda gpt, split: loop.evaluate(gpt, tok, split, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                             batch_size=args.gen_batch, compile=args.compile_sampler)["acc"]

    # 1. the SFT model, also DPO's reference
    config = model.GPTConfig(block_size=task.block_size, vocab_size=tok.vocab_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_kv_head=args.n_head, n_embd=args.n_embd)
    base = loop.warm_start(run.path("base.pt"), tok, task.seed, config, steps=args.warm_steps, lr=args.warm_lr,
                           batch_size=args.batch_size, seed=args.seed, device=args.device, init=init,
                           compile=args.compile, holdout=args.warm_holdout, lora=args.lora)
    config, base_state = base.config, {k: v.to("cpu", copy=True) for k, v in base.state_dict().items()}  # off the GPU

    # 2. N solutions per question from the SFT model, graded: the synthetic data
    (samples,) = run.cached(["samples.jsonl"], lambda: [solutions(base, tok, questions, args)])
    n_right = sum(s["correct"] for s in samples)
    print(f"{n_right} right, {len(samples) - n_right} wrong")
    if args.variant != "rft" and (n_right == 0 or n_right == len(samples)):
        raise SystemExit(f"cannot pair: every sample is {'wrong' if n_right == 0 else 'right'}; "
                         "try more --samples, another --temperature or a different SFT model")

    # 3. per-step: Q values of every step of every wrong solution from Monte-Carlo rollouts, and its critical step
    q_rows = []
    if args.variant == "perstep":
        (q_rows,) = run.cached(["q_values.jsonl"], lambda: [q_value_rows(base, tok, samples, args)])
        for r in q_rows[: args.show]:
            show_steps(samples[r["sample"]]["question"], r["steps"], r["q_values"], r["critical"])

    # 4. the pairs: a right solution over a wrong one (per-step: cut after its critical step); RFT: the right ones
    if args.variant == "rft":
        by_index = right_by_question(samples)
        rows = [{"question": questions[i].question, "completion": t} for i, ts in sorted(by_index.items())
                for t in data.dedup(ts)]
        print(f"RFT: {len(rows)} distinct right solutions out of {n_right} right samples, {len(by_index)} questions")
    else:
        rows = make_pairs(samples, q_rows, args.variant, args.seed)
        if not rows:
            raise SystemExit("no question has both a right and a wrong sample: no DPO pairs")
        print(f"{len(rows)} DPO pairs ({args.variant})")
    run.write("pairs.jsonl", rows)

    # 5. DPO (RFT: SFT) from the SFT model, 6. both models evaluated on test and validation
    def optimize_and_evaluate():
        t0 = time.time()
        gpt, loss = train(base_state, config, tok, task.seed, rows, args)
        run.save("model.pt", gpt, tokenizer_dir=tok.source)
        return [{"variant": args.variant, "samples_per_question": args.samples, "synthetic_samples": len(samples),
                 "steps": args.train_steps, "train_examples": len(rows), "sft_acc": accuracy(base, task.test),
                 "acc": accuracy(gpt, task.test), "sft_val_acc": accuracy(base, task.val),
                 "val_acc": accuracy(gpt, task.val), "loss": loss, "train_time": time.time() - t0}]

    (res,) = run.cached(["metrics.json"], optimize_and_evaluate)
    print(f"{args.variant}: test acc {res['sft_acc']:.3f} (SFT model) -> {res['acc']:.3f}, validation "
          f"{res['sft_val_acc']:.3f} -> {res['val_acc']:.3f}, {res['steps']} steps on {len(rows)} examples from "
          f"{len(samples)} samples")
    return res


def solutions(gpt, tok, questions, args):
    """args.samples solutions of every question, graded."""
    t0 = time.time()
    outs = loop.sample(gpt, tok, [data.prompt(e.question) for e in questions], args.samples,
                       temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch, seed=args.seed, desc="sample",
                       compile=args.compile_sampler)
    samples = [{"index": i, "question": e.question, "answer": e.answer, "completion": t, "finished": f,
                "correct": data.sample_correct(t, f, e.answer)}
               for i, (e, o) in enumerate(zip(questions, outs)) for t, f in o]
    print(f"sampled {len(samples)} solutions ({args.samples} per question) in {time.time() - t0:.0f}s")
    return samples


def q_value_rows(gpt, tok, samples, args):
    """A row per wrong sample: its steps, the Q value of each step prefix, and its critical step."""
    t0 = time.time()
    wrong = [(n, s) for n, s in enumerate(samples) if not s["correct"]]
    items = [(s["question"], s["answer"], data.split_steps(s["completion"]), False) for _, s in wrong]
    qv = mc_q_values(gpt, tok, items, args, args.seed + 1, share_prefix=not args.no_share_prefix)
    n_prefixes = sum(len(it[2]) - 1 for it in items)
    dt = time.time() - t0
    print(f"{n_prefixes * args.rollouts} rollouts from {n_prefixes} step prefixes in {dt:.0f}s "
          f"({n_prefixes * args.rollouts / max(dt, 1e-9):.0f} rollouts/s)")
    return [{"sample": n, "steps": it[2], "q_values": q_values, "critical": critical_step(q_values)}
            for (n, _), it, q_values in zip(wrong, items, qv)]


def train(base_state, config, tok, seed_set, rows, args):
    """DPO on the pairs (and the SFT term), or RFT's SFT on the seed examples and right solutions; steps or epochs."""
    per_step = args.batch_size if args.variant == "rft" else max(1,
                                                                 args.batch_size // 2)  # DPO: a pair is two sequences
    if args.train_epochs > 0:
        args.train_steps = max(1, round(args.train_epochs * len(rows) / per_step))
        print(f"{args.train_epochs} epochs over {len(rows)} {'solutions' if args.variant == 'rft' else 'pairs'}: "
              f"{args.train_steps} steps")
    common = dict(steps=args.train_steps, batch_size=args.batch_size, seed=args.seed + 2, device=args.device,
                  compile=args.compile, grad_accum=args.grad_accum, fsdp=args.fsdp, lora=args.lora)
    if args.variant == "rft":
        enc = data.seed_pairs(tok, seed_set) + [data.encode_example(tok, r["question"], r["completion"]) for r in rows]
        return loop.fine_tune(base_state, config, enc, lr=args.lr, desc="RFT", **common)
    enc = [(data.encode_example(tok, p["question"], p["chosen"]),
            data.encode_example(tok, p["question"], p["rejected"], complete=p["rejected_complete"])) for p in rows]
    return loop.dpo_train(base_state, config, enc, lr=args.dpo_lr, beta=args.beta, sft_weight=args.sft_weight,
                          desc=f"{args.variant} DPO", **common)


if __name__ == "__main__":
    loop.run_cli(main, get_args())
