"""
Tasks, answers and the tokenizer: everything nanostar knows about text lives here.

Every task is a list of `Example(question, answer, rationale)` for train and test, and every
task writes a solution the same way, so the scripts never special-case a task:

    prompt:       "Q: <question>\\nA:\\n"
    hint prompt:  "Q: <question>\\nHint: the answer is <answer>\\nA:\\n"   (STaR's rationalization)
    completion:   "<rationale, one step per line>\\n#### <answer>" then <|endoftext|>

- `arithmetic` (default, offline): n-digit addition with a line-per-digit scratchpad.
- `gsm8k`: grade-school math, from the hub via `datasets` or from a local directory.

Model output and dataset text are untrusted: answers are parsed as numbers with a regex and
compared as Decimals; nothing is ever evaluated.
"""

import json
import os
import random
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import tiktoken
import torch

import model

# -----------------------------------------------------------------------------
# tokenizer: byte-level tiktoken Encoding built in code (no download, ever)

SPECIAL_TOKENS = ["<|endoftext|>", "<|startthought|>", "<|endthought|>", "<|pad|>"]


class Tokenizer:
    """256 byte tokens + the special tokens above: vocab 260. Digits are single tokens."""

    def __init__(self):
        ranks = {bytes([i]): i for i in range(256)}  # no merges: every byte is its own token
        specials = {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanostar-bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=specials
        )
        self.eot, self.start_thought, self.end_thought, self.pad = (specials[s] for s in SPECIAL_TOKENS)
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        """Encode untrusted text: a literal '<|endoftext|>' in it stays plain text, never a special token."""
        return self.enc.encode(text, disallowed_special=())

    def encode_with_specials(self, text):
        """Encode text we wrote ourselves, where special-token strings mean the special tokens."""
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.enc.decode(list(ids))


# -----------------------------------------------------------------------------
# the one solution format shared by every task

ANSWER_MARK = "#### "


@dataclass
class Example:
    question: str
    answer: str  # the final answer, as text ("14196", "-3", "0.5")
    rationale: str = ""  # the gold steps, one per line, without the answer line


def prompt(question):
    return f"Q: {question}\nA:\n"


def hint_prompt(question, answer):
    """The rationalization prompt: the question with its correct answer given as a hint."""
    return f"Q: {question}\nHint: the answer is {answer}\nA:\n"


def completion(rationale, answer):
    """What the model writes after the prompt: the steps, then the answer line."""
    return f"{rationale}\n{ANSWER_MARK}{answer}" if rationale else f"{ANSWER_MARK}{answer}"


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text):
    """The first number in text as a Decimal ('1,234' -> 1234, '$5.50' -> 5.50), or None."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    try:
        return Decimal(m.group(0).replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def extract_answer(text):
    """The number after the last '#### ' of a generated completion, or None if there is none."""
    i = text.rfind(ANSWER_MARK.strip())
    if i < 0:
        return None
    line = text[i + len(ANSWER_MARK.strip()) :].strip().split("\n")[0]
    return parse_number(line)


def answers_match(pred, gold):
    """pred, gold: Decimals or strings; equal as numbers. A missing prediction is wrong."""
    pred = parse_number(pred) if isinstance(pred, str) else pred
    gold = parse_number(gold) if isinstance(gold, str) else gold
    return pred is not None and gold is not None and pred == gold


def is_correct(completion_text, gold_answer):
    return answers_match(extract_answer(completion_text), gold_answer)


def split_steps(text):
    """A completion's steps: one per line, each keeping its newline, so ''.join(steps) == text."""
    return text.splitlines(keepends=True)


def strip_answer(text):
    """The rationale part of a completion (everything before the answer line)."""
    i = text.rfind(ANSWER_MARK.strip())
    return text[:i].rstrip("\n") if i >= 0 else text


_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def reasoning_path(rationale):
    """
    What makes two solutions the same path, for RFT's de-duplication: the GSM8K calculator
    annotations '<<48/2=24>>' in order when there are any, else the non-empty step lines.
    """
    eqs = _ANNOTATION.findall(rationale)
    if eqs:
        return tuple(e.replace(" ", "") for e in eqs)
    return tuple(line.strip() for line in rationale.splitlines() if line.strip())


# -----------------------------------------------------------------------------
# task: arithmetic (n-digit addition with a scratchpad)


def addition_rationale(a, b):
    """
    The scratchpad, one line per digit from the right, in the spirit of STaR's arithmetic task.
    Each line is the state after adding one column: what is left of both operands, the carry,
    and the digits of the sum found so far. 4821+9375:

        482+937 c0 6
        48+93 c0 96
        4+9 c1 196
        0+0 c1 4196
        #### 14196

    Every line depends only on the line above (drop a digit, add the dropped digits and carry),
    so a small model can do a long addition one column at a time.
    """
    lines, carry, digits = [], 0, ""
    while a > 0 or b > 0 or not lines:
        s = a % 10 + b % 10 + carry
        a, b, carry, digits = a // 10, b // 10, s // 10, str(s % 10) + digits
        lines.append(f"{a}+{b} c{carry} {digits}")
    return "\n".join(lines)


def _random_number(rng, min_digits, max_digits):
    n = rng.randint(min_digits, max_digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def arithmetic_task(n_train=4000, n_test=500, min_digits=1, max_digits=8, seed=0):
    """
    Train/test sets of a+b with each operand's length uniform in [min_digits, max_digits].
    Deterministic in seed; the test set is drawn first and no train question repeats a test one.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(f"arithmetic-{seed}")

    def draw(n, exclude):
        out, seen = [], set(exclude)
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            a, b = _random_number(rng, min_digits, max_digits), _random_number(rng, min_digits, max_digits)
            if (a, b) not in seen:
                seen.add((a, b))
                out.append(Example(f"{a}+{b}", str(a + b), addition_rationale(a, b)))
        if len(out) < n:
            raise ValueError(f"only {len(out)} distinct questions with {min_digits}-{max_digits} digits, asked for {n}")
        return out, seen

    test, seen = draw(n_test, ())
    train, _ = draw(n_train, seen)
    return train, test


# -----------------------------------------------------------------------------
# task: gsm8k


def gsm8k_example(record, where):
    """A GSM8K record {'question', 'answer'} -> Example; `where` names the file:line for errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: missing or non-text field '{key}'")
    text = record["answer"]
    i = text.rfind(ANSWER_MARK.strip())
    if i < 0 or parse_number(text[i:]) is None:
        raise ValueError(f"{where}: answer has no '#### <number>' final line")
    answer = text[i + len(ANSWER_MARK.strip()) :].strip().replace(",", "")
    return Example(record["question"].strip(), answer, text[:i].strip())


def read_jsonl(path):
    """Examples from a GSM8K-format JSONL file, with an error naming file and line for bad input."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(gsm8k_example(record, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: the file is empty")
    return out


HUB_HOST = "huggingface.co"


def hub_reachable(timeout=3.0):
    """One TCP connect to the hub, so an offline machine fails in seconds, not after datasets' retries."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def gsm8k_task(data_dir=None):
    """GSM8K train/test: from data_dir/{train,test}.jsonl, else from the hub via `datasets`."""
    if data_dir:
        return read_jsonl(os.path.join(data_dir, "train.jsonl")), read_jsonl(os.path.join(data_dir, "test.jsonl"))
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline and not hub_reachable():
        raise ConnectionError(
            f"cannot reach {HUB_HOST} to download openai/gsm8k; pass --data_dir DIR with a local "
            "train.jsonl and test.jsonl (GSM8K's own format) instead"
        )
    from datasets import load_dataset

    ds = load_dataset("openai/gsm8k", "main")
    return tuple([gsm8k_example(r, f"openai/gsm8k {split}[{i}]") for i, r in enumerate(ds[split])] for split in ("train", "test"))


# -----------------------------------------------------------------------------
# the command-line face of the tasks, shared by every script


def add_task_args(parser):
    g = parser.add_argument_group("task")
    g.add_argument("--dataset", default="arithmetic", choices=["arithmetic", "gsm8k"], help="which task to learn")
    g.add_argument("--data_dir", default=None, help="gsm8k: local directory with train.jsonl and test.jsonl (skips the hub)")
    g.add_argument("--n_train", type=int, default=4000, help="training questions used (gsm8k: at most this many)")
    g.add_argument("--n_test", type=int, default=500, help="test questions evaluated (gsm8k: the first this many)")
    g.add_argument("--min_digits", type=int, default=1, help="arithmetic: fewest digits per operand")
    g.add_argument("--max_digits", type=int, default=5, help="arithmetic: most digits per operand")
    g.add_argument("--data_seed", type=int, default=0, help="arithmetic: seed of the generated train/test sets")
    return g


def task_from_args(args):
    """(train, test) lists of Examples for the parsed args."""
    if args.dataset == "arithmetic":
        return arithmetic_task(args.n_train, args.n_test, args.min_digits, args.max_digits, args.data_seed)
    train, test = gsm8k_task(args.data_dir)
    return train[: args.n_train], test[: args.n_test]


# -----------------------------------------------------------------------------
# batching


def check_fits(length, block_size, what="sequence"):
    if length > block_size:
        raise ValueError(f"{what} of {length} tokens is longer than the model's block_size of {block_size}")


def collate(pairs, block_size, device="cpu"):
    """
    pairs: list of (prompt_ids, completion_ids). Returns x, y (B, T) for next-token training,
    right-padded; y is -1 on prompt tokens and padding, so only the completion is learned.
    """
    seqs = [p + c for p, c in pairs]
    T = max(len(s) for s in seqs) - 1
    check_fits(T, block_size, "training sequence (minus its last token)")
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, ((p, c), s) in enumerate(zip(pairs, seqs)):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(p) - 1 : len(s) - 1] = torch.tensor(c)
    return x.to(device), y.to(device)


def encode_example(tok, question, completion_text, hint=None, complete=True):
    """
    (prompt_ids, completion_ids + [eot]) for one training example; hint: the answer to show.
    complete=False leaves out the end token: a partial solution (stepdpo's cut rejected side).
    """
    p = hint_prompt(question, hint) if hint is not None else prompt(question)
    return tok.encode(p), tok.encode(completion_text) + ([tok.eot] if complete else [])


# -----------------------------------------------------------------------------
# files of a run: every write is atomic, so a crash leaves the last finished step intact


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_rows(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


RUN_ARGS = {"resume", "out_dir", "device", "threads", "gen_batch", "compile", "generate", "n_generate", "hide_thoughts"}  # may differ on resume


def start_run(args, name):
    """Pick the device and threads, open the run directory, log the settings; returns out_dir's path()."""
    args.device = model.autodetect_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    open_run(args)
    print(f"nanostar {name}: {json.dumps(vars(args))}")
    return lambda filename: os.path.join(args.out_dir, filename)


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
# solving questions with a model: sampling, grading, de-duplication (star.py and stepdpo.py)


def sample(m, tok, questions, args, k, temperature, seed, hints=None, desc="sample"):
    """
    k completions (decoded text) for each question, KV-cached and batched.
    hints: the answers to show in the prompt (rationalization), or None.
    Returns a list of len(questions) lists of k (text, finished) pairs.
    """
    from tqdm import tqdm

    g = model.make_generator(seed, m.lm_head.weight.device)
    prompts = [tok.encode(hint_prompt(q, h) if hints else prompt(q)) for q, h in zip(questions, hints or questions)]
    out = []
    per_batch = max(1, args.gen_batch // k)
    for i in tqdm(range(0, len(prompts), per_batch), desc=desc, leave=False, disable=None):
        chunk = prompts[i : i + per_batch]
        max_new = min(args.max_new_tokens, m.config.block_size - max(len(p) for p in chunk))
        s = model.generate(m, chunk, max_new, temperature, getattr(args, "top_k", None), tok.eot, g, num_samples=k)
        texts = [tok.decode(c) for c in s.completions()]
        fin = s.finished.tolist()
        for j in range(len(chunk)):
            out.append(list(zip(texts[j * k : (j + 1) * k], fin[j * k : (j + 1) * k])))
    return out


def correct(text, finished, answer):
    """A sample counts only if it ended by itself (not cut at the length limit) with the right answer."""
    return finished and is_correct(text, answer)


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
    (`reasoning_path`); among the samples of a path, the one farthest in edit distance from
    those already kept. Returns the kept texts, first-seen path first.
    """
    groups = {}
    for t in texts:
        groups.setdefault(reasoning_path(strip_answer(t)), []).append(t)
    kept = []
    for members in groups.values():
        if not kept or len(members) == 1:
            kept.append(members[0])
        else:
            kept.append(max(members, key=lambda t: min(edit_distance(t, k) for k in kept)))
    return kept


# -----------------------------------------------------------------------------
# fine-tuning and evaluation


def fine_tune(base_state, config, pairs, steps, args, seed, desc):
    """A fresh copy of the base weights fine-tuned on (prompt_ids, completion_ids) pairs."""
    torch.manual_seed(seed)
    m = model.GPT(config).to(args.device)
    m.load_state_dict(base_state)
    rng = random.Random(seed)
    order = []

    def get_batch(step, micro):
        batch = []
        while len(batch) < args.batch_size:
            if not order:  # shuffled epochs: every example is seen once before any is seen twice
                order.extend(rng.sample(range(len(pairs)), len(pairs)))
            batch.append(pairs[order.pop()])
        return collate(batch, config.block_size, args.device)

    cfg = model.TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=min(20, steps // 10), compile=args.compile)
    losses = model.train(m, get_batch, cfg, desc=desc)
    return m, losses[-1] if losses else float("nan")


def seed_pairs(tok, seed_set, answer_only=False):
    """The warm-start data: every seed example plain and, for rationalization, with its hint."""
    pairs = []
    for e in seed_set:
        text = completion("" if answer_only else e.rationale, e.answer)
        pairs.append(encode_example(tok, e.question, text))
        if not answer_only:
            pairs.append(encode_example(tok, e.question, text, hint=e.answer))
    return pairs


def majority(answers):
    """The most common parsed answer (ties: the first seen), or None."""
    answers = [a for a in answers if a is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def evaluate(m, tok, test, args, seed, scorer=None):
    """
    Greedy accuracy; with --eval_samples N also maj@N and pass@N; with a scorer (question,
    [completions]) -> [scores], the accuracy of the best-scored of the N (a verifier's best-of-N).
    """
    res = {}
    greedy = sample(m, tok, [e.question for e in test], args, 1, 0.0, seed, desc="eval greedy")
    res["acc"] = sum(correct(o[0][0], o[0][1], e.answer) for e, o in zip(test, greedy)) / len(test)
    if getattr(args, "eval_samples", 0) > 1:
        n = args.eval_samples
        outs = sample(m, tok, [e.question for e in test], args, n, args.eval_temperature, seed + 1, desc=f"eval {n} samples")
        maj, oracle, best = 0, 0, 0
        for e, o in zip(test, outs):
            ans = [extract_answer(t) if f else None for t, f in o]
            maj += answers_match(majority(ans), e.answer)
            oracle += any(correct(t, f, e.answer) for t, f in o)
        res[f"maj@{n}"], res[f"pass@{n}"] = maj / len(test), oracle / len(test)
        if scorer is not None:
            for e, o in zip(test, outs):
                scores = scorer(e.question, [t for t, _ in o])
                t, f = o[int(torch.tensor(scores).argmax())]
                best += correct(t, f, e.answer)
            res[f"verifier@{n}"] = best / len(test)
    return res


def base_block_size(args):
    """The context of the model the run starts from: --init's, --block_size, or the task's default."""
    if args.init:
        return model.load_checkpoint(args.init)[0].config.block_size
    return args.block_size or (1024 if args.dataset == "gsm8k" else 256)


# -----------------------------------------------------------------------------
# the setup every script shares: model and run flags, task loading, the warm start


def add_model_args(parser):
    g = parser.add_argument_group("model and warm start")
    g.add_argument("--init", default=None, help="start from this checkpoint instead of a warm start from scratch")
    g.add_argument("--n_layer", type=int, default=3, help="transformer blocks (from scratch)")
    g.add_argument("--n_embd", type=int, default=96, help="model width (from scratch)")
    g.add_argument("--n_head", type=int, default=4, help="attention heads (from scratch)")
    g.add_argument("--block_size", type=int, default=0, help="context length (from scratch; 0 = 256 for arithmetic, 1024 for gsm8k)")
    g.add_argument("--n_seed", type=int, default=256, help="worked examples for the warm start (taken from the train set)")
    g.add_argument("--warm_steps", type=int, default=1000, help="fine-tuning steps of the warm start")
    g.add_argument("--max_new_tokens", type=int, default=0, help="cut generations at this length (0 = from the task)")
    return g


def add_run_args(parser, out_dir):
    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--batch_size", type=int, default=32, help="sequences per training step")
    g.add_argument("--gen_batch", type=int, default=512, help="sequences per sampling batch")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g = parser.add_argument_group("run")
    g.add_argument("--out_dir", default=out_dir, help="where the run's files go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its last finished step")
    g.add_argument("--seed", type=int, default=1337, help="seed of init, sampling and batching")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return g


def prepare_task(args, tok):
    """
    Load the task, drop examples longer than the context (saying how many), split off the seed
    set, and set args.max_new_tokens from the task when it is 0. Returns (seed_set, questions,
    test, block_size).
    """
    train_set, test = task_from_args(args)
    block_size = base_block_size(args)
    fits = lambda e: len(tok.encode(hint_prompt(e.question, e.answer) + completion(e.rationale, e.answer))) + 1 <= block_size
    for name, split in (("train", train_set), ("test", test)):
        kept = [e for e in split if fits(e)]
        if len(kept) < len(split):
            print(f"dropped {len(split) - len(kept)} of {len(split)} {name} examples longer than block_size {block_size}")
        split[:] = kept
    if args.n_seed >= len(train_set):
        sys.exit(f"--n_seed {args.n_seed} leaves no training questions out of {len(train_set)}")
    if args.max_new_tokens == 0:  # room for the longest gold solution, and a quarter more
        longest = max(len(tok.encode(completion(e.rationale, e.answer))) for e in train_set)
        args.max_new_tokens = min(int(longest * 1.25) + 8, block_size)
    seed_set, questions = train_set[: args.n_seed], train_set[args.n_seed :]
    print(f"task {args.dataset}: {len(seed_set)} seed, {len(questions)} train questions, {len(test)} test; "
          f"generations cut at {args.max_new_tokens} tokens")
    return seed_set, questions, test, block_size


def warm_start(args, tok, seed_set, block_size, path, answer_only=False):
    """
    The base model: loaded from `path` if a run already made it, else --init, else a fresh
    model fine-tuned on the seed set (plain and hinted). Saved to `path` either way.
    """
    t0 = time.time()
    if os.path.exists(path):
        print(f"resumed: warm-start model from {path}")
        return model.load_checkpoint(path, args.device)[0]
    if args.init:
        base, _ = model.load_checkpoint(args.init, args.device)
        model.save_checkpoint(path, base)
        return base
    config = model.GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_kv_head=args.n_head, n_embd=args.n_embd)
    torch.manual_seed(args.seed)
    init_state = model.GPT(config).state_dict()
    base, loss = fine_tune(init_state, config, seed_pairs(tok, seed_set, answer_only), args.warm_steps, args, args.seed, "warm start")
    model.save_checkpoint(path, base)
    print(f"warm start: {base.num_params():,} parameters, {args.warm_steps} steps, loss {loss:.4f}, {time.time() - t0:.0f}s")
    return base


# -----------------------------------------------------------------------------
# DPO training (star.py's verifier, stepdpo.py)


def reference_logprobs(ref, pairs, args, block_size):
    """Summed log-probs under the frozen reference of every (chosen, rejected) pair, once, no grad."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), args.gen_batch):
            seqs = [s for pair in pairs[i : i + args.gen_batch] for s in pair]  # c0, r0, c1, r1, ...
            x, y = collate(seqs, block_size, args.device)
            with model.autocast(args.device):
                lp = model.sequence_logprobs(ref, x, y).float()
            out.append(lp.view(-1, 2))
    return torch.cat(out).cpu()  # (n_pairs, 2): chosen, rejected


def dpo_train(base_state, config, pairs, steps, lr, beta, args, seed, sft_weight=0.0, desc="DPO"):
    """
    DPO from the base weights; the frozen base model is the reference, its log-probs computed
    once before training. pairs: list of (chosen, rejected), each a (prompt_ids, completion_ids)
    as from encode_example (a completion without <|endoftext|> is a partial solution).
    sft_weight adds that times the mean token NLL of the chosen side. Returns (model, last loss).
    """
    ref = model.GPT(config).to(args.device)
    ref.load_state_dict(base_state)
    ref_lp = reference_logprobs(ref, pairs, args, config.block_size)
    del ref
    torch.manual_seed(seed)
    m = model.GPT(config).to(args.device)
    m.load_state_dict(base_state)
    rng = random.Random(seed)
    n = max(1, min(args.batch_size // 2, len(pairs)))

    def get_batch(step, micro):
        idx = rng.sample(range(len(pairs)), n)
        x, y = collate([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], config.block_size, args.device)
        return x, y, ref_lp[idx].to(args.device)

    def loss_fn(m, batch):
        x, y, ref = batch
        _, tok_loss = m(x, targets=y)
        lp = -(tok_loss * (y != -1)).sum(dim=1)  # = model.sequence_logprobs, sharing the forward with the SFT term
        loss, metrics = model.dpo_loss(lp[:n], lp[n:], ref[:, 0], ref[:, 1], beta)
        if sft_weight:
            chosen = y[:n] != -1
            loss = loss + sft_weight * (tok_loss[:n] * chosen).sum() / chosen.sum()
        return loss, metrics

    cfg = model.TrainConfig(steps=steps, batch_size=2 * n, lr=lr, warmup=min(20, steps // 10), compile=args.compile)
    losses = model.train(m, get_batch, cfg, loss_fn=loss_fn, desc=desc)
    return m, losses[-1] if losses else float("nan")
