"""
The steps of the self-taught loop that the method scripts share, each taking explicit values
(prompts, k, temperature, max_new_tokens, batch size, seed, device), never an argparse
namespace. What makes each method itself stays in its own script: STaR's filter and
rationalization and the verifier's scores in star.py, Q values and critical steps in
stepdpo.py, thoughts in quietstar.py.

- the command line: the flag groups every script uses, and `run_cli`, which turns bad input
  into one line on stderr and exit status 1
- the run directory: `Run` (a new run, or --resume of the same settings; atomic writes; stages
  computed once and read back, so that resuming is running main() again), and `setup`, what
  star.py and stepdpo.py do before their method's first step
- `sample`: k completions per prompt, KV-cached and batched (star.py's generation and
  rationalization, stepdpo.py's solutions and Monte-Carlo rollouts, evaluation)
- `fine_tune` (SFT from the base weights) and `dpo_train` (DPO against the frozen base)
- `evaluate`: greedy accuracy, maj@N and pass@N (`tally` also scores best-of-N)
- `prepare_task`, `split_validation` and `warm_start`: the task cut to the context, the
  validation split, and the base model

Run as a script, `python loop.py` makes the one table: every method's script run from one
base model per seed, read back into table.md (see the end of this file).
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import data
import model

# -----------------------------------------------------------------------------
# the command line


def at_least(lo, kind=int, at_most=None):
    """
    An argparse type: a number of this kind in [lo, at_most]. A flag out of range is a usage
    error before anything runs, not a failure after the warm start (--gen_batch 0) or a silent
    misuse (a negative temperature samples from the reversed distribution).
    """
    need = f"at least {lo}" if at_most is None else f"between {lo} and {at_most}"
    return _number(kind, lambda x: lo <= x and (at_most is None or x <= at_most), need)  # written so that nan fails too


def more_than(lo, kind=float):
    """An argparse type: a number of this kind above lo (a learning rate, a beta, a temperature that divides)."""
    return _number(kind, lambda x: x > lo, f"above {lo}")


def _number(kind, ok, need):
    def parse(text):
        x = kind(text)  # a ValueError here is argparse's "invalid int value"
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return x

    parse.__name__ = kind.__name__
    return parse


def add_task_args(parser):
    g = parser.add_argument_group("task")
    g.add_argument("--dataset", default="arithmetic", choices=["arithmetic", "word_problems", "gsm8k"],
                   help="which task to learn: n-digit addition, templated multi-step word problems (both generated "
                       "here), or GSM8K")
    g.add_argument("--data_dir", default=None,
                   help="gsm8k: local directory with train.jsonl and test.jsonl (skips the hub)")
    g.add_argument("--n_train", type=at_least(1), default=4000,
                   help="training questions used (gsm8k: at most this many)")
    g.add_argument("--n_test", type=at_least(0), default=0,
                   help="test questions (0 = 500 generated, all 1,319 for gsm8k)")
    g.add_argument("--min_digits", type=at_least(1), default=1, help="arithmetic: fewest digits per operand")
    g.add_argument("--max_digits", type=at_least(1), default=5, help="arithmetic: most digits per operand")
    g.add_argument("--data_seed", type=int, default=0,
                   help="arithmetic, word_problems: seed of the generated train/test sets")
    return g


def task_from_args(args):
    """(train, test) lists of Examples for the task flags above."""
    return data.load_task(args.dataset, args.data_dir, args.n_train, args.n_test, args.min_digits, args.max_digits,
                          args.data_seed)


DEFAULT_PRETRAINED = "Qwen/Qwen2.5-0.5B"  # Apache-2.0, 0.49B parameters; its authors report 41.6% on GSM8K (4-shot)


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--init", default="auto",
                   help="where the model starts: 'scratch' (train a small model here), a nanostar "
                   "checkpoint, a Hugging Face model directory, or a hub repo id; auto = scratch for arithmetic, "
                   f"{DEFAULT_PRETRAINED} for gsm8k")
    g.add_argument("--n_layer", type=at_least(1), default=3, help="transformer blocks (from scratch)")
    g.add_argument("--n_embd", type=at_least(1), default=96, help="model width (from scratch)")
    g.add_argument("--n_head", type=at_least(1), default=4, help="attention heads (from scratch)")
    g.add_argument("--block_size", type=at_least(0), default=0,
                   help="context length: from scratch its size (0 = the script's default); "
                   "pretrained a cap on it, which keeps the rotary table and caches small (0 = 2048)")
    return g


# worked examples for a model from scratch: chosen on the validation split over three seeds (256 before)
SCRATCH_N_SEED = 1024
# a pretrained model's few-shot pool (it takes 4); the rest of the train set stays STaR's questions
PRETRAINED_N_SEED = 256


def add_warm_start_args(parser):
    g = parser.add_argument_group("warm start and sampling")
    g.add_argument("--n_seed", type=at_least(0), default=None,
                   help="worked examples, taken from the train set: the warm start's data and in every fine-tune "
                   f"(a model from scratch, default {SCRATCH_N_SEED}), or the few-shot prompt's pool (pretrained, "
                   f"default {PRETRAINED_N_SEED})")
    g.add_argument("--warm_steps", type=at_least(0), default=1000, help="fine-tuning steps of the warm start")
    g.add_argument("--warm_lr", type=more_than(0), default=None,
                   help="peak learning rate of the warm start (default: --lr)")
    g.add_argument("--warm_holdout", type=at_least(0), default=0,
                   help="seed examples held out of the warm start: it keeps the weights "
                   "where their NLL was lowest (early stopping; 0 = train on all, keep the last weights)")
    g.add_argument("--max_new_tokens", type=at_least(0), default=0,
                   help="cut generations at this length (0 = from the task)")
    g.add_argument("--gen_batch", type=at_least(1), default=512, help="sequences per sampling batch")
    g.add_argument("--few_shot", type=at_least(-1), default=-1,
                   help="worked examples from the seed set in every sampling prompt "
                   "(STaR's few-shot prompt; -1 = 4 for a pretrained Hugging Face model, 0 otherwise, which "
                   "fine-tunes on them instead)")
    return g


PRETRAINED_LR = 1e-5  # full fine-tuning of a pretrained model; the from-scratch rates below would wreck its weights


def add_run_args(parser, out_dir, compile_flag=True, scratch_lr=3e-3):
    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=more_than(0), default=None,
                   help=f"peak learning rate (default: {scratch_lr:g} for a model trained "
                   f"here from scratch, {PRETRAINED_LR:g} for a pretrained model or a checkpoint tuned from one)")
    parser.set_defaults(scratch_lr=scratch_lr)
    g.add_argument("--batch_size", type=at_least(1), default=32,
                   help="sequences per training step (under torchrun: split across the processes)")
    g.add_argument("--grad_accum", type=at_least(1), default=1, help="micro-batches of --batch_size per optimizer step")
    g.add_argument("--lora_rank", type=at_least(0), default=0,
                   help="train low-rank adapters of this rank on a frozen base instead of every weight (0 = off)")
    g.add_argument("--lora_alpha", type=more_than(0), default=None, help="LoRA's scale is alpha / rank (default: 2 x "
                   "rank)")
    g.add_argument("--lora_targets", default=",".join(model.LORA_TARGETS),
                   help="the projections that get adapters, comma-separated")
    if compile_flag:
        g.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the model being fine-tuned across the GPUs "
                       "(FSDP2) for weights, gradients and optimizer state that do not fit one; default: data "
                       "parallel, a full copy each")
        g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
        g.add_argument("--compile_sampler", action="store_true",
                       help="torch.compile the one-token decode step (CUDA graphs on a GPU); "
                       "each new batch shape compiles again, so it pays off only for long sampling at few shapes")
    g = parser.add_argument_group("run")
    g.add_argument("--out_dir", default=out_dir, help="where the run's files go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its last finished step "
                   "(with the same settings; star.py's --iters may be raised to run more iterations)")
    g.add_argument("--seed", type=int, default=1337, help="seed of init, sampling and batching")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    g.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0 = torch's default)")
    return g


def run_cli(main, args):
    """
    Run a script's main; bad input (a data file, a checkpoint, a flag) ends it with one line and
    exit status 1. Under torchrun every rank runs it (see "several processes" below).
    """
    try:
        return main(args)
    except (data.InputError, model.CheckpointError) as e:
        sys.exit(f"error: {e}")
    finally:
        if distributed():
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# -----------------------------------------------------------------------------
# several processes: `torchrun --nproc_per_node N script.py ...`
#
# Every rank runs the whole script and holds the same data. Sampling, rationalization,
# rollouts and evaluation split the prompts across ranks (prompt i goes to rank i % N) and
# gather the results back in prompt order; each prompt's sampling noise comes from its own
# counter-based key (model.noise_keys), so its samples do not depend on the rank or batch it
# lands in. Training splits every micro-batch across ranks and averages the gradients (data
# parallel), or shards the model (FSDP2, --fsdp); the global batch is the same for any N.
# Rank 0 alone prints and writes files. Without torchrun none of this runs.


def rank_world():
    """(rank, number of processes): (0, 1) unless started by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def distributed():
    return rank_world()[1] > 1


def is_main():
    return rank_world()[0] == 0


def barrier():
    """Wait for every rank (after rank 0 wrote a file the others will read)."""
    if distributed():
        import torch.distributed as dist

        dist.barrier()


def my_rows(n, what="a batch"):
    """
    The rows of a global micro-batch of n that this process trains on: row i on rank i mod N
    (all of them in one process). Every rank draws the same batch, so nothing is sent.
    """
    rank, world = rank_world()
    if n < world:
        raise data.InputError(f"{what} of {n} cannot be split across {world} processes: pass a larger --batch_size")
    return list(range(rank, n, world))


def share(weights, rows):
    """
    What this process's loss is multiplied by, so that the mean over processes is the whole
    batch's loss: N times its rows' part of the weights (scored tokens, pairs, rows). 1 alone.
    """
    return rank_world()[1] * sum(weights[i] for i in rows) / sum(weights)


def init_distributed(device):
    """Join torchrun's process group: NCCL with one GPU per rank, else gloo on CPU. Returns this rank's device."""
    import torch._dynamo  # noqa: F401  before the group: imported after it (as AdamW does), it keeps the group alive
    import torch.distributed as dist  # past destroy_process_group, and gloo's threads can then abort the exit

    rank, world = rank_world()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if not os.environ.get("OMP_NUM_THREADS"):  # the node's cores shared out, not each rank on all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if rank != 0:  # rank 0 speaks for the job; the others' errors still reach stderr
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"
    return device


def gather_in_order(mine, n):
    """Each rank's results for prompts rank, rank + N, ... -> the n results in prompt order, on every rank."""
    rank, world = rank_world()
    if world == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = [None] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


# -----------------------------------------------------------------------------
# the run directory: every write is atomic, so a crash leaves the last finished step intact


def write_atomic(path, text):
    """Write text to path through a temporary file (rank 0 only; every rank waits for it)."""
    if is_main():
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    barrier()


def exists_and_wait(path):
    """os.path.exists for the run directory, after which every rank waits: no rank looks after rank 0 has written it."""
    found = os.path.exists(path)
    barrier()
    return found


def save_checkpoint(path, gpt, **meta):
    """model.save_checkpoint on rank 0; every rank waits for it."""
    if is_main():
        model.save_checkpoint(path, gpt, **meta)
    barrier()


def write_rows(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# settings that may change when a run is resumed: where and how it runs, not what it computes
# iters: a finished run may be continued for more iterations
MAY_DIFFER_ON_RESUME = {"resume", "out_dir", "device", "threads", "gen_batch", "compile", "compile_sampler",
                        "generate", "n_generate", "hide_thoughts", "fsdp", "iters"}


class Run:
    """
    A run directory: config.json (on --resume the settings must match), atomic writes, and
    stages computed once. `run.cached(names, compute)` reads a stage back when the last of its
    files exists, else computes it and writes its files in order, the last one last: its
    presence means the stage finished. Resuming a killed run is running main() again.

    A directory holding nothing but config.json is a run that stopped before its first result
    (a bad --init, data not found): it starts afresh, so the corrected command runs as typed.
    """

    def __init__(self, out_dir, settings, resume, name):
        self.out_dir = out_dir
        cfg_path = self.path("config.json")
        if exists_and_wait(cfg_path) and os.listdir(out_dir) != ["config.json"]:
            if not resume:
                raise data.InputError(f"{out_dir} already holds a run: pass --resume to continue it, or "
                                      "another --out_dir")
            with open(cfg_path) as f:
                theirs = json.load(f)
            keys = (set(theirs) | set(settings)) - MAY_DIFFER_ON_RESUME
            diff = {k: (theirs.get(k), settings.get(k)) for k in sorted(keys) if theirs.get(k) != settings.get(k)}
            if diff:
                raise data.InputError(f"--resume with other settings than the run in {out_dir} (was, now): {diff}")
        else:
            if is_main():
                os.makedirs(out_dir, exist_ok=True)
            write_atomic(cfg_path, json.dumps(settings, indent=2))
        print(f"nanostar {name}: {json.dumps(settings)}")

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def exists(self, name):
        return exists_and_wait(self.path(name))

    def read(self, name):
        """A .jsonl file's rows, or a .json file's one object."""
        if name.endswith(".json"):
            return json.loads(Path(self.path(name)).read_text())
        return read_rows(self.path(name))

    def write(self, name, rows):
        if name.endswith(".json"):
            write_atomic(self.path(name), json.dumps(rows))
        else:
            write_rows(self.path(name), rows)

    def save(self, name, gpt, **meta):
        save_checkpoint(self.path(name), gpt, **meta)

    def load(self, name, device):
        return model.load_checkpoint(self.path(name), device)[0]

    def cached(self, names, compute):
        """compute() -> what each named file holds (rows, one .json object, or None: no file); read back instead
        when the last file exists."""
        if self.exists(names[-1]):
            print(f"resumed: {', '.join(names)}")
            return [self.read(n) if self.exists(n) else None for n in names]
        out = compute()
        for name, rows in zip(names, out):
            if rows is not None:
                self.write(name, rows)
        return out


def setup_device(device, threads):
    """
    The device to run on ('auto' picks cuda when there is one) after setting torch's CPU
    threads; under torchrun also joins the process group (each rank gets its own GPU).
    """
    device = model.autodetect_device(device)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise data.InputError(f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= gpus:
        raise data.InputError(f"--device {device}: torch sees {gpus} CUDA GPU{'s' * (gpus != 1)} here (use "
                              "--device cpu)")
    if distributed():
        device = init_distributed(device)
    if threads:
        torch.set_num_threads(threads)
    return device


# -----------------------------------------------------------------------------
# where a model starts: from scratch, a nanostar checkpoint, or pretrained Hugging Face weights

HF_FILES = ["config.json", "generation_config.json", "tokenizer.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_init(init, dataset):
    """
    --init -> None (train from scratch), a nanostar checkpoint file, or a local Hugging Face
    model directory (a hub repo id is downloaded first, only the files nanostar reads).
    """
    if init == "auto":
        init = DEFAULT_PRETRAINED if dataset == "gsm8k" else "scratch"
    if init == "scratch":
        return None
    if os.path.isfile(init) or os.path.isfile(os.path.join(init, "config.json")):
        return init
    if os.path.exists(init) or init.startswith((".", "/", "~")) or init.count("/") != 1:
        raise data.InputError(f"--init {init}: not a nanostar checkpoint, a directory with config.json, or a "
                              "hub repo id")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline or not data.hub_reachable():
        raise data.InputError(f"cannot reach {data.HUB_HOST} to download {init}; pass --init DIR, a local directory "
                              "with config.json, *.safetensors, tokenizer.json (and generation_config.json), or "
                              "--init scratch")
    from huggingface_hub import snapshot_download

    print(f"downloading {init} ({', '.join(HF_FILES)})")
    return snapshot_download(init, allow_patterns=HF_FILES)


def is_pretrained(init):
    """A Hugging Face model directory (as opposed to scratch or a nanostar checkpoint)."""
    return init is not None and os.path.isdir(init)


def tokenizer_for(init):
    """
    The byte-level tokenizer, or the tokenizer.json of a pretrained model (also one a nanostar
    checkpoint was tuned from: its tokenizer_dir). Checkpoints made with it record tok.source.
    """
    source = init if is_pretrained(init) else None
    if init and not source:
        source = model.checkpoint_config(init)[1].get("tokenizer_dir")
    if not source:
        return data.Tokenizer()
    import hf  # the optional piece (hf.py), loaded only for a pretrained tokenizer

    return hf.HFTokenizer(source)


def by_origin(value, pretrained, scratch_value, pretrained_value, flag):
    """The flag's value if given, else its default for where the weights come from: pretrained, or from scratch."""
    if value is None:
        value = pretrained_value if pretrained else scratch_value
        print(f"{flag} {value:g} ({'pretrained model' if pretrained else 'from scratch'}; pass {flag} to change it)")
    return value


def learning_rate(lr, tok, scratch_lr, pretrained_lr=PRETRAINED_LR, flag="--lr"):
    """By where the weights come from: a model with a pretrained tokenizer (tok.source) is a pretrained one."""
    return by_origin(lr, bool(tok.source), scratch_lr, pretrained_lr, flag)


def seed_count(n_seed, init):
    """By where the base comes from: from scratch (its warm start's examples), or pretrained (its shots' pool)."""
    return by_origin(n_seed, is_pretrained(init), SCRATCH_N_SEED, PRETRAINED_N_SEED, "--n_seed")


def warm_start_defaults(args, init):
    """--n_seed by where the base comes from, and --warm_lr (default: --lr, resolved before)."""
    args.n_seed = seed_count(args.n_seed, init)
    args.warm_lr = args.warm_lr or args.lr


def setup(args, name, defaults, few_shot=False):
    """
    What star.py and stepdpo.py do before their method's first step: the device, the run
    directory, where the base comes from and its tokenizer, the defaults by that origin
    (defaults: {flag: (from scratch, pretrained)}, each applied where the flag was not given),
    and the task cut to the context. few_shot: a pretrained base is prompted with --few_shot
    seed examples. Returns (run, tok, init, task): task.seed (the seed examples), task.shots,
    task.train, task.val (held out of train), task.test, task.block_size.
    """
    args.device = setup_device(args.device, args.threads)
    run = Run(args.out_dir, vars(args), args.resume, name)
    init = resolve_init(args.init, args.dataset)
    tok = tokenizer_for(init)
    for flag, (scratch, pretrained) in defaults.items():
        setattr(args, flag, by_origin(getattr(args, flag), bool(tok.source), scratch, pretrained, f"--{flag}"))
    warm_start_defaults(args, init)
    block_size = base_block_size(init, args.block_size, args.dataset)
    # a pretrained model is prompted with worked examples (STaR's few-shot prompt); a model
    # trained here from scratch is fine-tuned on them instead (the warm start)
    n_shots = 0
    if few_shot:
        n_shots = min(args.n_seed, (4 if is_pretrained(init) else 0) if args.few_shot < 0 else args.few_shot)
    seed_set, train, test, args.max_new_tokens = prepare_task(
        *task_from_args(args), tok, block_size, args.n_seed, args.max_new_tokens, args.dataset, n_shots)
    val, train = split_validation(train, args.n_val)
    # LoRA's frozen base: the run's base.pt (made by the warm start, or copied from --init), or the pretrained directory
    args.lora = lora_options(args, init if is_pretrained(init) else run.path("base.pt"))
    task = SimpleNamespace(seed=seed_set, shots=seed_set[:n_shots], train=train, val=val, test=test,
                           block_size=block_size)
    return run, tok, init, task


def base_block_size(init, block_size, dataset):
    """The context of the run's base: --init's (capped by --block_size), else --block_size or the task's default."""
    if is_pretrained(init):
        import hf

        return hf.read_hf_config(init, block_size or 2048).block_size
    if init:
        return model.checkpoint_config(init)[0].block_size
    return block_size or (1024 if dataset == "gsm8k" else 256)


# -----------------------------------------------------------------------------
# sampling


def sample(gpt, tok, prompts, k, *, temperature, max_new_tokens, batch_size, seed, top_k=None, share_prefix=True,
           desc="sample", stop_at_blank_line=False, compile=False):
    """
    k completions (decoded text) for each prompt text, KV-cached, batch_size sequences at a
    time. share_prefix: each prompt is prefilled once for its k samples (else recomputed for
    each; same samples, for comparison). stop_at_blank_line: a completion ends (finished)
    before its first blank line, as a base model under a few-shot prompt goes on to write the
    next exemplar; the sampler stops the row there (model.generate's blank_line). Sample j of
    prompt i draws its noise from the key (seed, i, j) alone, so it is the same for any
    batch_size and any number of processes (which split the prompts).
    Returns len(prompts) lists of k (text, finished).
    """
    from tqdm import tqdm

    gpt = model.sampling_copy(gpt)  # bf16 weights on a GPU
    device = gpt.lm_head.weight.device
    rank, world = rank_world()
    mine = list(range(rank, len(prompts), world))  # this process's prompts
    ids = [tok.encode_prompt(prompts[i]) for i in mine]
    blank_line = data.blank_line_table(tok).to(device) if stop_at_blank_line else None
    out = []
    per_batch = max(1, batch_size // k)
    for i in tqdm(range(0, len(ids), per_batch), desc=desc, leave=False, disable=None):
        chunk = ids[i : i + per_batch]
        keys = model.noise_keys(seed, mine[i : i + per_batch], k, device)
        max_new = min(max_new_tokens, gpt.config.block_size - max(len(p) for p in chunk))
        options = dict(temperature=temperature, top_k=top_k, stop_token=tok.stop_tokens, vocab_limit=tok.vocab_size,
                       compile=compile, keys=keys, blank_line=blank_line)
        if share_prefix:
            s = model.generate(gpt, chunk, max_new, num_samples=k, **options)
        else:
            s = model.generate(gpt, [p for p in chunk for _ in range(k)], max_new, **options)
        texts = [tok.decode(c) for c in s.completions()]
        fin = s.finished.tolist()
        if stop_at_blank_line:  # the row's last token may go on past the blank line ('7\n\nQ'): cut the text there
            texts = [t.split(data.EXEMPLAR_SEP)[0] for t in texts]
        for j in range(len(chunk)):
            out.append(list(zip(texts[j * k : (j + 1) * k], fin[j * k : (j + 1) * k])))
    return gather_in_order(out, len(prompts))


@torch.no_grad()
def score_pairs(gpt, pairs, batch_size, score):
    """
    score(gpt, x, y) -> one value per row of a collated batch (x, y as from data.collate), for
    every (prompt_ids, completion_ids) pair, in order. Pairs of similar lengths share a batch
    (less padding); split across processes like `sample` and gathered back in order, so
    every rank gets the same numbers.
    """
    device = gpt.lm_head.weight.device
    rank, world = rank_world()
    mine = data.fit(pairs[rank::world], gpt.config.block_size)
    order = sorted(range(len(mine)), key=lambda i: len(mine[i][0]) + len(mine[i][1]))
    out = [None] * len(mine)
    for i in range(0, len(order), batch_size):
        at = order[i : i + batch_size]
        x, y = data.collate([mine[j] for j in at], gpt.config.block_size, device)
        with model.autocast(device):
            values = score(gpt, x, y)
        for j, v in zip(at, values):
            out[j] = v
    return gather_in_order(out, len(pairs))


def completion_logprobs(gpt, pairs, batch_size):
    """(summed log-prob, number of tokens) of each completion given its prompt, for (prompt_ids, completion_ids)."""
    def score(gpt, x, y):
        return zip(model.sequence_logprobs(gpt, x, y).float().tolist(), (y != -1).sum(1).tolist())

    return score_pairs(gpt, pairs, batch_size, score)


# -----------------------------------------------------------------------------
# training from the base weights: SFT and DPO


def lora_options(args, base):
    """--lora_rank's adapters as fine_tune and dpo_train take them (None: every weight trains); base: the frozen
    weights' source, a nanostar checkpoint or a Hugging Face directory."""
    if not args.lora_rank:
        return None
    if getattr(args, "fsdp", False):
        raise data.InputError("--fsdp shards a full fine-tune; with --lora_rank only the adapters train and every "
                              "process holds the frozen base: leave out --fsdp")
    targets = args.lora_targets.split(",")
    if not targets or set(targets) - set(model.LORA_TARGETS):
        raise data.InputError(f"--lora_targets {args.lora_targets}: choose from {','.join(model.LORA_TARGETS)}")
    return {"rank": args.lora_rank, "alpha": args.lora_alpha or 2 * args.lora_rank, "targets": targets,
            "base": base and os.path.abspath(base)}


def new_model(base_state, config, device, lora=None):
    """A fresh copy of the base weights; lora (from lora_options): frozen, with fresh adapters."""
    gpt = model.GPT(config).to(device)
    gpt.load_state_dict(base_state)
    return model.add_lora(gpt, **lora) if lora else gpt


def fine_tune(base_state, config, pairs, *, steps, lr, batch_size, seed, device, compile=False, desc="fine-tune",
              grad_accum=1, fsdp=False, on_step=None, lora=None):
    """
    A fresh copy of the base weights fine-tuned on (prompt_ids, completion_ids) pairs, in
    random batches, packed (data.pack). Returns (model, last loss). Under torchrun every
    micro-batch of batch_size is split across the processes (examples rank, rank + N, ...,
    each process packing its own), so the global batch is the same for any N; fsdp: the
    model is sharded over them (FSDP2) while it trains. lora: only fresh adapters train.
    on_step(step, model): called after every update.
    """
    torch.manual_seed(seed)
    gpt = new_model(base_state, config, device, lora)
    pairs = data.fit(pairs, config.block_size)
    rng = random.Random(seed)
    order = []
    def get_batch(step, micro):
        batch = []
        while len(batch) < batch_size:
            if not order:  # shuffled epochs: every example is seen once before any is seen twice
                order.extend(rng.sample(range(len(pairs)), len(pairs)))
            batch.append(pairs[order.pop()])
        rows = my_rows(len(batch), "a batch")  # packed: short examples share rows, (x, y, pos, mask)
        return (*data.pack([batch[i] for i in rows], config.block_size, device),
                share([len(c) for _, c in batch], rows))

    loss_fn = lambda gpt, b: (model.lm_loss(gpt, b[:4])[0] * b[4], {})
    cfg = model.TrainConfig(steps=steps, lr=lr, warmup=min(20, steps // 10), compile=compile, grad_accum=grad_accum,
                            parallel=parallel_mode(gpt, fsdp))
    losses = model.train(gpt, get_batch, cfg, loss_fn=loss_fn, desc=desc,
                         on_step=on_step and (lambda step: on_step(step, gpt)))
    return unsharded(gpt, config, fsdp), losses[-1] if losses else float("nan")


def parallel_mode(gpt, fsdp):
    """How model.train runs across processes: "" alone, "ddp", or "fsdp" (gpt sharded in place, FSDP2)."""
    if not distributed():
        return ""
    if not fsdp:
        return "ddp"
    import warnings

    from torch.distributed.fsdp import fully_shard

    # GPT.forward returns views (logits, per-token losses); nothing here writes into them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in gpt.layers:
        fully_shard(block)
    fully_shard(gpt)
    return "fsdp"


def unsharded(gpt, config, fsdp):
    """After FSDP training: a plain model with the full weights on every rank (to sample and save); else gpt itself."""
    if not (fsdp and distributed()):
        return gpt
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(gpt, options=StateDictOptions(full_state_dict=True))
    full = model.GPT(config).to(gpt.lm_head.weight.device)
    full.load_state_dict(state)
    return full.eval()


@torch.no_grad()
def reference_logprobs(ref, pairs, batch_size):
    """Summed log-probs under the frozen reference of every (chosen, rejected) pair, once: (n, 2) on the CPU."""
    lp = completion_logprobs(ref, [s for pair in pairs for s in pair], batch_size)  # c0, r0, c1, r1, ...
    return torch.tensor([v for v, _ in lp]).view(-1, 2)


def dpo_train(base_state, config, pairs, *, steps, lr, beta, batch_size, seed, device, sft_weight=0.0, compile=False,
              desc="DPO", grad_accum=1, fsdp=False, lora=None):
    """
    DPO from the base weights; the frozen base model is the reference, its log-probs computed
    once before training. pairs: (chosen, rejected), each a (prompt_ids, completion_ids) as
    from data.encode_example (a completion without <|endoftext|> is a partial solution).
    batch_size sequences a step (half the pairs' sides), split across processes by pairs
    under torchrun. lora: only fresh adapters train, and the reference is the policy before
    its first step (adapters at zero: the base), so there is no second copy. Returns (model, last loss).
    """
    pairs = [tuple(data.fit(pair, config.block_size)) for pair in pairs]
    if lora:
        torch.manual_seed(seed)
        gpt = new_model(base_state, config, device, lora)
        ref_lp = reference_logprobs(gpt, pairs, batch_size)
    else:  # a copy of the base, freed before the policy is made
        ref_lp = reference_logprobs(new_model(base_state, config, device), pairs, batch_size)
        torch.manual_seed(seed)
        gpt = new_model(base_state, config, device)
    rng = random.Random(seed)
    n = max(1, min(batch_size // 2, len(pairs)))

    def get_batch(step, micro):
        idx = rng.sample(range(len(pairs)), n)
        x, y = data.collate([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], config.block_size, device)
        mine = my_rows(n, "DPO's pairs")  # both sides of each of this process's pairs
        rows = mine + [n + i for i in mine]
        # the loss's two means: over pairs (DPO) and over the chosen side's tokens (the SFT term)
        scales = share([1] * n, mine), share([len(pairs[i][0][1]) for i in idx], mine)
        return x[rows], y[rows], ref_lp[[idx[i] for i in mine]].to(device), scales

    def loss_fn(gpt, batch):
        pair_scale, token_scale = batch[3]
        return model.dpo_sft_loss(gpt, *batch[:3], beta=beta, sft_weight=sft_weight, pair_scale=pair_scale,
                                  token_scale=token_scale)

    cfg = model.TrainConfig(steps=steps, lr=lr, warmup=min(20, steps // 10), compile=compile, grad_accum=grad_accum,
                            parallel=parallel_mode(gpt, fsdp))
    losses = model.train(gpt, get_batch, cfg, loss_fn=loss_fn, desc=desc)
    return unsharded(gpt, config, fsdp), losses[-1] if losses else float("nan")


# -----------------------------------------------------------------------------
# evaluation


def tally(golds, greedy, samples=None, scores=None):
    """
    Accuracies from graded outputs. golds: the gold answers; greedy: one (text, finished) per
    question; samples: N (text, finished) per question; scores: a score for each of those N
    (higher = better). Returns acc, and with samples maj@N and pass@N, and with scores best@N
    (the accuracy of the highest-scored sample, the first on ties).
    """
    n_q = len(golds)
    res = {"acc": sum(data.sample_correct(t, f, g) for g, (t, f) in zip(golds, greedy)) / n_q}
    if samples:
        n = len(samples[0])
        maj = pass_ = 0
        for g, outs in zip(golds, samples):
            answers = [data.extract_answer(t) if f else None for t, f in outs]
            maj += data.answers_match(data.majority(answers), g)
            pass_ += any(data.sample_correct(t, f, g) for t, f in outs)
        res[f"maj@{n}"], res[f"pass@{n}"] = maj / n_q, pass_ / n_q
        if scores is not None:
            best = 0
            for g, outs, sc in zip(golds, samples, scores):
                t, f = outs[max(range(len(sc)), key=lambda i: (sc[i], -i))]
                best += data.sample_correct(t, f, g)
            res[f"best@{n}"] = best / n_q
    return res


def evaluate(gpt, tok, test, **options):
    """Greedy test accuracy; with n_samples > 1 also maj@N and pass@N (options: as `outputs` takes them)."""
    return tally(*outputs(gpt, tok, test, **options))


def outputs(gpt, tok, test, *, seed, max_new_tokens, batch_size, n_samples=0, temperature=0.7, prefix="",
            compile=False):
    """
    What evaluation grades: (golds, greedy, samples). greedy: one (text, finished) per question;
    samples: n_samples of them per question at `temperature` when n_samples > 1, else None.
    prefix: a few-shot prompt put before every question (completions then stop at a blank line).
    """
    prompts = [prefix + data.prompt(e.question) for e in test]
    golds = [e.answer for e in test]
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, stop_at_blank_line=bool(prefix), compile=compile)
    greedy = [o[0] for o in sample(gpt, tok, prompts, 1, temperature=0.0, seed=seed, desc="eval greedy", **gen)]
    if n_samples <= 1:
        return golds, greedy, None
    samples = sample(gpt, tok, prompts, n_samples, temperature=temperature, seed=seed + 1, desc=f"eval {n_samples}",
                     **gen)
    return golds, greedy, samples


# -----------------------------------------------------------------------------
# the task cut to the context, and the base model


def split_validation(questions, n_val):
    """(validation, training): the last n_val training questions are held out and never trained on; --n_val checked."""
    if not 0 < n_val < len(questions):
        raise data.InputError(f"--n_val {n_val}: need between 1 and {len(questions) - 1} of the {len(questions)} "
                              "training questions")
    return questions[-n_val:], questions[:-n_val]


def prepare_task(train, test, tok, block_size, n_seed, max_new_tokens=0, dataset="", n_shots=0):
    """
    Drop examples longer than the context (saying how many), split off the seed set, and pick
    the generation length (max_new_tokens 0: the longest gold solution and a quarter more).
    n_shots: the first n_shots seed examples make a few-shot prompt, which every other
    question must fit beside. Returns (seed_set, questions, test, max_new_tokens).
    """
    length = {}  # id(example) -> tokens of its hinted prompt (with the BOS), solution and end token
    for e in train + test:
        text = data.hint_prompt(e.question, e.answer) + data.completion(e.rationale, e.answer)
        length[id(e)] = len(tok.encode_prompt(text)) + 1

    def keep(name, split, extra=0, why=""):
        kept = [e for e in split if extra + length[id(e)] <= block_size]
        if len(kept) < len(split):
            print(f"dropped {len(split) - len(kept)} of {len(split)} {name} examples longer than block_size "
                  f"{block_size}{why}")
        return kept

    train, extra = keep("train", train), 0
    if n_shots:  # the exemplars themselves fit alone; every other question must fit beside them
        extra = len(tok.encode(data.few_shot_prefix(train[:n_shots], hint=True)))
        if 2 * extra > block_size:
            raise data.InputError(f"the {n_shots}-shot prompt takes {extra} of the {block_size} tokens of context: "
                                  "pass a smaller --few_shot or a larger --block_size")
        train = train[:n_shots] + keep("train", train[n_shots:], extra, f" beside the {n_shots}-shot prompt")
    test = keep("test", test, extra, f" beside the {n_shots}-shot prompt" if n_shots else "")
    if n_seed >= len(train):
        raise data.InputError(f"--n_seed {n_seed} leaves no training questions out of {len(train)}")
    if max_new_tokens == 0:
        longest = max(len(tok.encode(data.completion(e.rationale, e.answer))) for e in train)
        max_new_tokens = min(int(longest * 1.25) + 8, block_size)
    seed_set, questions = train[:n_seed], train[n_seed:]
    shots = f"; {n_shots}-shot prompt of {extra} tokens" if n_shots else ""
    print(f"task {dataset}: {len(seed_set)} seed, {len(questions)} train questions, {len(test)} test; "
          f"generations cut at {max_new_tokens} tokens{shots}")
    return seed_set, questions, test, max_new_tokens


def warm_start(path, tok, seed_set, config, *, steps, lr, batch_size, seed, device, init=None, compile=False,
               answer_only=False, holdout=0, lora=None):
    """
    The base model every iteration starts from: loaded from `path` if this run already made
    it, else from the checkpoint `init`, else a fresh model of `config` fine-tuned for `steps`
    on the seed set (each example plain and with its hint). Saved to `path` either way.
    lora: a pretrained base or one from --init stays frozen, so on a GPU it is kept in bf16.
    holdout: the last `holdout` seed examples are not trained on; their NLL is measured 20
    times over the run and the weights where it was lowest are the warm start (early stopping:
    a small model fine-tuned on a few hundred examples memorizes them and gets worse on others).
    """
    t0 = time.time()
    if exists_and_wait(path):
        print(f"resumed: warm-start model from {path}")
        return model.load_checkpoint(path, device)[0]
    if init and holdout:
        print(f"--warm_holdout {holdout} has nothing to do: the base comes from --init {init}, not a warm start")
    if is_pretrained(init):  # the pretrained weights are the base; the few-shot prompt replaces the warm start
        import hf

        base = hf.load_pretrained(init, device, config.block_size)
        print(f"pretrained {init}: {base.num_params():,} parameters, context {config.block_size}")
        return base.to(torch.bfloat16) if lora and base.lm_head.weight.is_cuda else base
    if init:
        base = model.load_base(init, device)  # a LoRA checkpoint: its adapters merged in
        save_checkpoint(path, base, tokenizer_dir=tok.source)
        return base.to(torch.bfloat16) if lora and base.lm_head.weight.is_cuda else base
    if not seed_set:
        raise data.InputError("a model from scratch learns the solution format from its --n_seed worked examples: "
                              "need at least 1")
    if not 0 <= holdout < len(seed_set):
        raise data.InputError(f"--warm_holdout {holdout}: need 0 <= it < --n_seed {len(seed_set)}")
    torch.manual_seed(seed)
    init_state = model.GPT(config).state_dict()
    pairs = data.seed_pairs(tok, seed_set[: len(seed_set) - holdout], answer_only)
    held = data.seed_pairs(tok, seed_set[len(seed_set) - holdout :], answer_only)
    best = {"nll": float("inf"), "step": 0, "state": None}
    curve = []

    def keep_best(step, gpt):
        if (step + 1) % max(1, steps // 20) and step + 1 != steps:
            return
        lp = completion_logprobs(gpt, held, batch_size=256)
        nll = -sum(v for v, _ in lp) / sum(n for _, n in lp)
        curve.append(f"{step + 1}:{nll:.3f}")
        if nll < best["nll"]:
            best.update(nll=nll, step=step + 1, state={k: v.detach().clone() for k, v in gpt.state_dict().items()})

    base, loss = fine_tune(init_state, config, pairs, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                           device=device, compile=compile, desc="warm start",
                           on_step=keep_best if held else None)
    stopped = ""
    if held:
        base.load_state_dict(best["state"])
        stopped = f"; held-out NLL by step {' '.join(curve)}: kept step {best['step']} ({best['nll']:.4f})"
    save_checkpoint(path, base)
    print(f"warm start: {base.num_params():,} parameters, {steps} steps, loss {loss:.4f}, "
          f"{time.time() - t0:.0f}s{stopped}")
    return base


# -----------------------------------------------------------------------------
# the one table: every method on the same task and base model, `python loop.py`
#
# Each method runs as its own script, exactly as a user would run it (the commands are printed
# and written to table.md), one seed after another; a finished run is read back, an unfinished
# one resumed, so the command can be re-run after a crash. STaR's run of each seed makes the
# base model (its warm start) that every other star.py run starts from (--init), and the STaR
# model that stepdpo.py's runs start from, as the per-step DPO paper starts from an SFT model.

TABLE_STEPDPO = ["--n_questions", "500", "--samples", "4", "--train_epochs", "3"]  # the per-step DPO section's regime
# settings chosen on the validation split from the STaR models of the table's seeds (docs/record.md)
TABLE_DPO = ["--dpo_lr", "1e-5", "--beta", "2", "--sft_weight", "1"]
TABLE_RFT = ["--lr", "1e-4"]
# the task of every star.py and stepdpo.py run; word_problems needs more seed examples and warm-start steps to be learnt
# by the default 3 x 96 model (chosen on validation: docs/record.md, "A second task"). Quiet-STaR reads its own corpus,
# so its runs are the same for every task and are left out of the word_problems table.
TABLE_TASKS = {"arithmetic": [],
               "word_problems": ["--dataset", "word_problems", "--n_seed", "1024", "--warm_steps", "3000"]}


def table_runs(out_dir, seed, iters, dataset="arithmetic"):
    """[(name, script, argv)] of one seed, in the order they must run."""
    d = lambda name: os.path.join(out_dir, f"{name}_{seed}")
    base, star_model = os.path.join(d("star"), "base.pt"), os.path.join(d("star"), "model.pt")
    fixed = ["--iters", str(iters), "--patience", str(iters)]  # the same number of rounds for every star.py run
    runs = [
        ("star", "star.py", fixed),
        ("star_no_rationalize", "star.py", fixed + ["--no_rationalize", "--init", base]),
        ("answer_only", "star.py", fixed + ["--answer_only", "--init", base]),
        ("rft_vstar", "star.py",
         fixed + ["--samples", "4", "--temperature", "0.7", "--verifier", "--eval_samples", "16", "--init", base]),
        ("stepdpo_rft", "stepdpo.py", TABLE_STEPDPO + ["--variant", "rft", "--init", star_model] + TABLE_RFT),
        ("stepdpo_plain", "stepdpo.py", TABLE_STEPDPO + ["--variant", "plain", "--init", star_model] + TABLE_DPO),
        ("stepdpo_perstep", "stepdpo.py", TABLE_STEPDPO + ["--variant", "perstep", "--init", star_model] + TABLE_DPO),
        ("quietstar", "quietstar.py", []),  # its defaults: a base with a skill to think with, its own corpus
    ]
    task = TABLE_TASKS[dataset]
    return [(name, script,
             argv + (task if script != "quietstar.py" else []) + ["--seed", str(seed), "--out_dir", d(name)])
            for name, script, argv in runs if script != "quietstar.py" or dataset == "arithmetic"]


def star_samples(rows, samples, rationalize):
    """Completions a star.py run sampled: every question `samples` times a round, plus a hinted try per failure."""
    n = 0
    for r in rows[1:]:
        if "questions" in r:  # (answer-only rounds sample nothing and have no count)
            n += r["questions"] * samples + (r["questions"] - r["solved"] if rationalize else 0)
    return n


def table_rows(out_dir, seed):
    """One seed's results, read from its runs' files: {row name: {"acc" or "nll": ..., "samples": ..., "from": ...}}."""
    p = lambda name, f: os.path.join(out_dir, f"{name}_{seed}", f)
    out = {}
    for name, samples, rat in (("star", 1, True), ("star_no_rationalize", 1, False), ("answer_only", 0, False),
                               ("rft_vstar", 4, True)):
        rows = read_rows(p(name, "metrics.jsonl"))
        out[name] = {"acc": rows[-1]["acc"], "samples": star_samples(rows, samples, rat), "rounds": len(rows) - 1}
        distinct = [r["distinct_per_question"] for r in rows[1:] if "distinct_per_question" in r]
        if samples > 1 and distinct:  # RFT: distinct right paths kept per question, over its rounds
            out[name]["distinct"] = sum(distinct) / len(distinct)
    out["base"] = {"acc": read_rows(p("star", "metrics.jsonl"))[0]["acc"], "samples": 0}
    curve = {c["n"]: c for c in read_rows(p("rft_vstar", "verifier.jsonl"))[0]["test"]["curve"]}
    n = max(curve)
    for key in ("maj", "reward", "pass"):
        out[f"vstar_{key}"] = {"acc": curve[n][key], "samples": out["rft_vstar"]["samples"], "n": n}
    import star  # V-STaR's diagnosis, on the validation split's samples

    beta = json.loads(Path(p("rft_vstar", "config.json")).read_text())["beta"]
    val_samples = read_rows(p("rft_vstar", "verifier_val_samples.jsonl"))
    out["vstar_reward"]["diagnosis"] = star.verifier_diagnosis(val_samples, beta)
    for v in ("rft", "plain", "perstep"):
        with open(p(f"stepdpo_{v}", "metrics.json")) as f:
            res = json.load(f)
        out[f"stepdpo_{v}"] = {"acc": res["acc"], "from": res["sft_acc"], "samples": res["synthetic_samples"],
                               "trained_on": res["train_examples"], "kind": v}
        # where the first pit falls: the critical step (1-based) of each wrong solution, of its steps
        if v == "perstep":
            q = read_rows(p("stepdpo_perstep", "q_values.jsonl"))
            out["stepdpo_perstep"].update(critical=sum(r["critical"] + 1 for r in q) / max(1, len(q)),
                                          steps=sum(len(r["steps"]) for r in q) / max(1, len(q)))
    if not os.path.exists(p("quietstar", "results.json")):  # a table without Quiet-STaR (word_problems)
        return out
    with open(p("quietstar", "results.json")) as f:
        q = json.load(f)
    for arm in ("pretrained", "no_thoughts", "thoughts"):
        out[f"quietstar_{arm}"] = {"nll": q[arm]["nll_computed"]}
    out["quietstar_own_base"] = {"nll": q["thoughts"]["nll_computed_base"]}
    return out


TABLE_LABELS = [  # (row, what it is)
    ("base", "base model: the warm start (STaR's seed examples), greedy"),
    ("star", "STaR, with rationalization"),
    ("star_no_rationalize", "STaR without rationalization"),
    ("answer_only", "answer-only: fine-tuned on every gold answer, no rationale"),
    ("rft_vstar", "RFT: 4 samples a question at T 0.7, right ones de-duplicated"),
    ("vstar_maj", "RFT's model, majority vote of {n} samples at T 0.7"),
    ("vstar_reward", "V-STaR: the best of the same {n} by the DPO verifier's reward"),
    ("vstar_pass", "RFT's model, pass@{n} (any of the {n} right)"),
    ("stepdpo_rft", "from STaR's model: RFT on its right samples"),
    ("stepdpo_plain", "from STaR's model: plain DPO (right vs wrong solution)"),
    ("stepdpo_perstep", "from STaR's model: per-step DPO (rejected cut at the first pit)"),
    ("quietstar_pretrained", "Quiet-STaR's base LM (its own corpus), NLL of computed digits"),
    ("quietstar_no_thoughts", "  + the same steps without thoughts"),
    ("quietstar_thoughts", "  + the same steps with thoughts"),
    ("quietstar_own_base", "  the model trained with thoughts, predicting without them"),
]


TABLE_PAIRED = {  # row: (the row it is compared with seed by seed, same base and seed; its short name)
    "star_no_rationalize": ("star", "STaR"), "answer_only": ("star", "STaR"), "rft_vstar": ("star", "STaR"),
    "vstar_reward": ("vstar_maj", "majority vote"), "stepdpo_rft": ("star", "STaR"), "stepdpo_plain": ("star", "STaR"),
    "stepdpo_perstep": ("star", "STaR"), "quietstar_thoughts": ("quietstar_no_thoughts", "without thoughts"),
    "quietstar_own_base": ("quietstar_no_thoughts", "without thoughts"),
}


def spread(values, fmt, unit=""):
    """'mean (min-max)' of a row's per-seed values; just the value for one seed."""
    if len(values) == 1:
        return fmt(values[0]) + unit
    return f"{fmt(sum(values) / len(values))} ({fmt(min(values))}-{fmt(max(values))}){unit}"


def trained_on(vals):
    """What a row's last training saw, over seeds: RFT's distinct paths, DPO's pairs, per-step DPO's critical steps."""
    num = lambda x: f"{x:,.0f}"
    if "diagnosis" in vals[0]:  # on validation pairs (right, wrong) of one question: how often each score ranks right
        def over(key, fmt):  # over the seeds that have it (none without a right and a wrong sample of one question)
            got = [v["diagnosis"][key] for v in vals if key in v["diagnosis"]]
            return spread(got, fmt) if got else "none"

        pct = lambda v: f"{v:.2f}"
        return (f"validation pairs ranked right: reward {over('pairwise_reward', pct)}, generator/token "
                f"{over('pairwise_generator_per_token', pct)} (random 0.50); reward-length r "
                f"{over('reward_length_r', lambda v: f'{v:+.2f}')}")
    if "distinct" in vals[0]:
        return spread([v["distinct"] for v in vals], lambda x: f"{x:.2f}") + " distinct right paths a question"
    if "trained_on" not in vals[0]:
        return ""
    what = " distinct right solutions" if vals[0]["kind"] == "rft" else " pairs"
    out = spread([v["trained_on"] for v in vals], num) + what
    if "critical" in vals[0]:
        out += (f"; critical step {spread([v['critical'] for v in vals], lambda x: f'{x:.2f}')} of "
                f"{spread([v['steps'] for v in vals], lambda x: f'{x:.2f}')} steps")
    return out


def table_markdown(per_seed, seeds, times):
    """The table over seeds: mean (min-max) of each row, the samples it drew, and each method's wall time."""
    pct = lambda v: f"{100 * v:.1f}"
    nat = lambda v: f"{v:.4f}"
    lines = [f"| method | test accuracy, mean (min-max) over seeds {', '.join(map(str, seeds))} | paired difference, "
             "seed by seed | samples drawn (per seed) | wall time (per seed) | trained on (per seed) |",
             "| --- | --- | --- | --- | --- | --- |"]
    signed = lambda v: f"{100 * v:+.1f}"
    run_of = {"vstar_maj": "rft_vstar", "vstar_reward": "rft_vstar", "vstar_pass": "rft_vstar", "base": "star",
              "quietstar_pretrained": "quietstar", "quietstar_no_thoughts": "quietstar",
              "quietstar_thoughts": "quietstar",
              "quietstar_own_base": "quietstar"}
    for row, label in TABLE_LABELS:
        if row not in per_seed[seeds[0]]:
            continue
        vals = [per_seed[s][row] for s in seeds]
        if "nll" in vals[0]:
            result = spread([v["nll"] for v in vals], nat, " nats")
        else:
            result = spread([v["acc"] for v in vals], pct, "%")
        label = label.format(n=vals[0].get("n"))
        if row in TABLE_PAIRED:
            ref, name = TABLE_PAIRED[row]
            key = "nll" if "nll" in vals[0] else "acc"
            diffs = [per_seed[s][row][key] - per_seed[s][ref][key] for s in seeds]
            paired = (" / ".join(f"{d:+.4f}" for d in diffs) + " nats"
                      if key == "nll" else " / ".join(signed(d) for d in diffs)) + f" vs {name}"
        else:
            paired = ""
        samples = spread([v["samples"] for v in vals], lambda x: f"{x:,.0f}") if "samples" in vals[0] else ""
        run = run_of.get(row, row)
        t = spread([times[s][run] for s in seeds], lambda x: f"{x:.0f}",
                   " s") if row == run or row == "quietstar_thoughts" else ""
        lines.append(f"| {label} | {result} | {paired} | {samples} | {t} | {trained_on(vals)} |")
    total = spread([sum(times[s].values()) for s in seeds], lambda x: f"{x:.0f}", " s")
    lines.append(f"| every run of a seed | | | | {total} | |")
    return "\n".join(lines)


def table(out_dir, seeds, iters, threads=0, extra=None, dataset="arithmetic"):
    """Run (or resume) every method for every seed, then write table.md and table.json in out_dir."""
    import shlex
    import subprocess

    extra = extra or {}
    os.makedirs(out_dir, exist_ok=True)
    times_path = os.path.join(out_dir, "times.json")
    read_times = lambda: json.loads(Path(times_path).read_text()) if os.path.exists(times_path) else {}
    times = read_times()
    commands = []
    for seed in seeds:
        times.setdefault(str(seed), {})
        for name, script, argv in table_runs(out_dir, seed, iters, dataset):
            argv = argv + extra.get(script, []) + (["--threads", str(threads)] if threads else [])
            star_model = os.path.join(out_dir, f"star_{seed}", "model.pt")
            if star_model in argv and not os.path.exists(star_model):  # no STaR round kept anything: its warm start
                argv[argv.index(star_model)] = os.path.join(out_dir, f"star_{seed}", "base.pt")
            cmd = [sys.executable, script, *argv, "--resume"]
            commands.append(" ".join(shlex.quote(c) for c in ["python", script, *argv]))
            if name in times[str(seed)]:
                print(f"seed {seed} {name}: done ({times[str(seed)][name]:.0f} s)")
                continue
            print(f"seed {seed} {name}: {commands[-1]}", flush=True)
            t0 = time.time()
            with open(os.path.join(out_dir, f"{name}_{seed}.log"), "a") as log:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=os.path.dirname(os.path.abspath(__file__)))
            if done.returncode:
                raise data.InputError(f"seed {seed} {name} failed (exit status {done.returncode}): see {log.name}")
            took = time.time() - t0  # of the last attempt, if it was resumed
            # other seeds may be run at the same time by another `python loop.py --seeds ...`: keep what they wrote
            times = {**read_times(), **{k: v for k, v in times.items() if k == str(seed)}}
            times.setdefault(str(seed), {})[name] = took
            write_atomic(times_path, json.dumps(times, indent=1))
    times = read_times()
    per_seed = {s: table_rows(out_dir, s) for s in seeds}
    md = table_markdown(per_seed, seeds, {s: times[str(s)] for s in seeds})
    write_atomic(os.path.join(out_dir, "table.json"),
                 json.dumps({"dataset": dataset, "seeds": seeds, "iters": iters, "rows": per_seed, "times": times},
                            indent=1))
    write_atomic(os.path.join(out_dir, "table.md"), md + "\n\nmade by:\n\n" + "\n".join(commands) + "\n")
    print(md)
    return per_seed


if __name__ == "__main__":
    import shlex

    ap = argparse.ArgumentParser(description="The one table: every method (STaR with and without rationalization, "
                                 "answer-only, "
                                 "RFT, V-STaR best-of-N, plain and per-step DPO, Quiet-STaR) on one task (--dataset) "
                                 "from the same "
                                 "base model, over seeds, with each run's wall time. Re-run the same "
                                 "command to resume.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", default="arithmetic", choices=list(TABLE_TASKS),
                    help="the task of every star.py and stepdpo.py "
                    "run (word_problems: with the seed examples and warm-start steps it needs; no Quiet-STaR rows)")
    ap.add_argument("--out_dir", default=None, help="where the runs, table.md and table.json go (None: out/table, or "
                    "out/table_word_problems)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2],
                    help="one full set of runs per seed, one seed after "
                    "another (to use more cores, run one `--seeds S` per seed in the same --out_dir, then the command "
                    "with all seeds)")
    ap.add_argument("--iters", type=at_least(1), default=3,
                    help="STaR rounds of every star.py run (the sample budget; no early stop)")
    ap.add_argument("--threads", type=at_least(0), default=0,
                    help="torch CPU threads of every run (0 = torch's default)")
    for s in ("star", "stepdpo", "quietstar"):
        ap.add_argument(f"--{s}_args", default="", help=f"more flags for every {s}.py run, in one quoted string")
    a = ap.parse_args()
    a.out_dir = a.out_dir or ("out/table" if a.dataset == "arithmetic" else f"out/table_{a.dataset}")
    run_cli(lambda a: table(a.out_dir, a.seeds, a.iters, a.threads, {f"{s}.py": shlex.split(getattr(a, f"{s}_args"))
                                                                       for s in ("star", "stepdpo", "quietstar")},
                                                                       a.dataset), a)
