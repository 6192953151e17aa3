"""
The compiled decode step, a piece a reader can skip: model.generate(compile=True) imports it.
One token per call over per-layer KV buffers (gpt-fast's layout) through torch.compile: fixed
shapes and CUDA graphs on a GPU; on a CPU attending over the written slots only.
"""

import torch

from model import decode_step


class StaticKVCache:
    """
    A prefilled KVCache's buffers seen the way gpt-fast's decode step sees them, for compiled
    sampling: one token per call, written at `slot` (a 1-element tensor the caller advances in
    place). Each layer's keys and values are a tensor of their own, written by index
    (`k[:, :, slot] = ...`), which inductor does in place: a write into a view of one tensor
    for all layers (`k[layer].index_copy_`) is not, and the compiled step then copied every
    layer's whole cache twice per token (10x slower than eager at batch 64 on a CPU).

    What the step attends over depends on the device. On a GPU, all max_len slots through a
    mask (unwritten slots hidden): no shape changes from step to step, so CUDA graphs can
    replay the step. The buffers are kept for the next call of the same shape and marked as
    static addresses (as gpt-fast's module buffers are), without which torch skips CUDA graphs
    for a step that writes into its inputs. On a CPU, only the `window` written slots (an int
    the step takes as an argument, which dynamo compiles as a dynamic size after its first
    change: two compiles per shape, not one per token): at batch 64 reading the cache is what
    attention costs, and over all slots the step read 1.7x the bytes that eager sampling reads
    (bench.py's 32 + 128 tokens).
    """

    _buffers = None  # (k, v, valid, slot, slots) of the last shape: the tensors every compiled step writes into

    def __init__(self, cache):
        shape, dev = cache.k.shape, cache.k.device
        bufs = StaticKVCache._buffers
        if (bufs is None or len(bufs[0]) != shape[0] or bufs[0][0].shape != shape[1:]
                or bufs[0][0].dtype != cache.k.dtype or bufs[0][0].device != dev):
            bufs = ([torch.empty_like(cache.k[0]) for _ in range(shape[0])],
                    [torch.empty_like(cache.v[0]) for _ in range(shape[0])],
                    torch.empty_like(cache.valid), torch.zeros(1, dtype=torch.long, device=dev),
                    torch.arange(shape[3], device=dev))
            if dev.type == "cuda":  # the same addresses on every call: CUDA graphs may replay writes into them
                for t in [*bufs[0], *bufs[1], *bufs[2:]]:
                    torch._dynamo.mark_static_address(t)
            StaticKVCache._buffers = bufs
        self.k, self.v, self.valid, self.slot, self.slots = bufs
        for layer in range(shape[0]):  # the prefilled cache, copied once per generate call
            self.k[layer].copy_(cache.k[layer])
            self.v[layer].copy_(cache.v[layer])
        self.valid.copy_(cache.valid)
        self.slot.fill_(cache.length)
        self.max_len = shape[3]
        # None: attend over all max_len slots; else over slots [0, window), set by `static_decode_step`
        self.window = None

    def update(self, layer, k, v):
        self.k[layer][:, :, self.slot] = k  # k: (B, Hkv, 1, D) into (B, Hkv, max_len, D)
        self.v[layer][:, :, self.slot] = v
        if self.window is None:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, : self.window], self.v[layer][:, :, : self.window]

    def check(self, T):
        assert T == 1, "the static cache takes one token per call"

    def advance(self, T):
        pass  # the caller moves `slot` outside the compiled step

    def default_mask(self, T):
        if self.window is None:
            return self.valid[:, None, None, :] & (self.slots <= self.slot)  # (B, 1, 1, max_len)
        return self.valid[:, None, None, : self.window]  # every slot below the window is written


def static_decode_step(model, tok, pos, cache, window):
    """decode_step over a StaticKVCache attending over slots [0, window) (None: all of them)."""
    cache.window = window  # set inside the compiled function from its argument, so that dynamo sees an int that changes
    return decode_step(model, tok, pos, cache)


_COMPILED = {}
CPU_WINDOW = True  # False: a CPU runs the GPU's fixed-shape step (all slots, masked); the tests run both


def compiled_decode_step(device):
    """
    static_decode_step through torch.compile, once per device type: CUDA graphs on a GPU; on
    a CPU inductor with its C++ wrapper (the step's kernels called from C++, not one Python
    call each: a decode step is dozens of small kernels, and at batch 1 their launch is the cost).
    """
    kind = torch.device(device).type
    if kind not in _COMPILED:
        mode, options = ("reduce-overhead", None) if kind == "cuda" else (None, {"cpp_wrapper": True})
        _COMPILED[kind] = torch.compile(static_decode_step, mode=mode, options=options, fullgraph=True)
    return _COMPILED[kind]
