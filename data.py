"""
Text, and only text: the byte-level tokenizer (a pretrained tokenizer.json is hf.py's), the
tasks, the solution format, answer parsing and grading, encoding and batching. It never
imports model.py and never reads an argparse namespace; the steps that run a model live in
loop.py.

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
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import tiktoken
import torch


class InputError(ValueError):
    """Bad input from the user (a data file, a flag, an unreachable hub): one line, no traceback."""

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
        self.stop_tokens = [self.eot]
        self.bos = []  # no begin-of-sequence token: a sequence starts with its text
        self.vocab_size = self.enc.n_vocab
        self.source = None  # built here, from no file

    def encode(self, text):
        """Encode untrusted text: a literal '<|endoftext|>' in it stays plain text, never a special token."""
        return self.enc.encode(text, disallowed_special=())

    def encode_with_specials(self, text):
        """Encode text we wrote ourselves, where special-token strings mean the special tokens."""
        return self.enc.encode(text, allowed_special="all")

    def encode_prompt(self, text):
        """The ids a sequence starts with: the tokenizer's BOS (none here), then the untrusted text."""
        return self.bos + self.encode(text)

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


EXEMPLAR_SEP = "\n\n"  # between the worked examples of a few-shot prompt


def few_shot_prefix(exemplars, hint=False):
    """
    STaR's few-shot prompt: worked examples in the solution format, each followed by a blank
    line, put before the question. hint=True: the rationalization exemplars, each with its
    answer given as a hint, as the STaR paper's hinted prompt.
    """
    head = lambda e: hint_prompt(e.question, e.answer) if hint else prompt(e.question)
    return "".join(head(e) + completion(e.rationale, e.answer) + EXEMPLAR_SEP for e in exemplars)


def blank_line_table(tok):
    """
    (tok.vocab_size, 3) bool: for each id, whether its text starts with '\n', ends with '\n',
    and holds a blank line ('\n\n'), so a sampler can see where a row's text first holds a
    blank line without decoding it: at a token that holds one, or that starts with '\n' after
    one that ended with it. Bytes stand for text here: a '\n' byte decodes to '\n' and no
    other byte does, even in broken UTF-8. Ids without bytes (gaps in a vocab) are all False.
    """
    if getattr(tok, "_blank_line_table", None) is None:
        table = torch.zeros(tok.vocab_size, 3, dtype=torch.bool)
        for i in range(tok.vocab_size):
            try:
                b = tok.enc.decode_single_token_bytes(i)
            except KeyError:
                continue
            table[i, 0], table[i, 1], table[i, 2] = b.startswith(b"\n"), b.endswith(b"\n"), b"\n\n" in b
        tok._blank_line_table = table
    return tok._blank_line_table


def completion(rationale, answer):
    """What the model writes after the prompt: the steps, then the answer line."""
    return f"{rationale}\n{ANSWER_MARK}{answer}" if rationale else f"{ANSWER_MARK}{answer}"


# a minus sign may be ASCII '-', the Unicode minus U+2212, or a dash (hyphen, figure dash, en/em
# dash, small and fullwidth hyphen-minus): all of them mean minus before a number, never plus
MINUS_SIGNS = "-\u2212\u2010\u2011\u2012\u2013\u2014\ufe63\uff0d"
# a sign may stand apart from its number ('- 18'); an exponent is read as one ('1e3' is 1000)
_NUMBER = re.compile(f"(?:[{MINUS_SIGNS}][ \\t]*)?\\$?(?:\\d[\\d,]*(?:\\.\\d+)?|\\.\\d+)(?:[eE][+-]?\\d+)?")
MAX_EXPONENT = 100  # beyond this an 'answer' is no number a question asks for (and 1e999999999 would print 10^9 digits)


def parse_number(text):
    """
    The first number in text as a Decimal ('1,234' -> 1234, '$5.50' -> 5.50, '\u22125' and '- 5'
    -> -5, '1e3' -> 1000), or None (also for an exponent beyond MAX_EXPONENT).
    """
    m = _NUMBER.search(text)
    if m is None:
        return None
    s = m.group(0)
    sign = "-" if s[0] in MINUS_SIGNS else ""
    try:
        d = Decimal(sign + s.lstrip(MINUS_SIGNS + " \t").replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    if d == 0:
        return Decimal(0)  # also '-0' and '0e500'
    return d if abs(d.adjusted()) <= MAX_EXPONENT else None


def number_text(d):
    """A Decimal as plain text without exponent or trailing zeros: 1200 -> '1200', 0.50 -> '0.5'."""
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def extract_answer(text):
    """The number on the line after the last '####' of a completion, or None if there is none."""
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


def answer_correct(completion_text, gold_answer):
    """The completion's '#### ' answer equals the gold answer (whether or not the sample finished)."""
    return answers_match(extract_answer(completion_text), gold_answer)


def sample_correct(completion_text, finished, gold_answer):
    """How every script grades a sample: it ended by itself (not cut at the length limit) with the right answer."""
    return finished and answer_correct(completion_text, gold_answer)


def majority(answers):
    """The most common parsed answer (ties: the first seen), or None."""
    answers = [a for a in answers if a is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def split_steps(text):
    """
    A completion's steps: one per line, each keeping its '\\n', so ''.join(steps) == text.
    Only '\\n' ends a step (str.splitlines would also split at '\\r', '\\x1d', '\\u2028', ... that a
    sampled solution may contain).
    """
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


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
        raise InputError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(f"arithmetic-{seed}")

    def draw_one():
        a, b = _random_number(rng, min_digits, max_digits), _random_number(rng, min_digits, max_digits)
        return (a, b), lambda: Example(f"{a}+{b}", str(a + b), addition_rationale(a, b))

    return distinct_sets(draw_one, n_train, n_test, f"questions with {min_digits}-{max_digits} digits")


def distinct_sets(draw_one, n_train, n_test, what):
    """
    (train, test) of distinct questions, the test set drawn first and no train question
    repeating a test one. draw_one() -> (key, make): the question's identity, and a function
    that builds its Example (called only for a new key).
    """
    seen = set()

    def draw(n):
        out = []
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            key, make = draw_one()
            if key not in seen:
                seen.add(key)
                out.append(make())
        if len(out) < n:
            raise InputError(f"only {len(out)} distinct {what}, asked for {n}")
        return out

    test = draw(n_test)
    return draw(n_train), test


# -----------------------------------------------------------------------------
# task: word problems (templated, several solution paths)

# Each template draws its numbers and returns the question and its terms: the answer is the
# sum of the terms, each a chain evaluated left to right ([9, "*", 4] is 9*4; a leading "-"
# subtracts the term). The story's wording is GSM8K-like; the numbers stay small enough for a
# model trained from scratch to do each step in one line.

_NAMES = [("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dev", "he"), ("Eve", "she"), ("Finn", "he"), ("Gia", "she"),
          ("Hugo", "he")]
_ITEMS = ["apples", "pens", "stickers", "marbles", "cards", "shells", "books", "beads"]


def _buy_give(r):
    (name, he), item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b, c = r.randint(1, 30), r.randint(2, 9), r.randint(2, 12)
    d = r.randint(2, min(20, a + b * c))  # answers are never negative
    return (f"{name} has {a} {item}. {he.capitalize()} buys {b} packs of {c} {item} and gives away {d}. "
            f"How many {item} does {name} have now?", [[a], [b, "*", c], ["-", d]])


def _bakery(r):
    a, b, c, d = r.randint(2, 9), r.randint(2, 12), r.randint(2, 9), r.randint(2, 12)
    e = r.randint(2, min(30, a * b + c * d))
    return (f"A baker makes {a} trays of {b} rolls and {c} trays of {d} buns. {e} are sold. "
            f"How many rolls and buns are left?", [[a, "*", b], [c, "*", d], ["-", e]])


def _wages(r):
    name, _ = r.choice(_NAMES)
    a, b, c = r.randint(2, 12), r.randint(2, 9), r.randint(2, 30)
    d = r.randint(2, min(30, a * b + c))
    return (f"{name} earns {a} dollars an hour for {b} hours and gets {c} dollars in tips, then spends {d} dollars. "
            f"How many dollars does {name} have left?", [[a, "*", b], [c], ["-", d]])


def _groups(r):
    b, c, d = r.randint(2, 6), r.randint(2, 9), r.randint(1, 20)
    a = b * r.randint(2, 8)
    return (f"A class of {a} students splits into groups of {b}. Each group gets {c} markers and the teacher "
            f"keeps {d}. How many markers are there in all?", [[a, "/", b, "*", c], [d]])


def _farm(r):
    a, b, d = r.randint(2, 9), r.randint(2, 12), r.randint(1, 20)
    c = r.randint(2, min(15, a * b))
    return (f"A farm has {a} pens of {b} sheep. {c} sheep are sold and {d} lambs are born. "
            f"How many sheep are on the farm now?", [[a, "*", b], ["-", c], [d]])


def _reading(r):
    name, _ = r.choice(_NAMES)
    a, b, c, d = r.randint(2, 12), r.randint(2, 9), r.randint(2, 12), r.randint(2, 9)
    e = a * b + c * d + r.randint(1, 60)
    return (f"{name}'s book has {e} pages. {name} reads {a} pages a day for {b} days, then {c} pages a day "
            f"for {d} days. How many pages are left?", [[e], ["-", a, "*", b], ["-", c, "*", d]])


WORD_TEMPLATES = [_buy_give, _bakery, _wages, _groups, _farm, _reading]


def _apply(x, op, y):
    return x * y if op == "*" else x // y if op == "/" else x + y if op == "+" else x - y


def word_solution(terms, r):
    """
    One solution path, drawn at random among the valid ones: any order that computes each
    chain's steps in turn and adds or subtracts finished terms into a running total that never
    goes below zero. Returns (rationale, answer): one "x*y=z" style line a step.
    """
    chains = []  # [sign, value so far, remaining (op, number) steps]
    for t in terms:
        sign, t = (-1, t[1:]) if t[0] == "-" else (1, t)
        chains.append([sign, t[0], list(zip(t[1::2], t[2::2]))])
    lines, total = [], None
    while chains:
        moves = [("step", c) for c in chains if c[2]]
        moves += [("add", c) for c in chains if not c[2] and (c[0] > 0 or (total is not None and total >= c[1]))]
        kind, c = r.choice(moves)
        if kind == "step":
            op, y = c[2].pop(0)
            z = _apply(c[1], op, y)
            lines.append(f"{c[1]}{op}{y}={z}")
            c[1] = z
            continue
        chains.remove(c)
        if total is None:
            total = c[1]
            continue
        op = "+" if c[0] > 0 else "-"
        z = _apply(total, op, c[1])
        lines.append(f"{total}{op}{c[1]}={z}")
        total = z
    return "\n".join(lines), str(total)


def word_problem_task(n_train=4000, n_test=500, seed=0):
    """
    Train/test sets of templated multi-step word problems (two to four steps of +, -, *, /)
    whose gold rationales take a random one of their valid paths, so the model sees, and can
    sample, several right solutions of a question. Deterministic in seed; no train question
    repeats a test one.
    """
    rng = random.Random(f"word-{seed}")

    def draw_one():
        question, terms = rng.choice(WORD_TEMPLATES)(rng)

        def make():
            rationale, answer = word_solution(terms, rng)
            return Example(question, answer, rationale)

        return question, make

    return distinct_sets(draw_one, n_train, n_test, "word problems")


# -----------------------------------------------------------------------------
# task: gsm8k


def gsm8k_example(record, where):
    """
    A GSM8K record {'question', 'answer'} -> Example; `where` names the file:line for errors.
    The gold answer is read by the same parser that grades samples and stored normalized
    ('$1,234' -> '1234'), so the record's own solution always grades as correct.
    """
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise InputError(f"{where}: missing or non-text field '{key}'")
    text = record["answer"]
    i = text.rfind(ANSWER_MARK.strip())
    gold = extract_answer(text)
    if gold is None:
        raise InputError(f"{where}: answer has no '#### <number>' final line")
    return Example(record["question"].strip(), number_text(gold), text[:i].strip())


def read_jsonl(path):
    """Examples from a GSM8K-format JSONL file; bad input is an InputError naming file and line."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(gsm8k_example(record, f"{path}:{n}"))
    if not out:
        raise InputError(f"{path}: the file is empty")
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
        raise InputError(
            f"cannot reach {HUB_HOST} to download openai/gsm8k; pass --data_dir DIR with a local "
            "train.jsonl and test.jsonl (GSM8K's own format) instead"
        )
    from datasets import load_dataset

    ds = load_dataset("openai/gsm8k", "main")
    return tuple([gsm8k_example(r, f"openai/gsm8k {split}[{i}]") for i, r in enumerate(ds[split])]
                 for split in ("train", "test"))


def load_task(dataset, data_dir=None, n_train=4000, n_test=0, min_digits=1, max_digits=5, seed=0):
    """
    (train, test) lists of Examples. n_test 0 means the task's default: 500 generated
    arithmetic questions, or GSM8K's full 1,319-question test set (the only size whose
    accuracy is comparable with published figures).
    """
    if dataset == "arithmetic":
        return arithmetic_task(n_train, n_test or 500, min_digits, max_digits, seed)
    if dataset == "word_problems":
        return word_problem_task(n_train, n_test or 500, seed)
    if dataset == "gsm8k":
        train, test = gsm8k_task(data_dir)
        return train[:n_train], test[: n_test or len(test)]
    raise InputError(f"unknown dataset {dataset!r}: arithmetic, word_problems or gsm8k")


# -----------------------------------------------------------------------------
# batching


def check_fits(length, block_size, what="sequence"):
    if length > block_size:
        raise ValueError(f"{what} of {length} tokens is longer than the model's block_size of {block_size}")


def fit(pairs, block_size):
    """
    (prompt_ids, completion_ids) pairs with each completion cut so the sequence fits block_size
    (+1: the last token is only a target). A sample that filled the context can come back longer
    when its decoded text is encoded again: a broken UTF-8 byte decodes to U+FFFD, three bytes.
    """
    return [(p, c[: max(0, block_size + 1 - len(p))]) for p, c in pairs]


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


def pack(pairs, block_size, device="cpu"):
    """
    The same examples as `collate`, packed: several short sequences share a row, so the step
    computes on far fewer padding tokens (on the arithmetic task a random batch of 32 is ~28%
    padding). Rows are as long as the longest sequence, filled first-fit, longest first.
    Returns x, y (R, T) as collate's, pos (R, T): each sequence's positions start at 0, and
    mask (R, 1, T, T) bool: a token attends causally within its own sequence only (a padding
    slot to itself). With this mask and these positions every scored token sees exactly
    what it sees in collate's row, so the loss is the same up to float rounding.
    """
    seqs = [p + c for p, c in pairs]
    T = max(len(s) for s in seqs) - 1
    check_fits(T, block_size, "training sequence (minus its last token)")
    rows = []  # [used, [example index, ...]]
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        n = len(seqs[i]) - 1
        row = next((r for r in rows if r[0] + n <= T), None)
        if row is None:
            row = [0, []]
            rows.append(row)
        row[0] += n
        row[1].append(i)
    R = len(rows)
    x = torch.zeros(R, T, dtype=torch.long)
    y = torch.full((R, T), -1, dtype=torch.long)
    pos = torch.zeros(R, T, dtype=torch.long)
    doc = torch.full((R, T), -1, dtype=torch.long)  # which sequence of the row a slot holds; -1 = padding
    for r, (_, members) in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            (p, c), s = pairs[i], seqs[i]
            n = len(s) - 1
            x[r, at : at + n] = torch.tensor(s[:-1])
            y[r, at + len(p) - 1 : at + n] = torch.tensor(c)
            pos[r, at : at + n] = torch.arange(n)
            doc[r, at : at + n] = d
            at += n
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    mask = (same & torch.ones(T, T, dtype=torch.bool).tril()) | torch.eye(T, dtype=torch.bool)
    return x.to(device), y.to(device), pos.to(device), mask.unsqueeze(1).to(device)


def encode_example(tok, question, completion_text, hint=None, complete=True):
    """
    (prompt_ids, completion_ids + [eot]) for one training example; hint: the answer to show.
    complete=False leaves out the end token: a partial solution (stepdpo's cut rejected side).
    """
    p = hint_prompt(question, hint) if hint is not None else prompt(question)
    return tok.encode_prompt(p), tok.encode(completion_text) + ([tok.eot] if complete else [])


def seed_pairs(tok, seed_set, answer_only=False):
    """The warm-start data: every seed example plain and, for rationalization, with its hint."""
    pairs = []
    for e in seed_set:
        text = completion("" if answer_only else e.rationale, e.answer)
        pairs.append(encode_example(tok, e.question, text))
        if not answer_only:
            pairs.append(encode_example(tok, e.question, text, hint=e.answer))
    return pairs
