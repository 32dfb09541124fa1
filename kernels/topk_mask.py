"""Triton kernels for topk_mask: exact k-of-n selection over many score tensors, written as packed bits.

The rule (sparse_engine/ops/topk_mask.py): within each group of tensors keep the k best scores;
ties go to the earlier (tensor index, flat index); -0.0 == +0.0; NaN is an error.

Keys. Each score becomes an unsigned key whose integer order is the score order: bits u of the
float, -0 canonicalised to +0, then ``~u`` for negatives and ``u | sign`` otherwise; inverted
when the smallest scores are wanted, so the k *largest* keys are always kept. fp16 and bf16
keep their native 16-bit keys: the same order as keys of the fp32 upcast (the upcast is exact and
monotone), and a 16-bit key is resolved by one 16-bit histogram pass instead of two.

Threshold. Per group, the threshold key T satisfies count(key > T) < k <= count(key >= T). A
histogram pass counts, for each group, the keys above a key range [lo, hi] and the keys inside it
in 65536 bins of width 2**shift; the bin that holds T (found with torch ops on the (G, 65536)
histogram, on the device) narrows the range for the next pass:

    fp32:       pass A  bits 31..16 (range = all keys, shift 16)     pass B  bits 15..0 (shift 0)
    fp16/bf16:  pass A  bits 15..0  (shift 0): T is known after one pass

Per-element global atomics are the cost of a pass, not its reads, when every key is binned.
So groups of >= 2**20 scores first histogram a sample (1/256 of their scores, at hashed positions)
and start pass A on a bracket of top digits that holds T with high probability: pass A then bins
only the ~1% of keys inside the bracket, in 65536 bins of 2**ceil(log2(#digits)) keys, and only
the keys of T's bin reach an atomic in pass B. A group whose bracket misses T (count(above) >= k
or count(above) + count(inside) < k, found on the device) is histogrammed again over all keys by
a repair launch whose programs for other groups return at once. Within a program, keys in the
tile's lowest and highest bins are counted in registers and added with one atomic each: ties
(pruned zeros, constant tensors, infinities) would otherwise make every program hit one address.

Cost: fp32 reads its scores 3 times (pass A, pass B, write) plus the sample (1/32 of a read in
32-byte sectors), fp16/bf16 2 times; the tie-count pass reads only groups whose ties at T are
split; the masks (1/32 of fp32 scores) are written once. Six launches whatever the tensor count.

Write. The last pass writes the packed mask: key > T kept; key == T kept iff its tie rank (in
(tensor, flat index) order within the group) is < k - count(key > T). Ranks need per-chunk tie
counts, exclusive-summed over the group's chunks: a counting pass that runs only for groups whose
ties at T are split (its programs for other groups return at once).

Work. Tensors are sorted by group (stably) into slots; every pass is one launch over all chunks
of all slots: a chunk is BLOCK_W whole 32-bit words of one tensor's packed (rows, ceil(cols/32))
grid, i.e. a [BLOCK_W, 32] tile of scores (rows restart word alignment, so padding lanes are
masked off). Programs find their tensor in a per-chunk slot table and its base address in a
per-slot table (int64 addresses cast to pointers): no copy, no per-tensor launches.

Memory: the (G, 65536) histogram, O(T + chunks) tables and per-chunk tie counts. One host sync,
at the end, for the NaN counts that pass A gathers.
"""
import contextlib
import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_NUM_BINS = 65536
# 32 words = 1024 scores a program: 4 KiB of fp32 per chunk, enough to keep loads in flight,
# and 1e9 scores make ~1e6 chunks (4 MiB of tie counts). Under the interpreter small chunks let
# tiny test tensors span many chunks.
_BLOCK_W = 4 if _INTERPRET else 32
_NUM_WARPS = 4

# Sampling: groups of at least _SAMPLE_MIN_NUMEL scores sample numel // _SAMPLE_RATE of each
# tensor's scores at positions (i * _SAMPLE_MULT) mod numel (a multiplicative hash: spread over
# rows and columns alike, unlike a fixed stride that can align with the row length). The bracket
# keeps sample ranks k_s +- (_SAMPLE_SIGMAS * sqrt(S) + _SAMPLE_SLACK); a hash sample's rank has
# standard deviation <= sqrt(S) / 2.
_SAMPLE_MIN_NUMEL = 1 << 20
_SAMPLE_RATE = 256
_SAMPLE_MULT = 2654435761
_SAMPLE_SIGMAS = 4.0
_SAMPLE_SLACK = 16
_MAX_TENSORS = 65535
_SAMPLE_BLOCK = 128 if _INTERPRET else 1024

# Columns of the per-slot table (int64, one row per tensor, sorted by group). The kernels read
# both tables by column number: keep them in step with these names.
_S_ADDR, _S_COLS, _S_WPR, _S_WORDS, _S_FIRST, _S_GROUP, _S_MASK, _S_NUMEL, _S_NSAMPLE = range(9)
_SLOT_FIELDS = 9
# Columns of the per-group state (int64, updated by torch ops between launches).
_G_LO, _G_HI, _G_SHIFT, _G_ACTIVE, _G_THRESH, _G_LIMIT, _G_NEED_RANK, _G_FIRST = range(8)
_GROUP_FIELDS = 8

# Bits of +inf: a magnitude above it is a NaN.
_INF_BITS = {torch.float32: 0x7F800000, torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _score_keys(bits, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr):
    """Raw float bits -> (uint32 order-preserving keys, NaN flags)."""
    SIGN: tl.constexpr = 1 << (KEY_BITS - 1)
    FULL: tl.constexpr = (1 << KEY_BITS) - 1
    u = bits.to(tl.uint32)  # zero-extends 16-bit keys
    mag = u & (SIGN - 1)
    # -0 (sign set, magnitude 0) takes the +0 branch, u | SIGN == SIGN, so both zeros tie.
    key = tl.where((u >= SIGN) & (mag != 0), u ^ FULL, u | SIGN)
    if not LARGEST:
        key = key ^ FULL
    return key, mag > INF_BITS


@triton.jit
def _chunk_keys(c, chunk_slot_ptr, slot_ptr,
                KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr,
                BLOCK_W: tl.constexpr, SLOT_FIELDS: tl.constexpr):
    """Keys of chunk c as a [BLOCK_W, 32] tile in flat order, with its valid lanes and NaN flags."""
    slot = tl.load(chunk_slot_ptr + c)
    row_ptr = slot_ptr + slot.to(tl.int64) * SLOT_FIELDS
    addr = tl.load(row_ptr + 0)
    cols = tl.load(row_ptr + 1)
    words_per_row = tl.load(row_ptr + 2)
    words = tl.load(row_ptr + 3)
    first = tl.load(row_ptr + 4)

    q = (c - first) * BLOCK_W + tl.arange(0, BLOCK_W)  # word index in the tensor's (rows, W) grid
    col = (q % words_per_row)[:, None] * 32 + tl.arange(0, 32)[None, :]
    ok = (q < words)[:, None] & (col < cols)
    flat = (q // words_per_row)[:, None] * cols + col
    if KEY_BITS == 32:
        scores = addr.to(tl.pointer_type(tl.uint32))
    else:
        scores = addr.to(tl.pointer_type(tl.uint16))
    bits = tl.load(scores + flat, mask=ok, other=0)
    key, is_nan = _score_keys(bits, KEY_BITS, INF_BITS, LARGEST)
    return key, ok, is_nan, q, slot


@triton.jit
def _histogram_kernel(
    chunk_slot_ptr, slot_ptr, state_ptr, hist_ptr, above_ptr, nan_ptr,
    KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr, COUNT_NAN: tl.constexpr,
    BLOCK_W: tl.constexpr, NUM_BINS: tl.constexpr, SLOT_FIELDS: tl.constexpr, GROUP_FIELDS: tl.constexpr,
):
    """Per active group: above[g] += #keys > hi; hist[g, (key - lo) >> shift] += 1 for lo <= key <= hi.
    With COUNT_NAN, nan[slot] += #NaN for every group (active or not)."""
    c = tl.program_id(0)
    slot = tl.load(chunk_slot_ptr + c)
    g = tl.load(slot_ptr + slot.to(tl.int64) * SLOT_FIELDS + 5)
    state = state_ptr + g * GROUP_FIELDS
    active = tl.load(state + 3)
    if not COUNT_NAN:
        if active == 0:
            return
    key, ok, is_nan, q, slot = _chunk_keys(c, chunk_slot_ptr, slot_ptr, KEY_BITS, INF_BITS, LARGEST,
                                           BLOCK_W, SLOT_FIELDS)
    if COUNT_NAN:
        n_nan = tl.sum((ok & is_nan).to(tl.int32))
        tl.atomic_add(nan_ptr + slot, n_nan.to(tl.int64), mask=n_nan > 0, sem="relaxed")
    if active != 0:
        lo = tl.load(state + 0).to(tl.uint32)
        hi = tl.load(state + 1).to(tl.uint32)
        shift = tl.load(state + 2).to(tl.uint32)
        n_above = tl.sum((ok & (key > hi)).to(tl.int32))
        tl.atomic_add(above_ptr + g, n_above.to(tl.int64), mask=n_above > 0, sem="relaxed")

        inside = ok & (key >= lo) & (key <= hi)
        bins = ((key - lo) >> shift).to(tl.int32)  # < NUM_BINS inside the range
        row = hist_ptr + g * NUM_BINS
        count_ty = hist_ptr.dtype.element_ty
        # The tile's extreme bins in registers, one atomic each (see the module docstring).
        b_min = tl.min(tl.where(inside, bins, NUM_BINS))
        b_max = tl.max(tl.where(inside, bins, -1))
        at_min = inside & (bins == b_min)
        at_max = inside & (bins == b_max) & (b_max != b_min)
        n_min = tl.sum(at_min.to(tl.int32))
        n_max = tl.sum(at_max.to(tl.int32))
        tl.atomic_add(row + b_min, n_min.to(count_ty), mask=n_min > 0, sem="relaxed")
        tl.atomic_add(row + b_max, n_max.to(count_ty), mask=n_max > 0, sem="relaxed")
        rest = inside & (bins != b_min) & (bins != b_max)
        tl.atomic_add(row + bins, tl.full(bins.shape, 1, count_ty), mask=rest, sem="relaxed")


@triton.jit
def _sample_histogram_kernel(
    slot_ptr, hist_ptr,
    MULT: tl.constexpr, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr,
    BLOCK: tl.constexpr, NUM_BINS: tl.constexpr, SLOT_FIELDS: tl.constexpr,
):
    """hist[g, key >> (KEY_BITS - 16)] += 1 over samples BLOCK*t .. BLOCK*(t+1)-1 of a slot, sample i
    being the score at (i * MULT) mod numel."""
    t = tl.program_id(0)
    row_ptr = slot_ptr + tl.program_id(1).to(tl.int64) * SLOT_FIELDS
    n_samples = tl.load(row_ptr + 8)
    i = tl.arange(0, BLOCK).to(tl.int64) + t.to(tl.int64) * BLOCK
    if t.to(tl.int64) * BLOCK >= n_samples:
        return
    addr = tl.load(row_ptr + 0)
    g = tl.load(row_ptr + 5)
    numel = tl.load(row_ptr + 7)
    if KEY_BITS == 32:
        scores = addr.to(tl.pointer_type(tl.uint32))
    else:
        scores = addr.to(tl.pointer_type(tl.uint16))
    ok = i < n_samples
    bits = tl.load(scores + (i * MULT) % numel, mask=ok, other=0)
    key, _ = _score_keys(bits, KEY_BITS, INF_BITS, LARGEST)
    digit = (key >> (KEY_BITS - 16)).to(tl.int32)
    tl.atomic_add(hist_ptr + g * NUM_BINS + digit, tl.full(digit.shape, 1, hist_ptr.dtype.element_ty),
                  mask=ok, sem="relaxed")


@triton.jit
def _tie_count_kernel(
    chunk_slot_ptr, slot_ptr, state_ptr, ties_ptr,
    KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr,
    BLOCK_W: tl.constexpr, SLOT_FIELDS: tl.constexpr, GROUP_FIELDS: tl.constexpr,
):
    """ties[c] = #keys == T in chunk c, for groups whose ties at T are split (others stay 0)."""
    c = tl.program_id(0)
    slot = tl.load(chunk_slot_ptr + c)
    g = tl.load(slot_ptr + slot.to(tl.int64) * SLOT_FIELDS + 5)
    state = state_ptr + g * GROUP_FIELDS
    if tl.load(state + 6) == 0:
        return
    key, ok, is_nan, q, slot = _chunk_keys(c, chunk_slot_ptr, slot_ptr, KEY_BITS, INF_BITS, LARGEST,
                                           BLOCK_W, SLOT_FIELDS)
    thresh = tl.load(state + 4).to(tl.uint32)
    tl.store(ties_ptr + c, tl.sum((ok & (key == thresh)).to(tl.int32)))


@triton.jit
def _write_mask_kernel(
    chunk_slot_ptr, slot_ptr, state_ptr, ties_before_ptr,
    KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, LARGEST: tl.constexpr,
    BLOCK_W: tl.constexpr, SLOT_FIELDS: tl.constexpr, GROUP_FIELDS: tl.constexpr,
):
    """Packed words of chunk c: key > T, or key == T with tie rank < limit."""
    c = tl.program_id(0)
    key, ok, is_nan, q, slot = _chunk_keys(c, chunk_slot_ptr, slot_ptr, KEY_BITS, INF_BITS, LARGEST,
                                           BLOCK_W, SLOT_FIELDS)
    row_ptr = slot_ptr + slot.to(tl.int64) * SLOT_FIELDS
    g = tl.load(row_ptr + 5)
    state = state_ptr + g * GROUP_FIELDS
    thresh = tl.load(state + 4).to(tl.uint32)
    limit = tl.load(state + 5)
    # Ties in the group's earlier chunks (zero where ranks were not needed: then limit >= all ties).
    rank0 = tl.load(ties_before_ptr + c) - tl.load(ties_before_ptr + tl.load(state + 7))

    tie = (ok & (key == thresh)).to(tl.int32)
    in_word = tl.cumsum(tie, 1) - tie
    per_word = tl.sum(tie, 1)
    before_word = tl.cumsum(per_word, 0) - per_word
    rank = rank0 + before_word[:, None] + in_word
    kept = ok & ((key > thresh) | ((tie != 0) & (rank < limit)))
    # Distinct bits, so OR-reducing them builds the word; 1 << 31 wraps to the int32 sign bit.
    word = tl.reduce(kept.to(tl.int32) << tl.arange(0, 32)[None, :], 1, _bitwise_or)
    out = tl.load(row_ptr + 6).to(tl.pointer_type(tl.int32))
    tl.store(out + q, word, mask=q < tl.load(row_ptr + 3))


# ---- launcher -----------------------------------------------------------------------------------

def _table(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host-built table on `device`; pinned and non-blocking so that no launch waits for it.

    The copy goes to the current stream of `device`, the stream the kernels launch on (topk_mask_fwd
    runs under ``torch.cuda.device(device)``), so it is ordered before the launches that read it."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _check_inputs(scores, group, ks) -> list[int]:
    """Validates the arguments; returns the number of scores of each group."""
    if not isinstance(scores, (list, tuple)) or not scores:
        raise ValueError("scores: expected a non-empty list of tensors")
    if len(scores) > _MAX_TENSORS:
        raise ValueError(f"scores: expected at most {_MAX_TENSORS} tensors (one grid axis of the sample "
                         f"kernel), got {len(scores)}")
    first = scores[0]
    if first.dtype not in _INF_BITS:
        raise ValueError(f"scores[0]: expected dtype float32, float16 or bfloat16, got {first.dtype}")
    # The interpreter runs on CPU tensors; compiled Triton needs CUDA memory.
    if not _INTERPRET and first.device.type != "cuda":
        raise ValueError(f"scores[0]: expected a CUDA tensor, got a tensor on '{first.device}'")
    for i, s in enumerate(scores):
        if s.dtype != first.dtype or s.device != first.device:
            raise ValueError(f"scores[{i}]: expected dtype {first.dtype} on {first.device} (those of scores[0]), "
                             f"got {s.dtype} on {s.device}")
        if not s.is_contiguous():
            raise ValueError(f"scores[{i}]: expected a contiguous tensor")
    if len(group) != len(scores):
        raise ValueError(f"group: expected one group index per score tensor ({len(scores)}), got {len(group)}")
    if any(not 0 <= g < len(ks) for g in group):
        raise ValueError(f"group: expected ints in [0, {len(ks)}) (one k per group), got {list(group)}")
    sizes = [0] * len(ks)
    for s, g in zip(scores, group):
        sizes[g] += s.numel()
    for g, (k, n) in enumerate(zip(ks, sizes)):
        if not 0 <= k <= n:
            raise ValueError(f"ks[{g}]: expected an int in [0, {n}] (the size of group {g}), got {k}")
    return sizes


def _selection_view(shape) -> tuple[int, int]:
    """(shape[0], prod(shape[1:])) for rank >= 2, (1, numel) for rank <= 1 (sparse_engine.ops.mask_pack)."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def _locate(hist, above, k):
    """The bin holding each group's k-th largest key, given #keys above the histogrammed range.

    Returns (bin, #keys above the bin, #keys in the bin, hit): hit is False where the k-th key is
    not inside the range. Works on the device: O(G * bins) torch ops, no sync."""
    before = hist.cumsum(1, dtype=hist.dtype)
    before -= hist                                  # keys in lower bins
    inside = before[:, -1] + hist[:, -1]
    need = k - above                                # keys still to take from the range
    # Bins b with count(range keys in bins >= b) >= need are a prefix 0..b*; b* holds the k-th key.
    b = (before <= (inside - need)[:, None]).sum(1) - 1
    hit = (need > 0) & (b >= 0)
    b = b.clamp(0, hist.shape[1] - 1)
    at_b = hist.gather(1, b[:, None]).squeeze(1).long()
    above_b = above + inside - before.gather(1, b[:, None]).squeeze(1) - at_b
    return b, above_b, at_b, hit


def topk_mask_fwd(scores: list[torch.Tensor], group: list[int], ks: list[int], largest: bool) -> list[torch.Tensor]:
    """Packed keep-masks of the ks[g] best scores of each group (the rule of sparse_engine.ops.topk_mask).

    scores: T contiguous tensors, one dtype (float32, float16, bfloat16), one device, any shapes.
    group: T ints in [0, G); ks: G ints, 0 <= ks[g] <= number of scores in group g.
    Returns T new int32 tensors: scores[i] viewed as (rows, cols) (rows = shape[0] for rank >= 2,
    else 1) packed to (rows, ceil(cols / 32)), bit j of word w = element 32*w + j, padding bits 0.
    Raises ValueError("scores[i]: contains NaN; ...") if a score is NaN.
    """
    group, ks = list(group), list(ks)
    sizes = _check_inputs(scores, group, ks)
    # Triton launches on the current CUDA device and torch copies on its current stream: make both
    # the scores' device, or launches land on another GPU and table copies race the kernels.
    device = scores[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _select(scores, group, ks, sizes, largest)


def _select(scores, group, ks, sizes, largest):
    """topk_mask_fwd on checked arguments, on the scores' device."""
    device, dtype = scores[0].device, scores[0].dtype
    n_tensors, n_groups = len(scores), len(ks)
    key_bits = 32 if dtype == torch.float32 else 16
    digit_shift = key_bits - 16
    full_key = (1 << key_bits) - 1
    block_w = _BLOCK_W

    masks = []
    for s in scores:
        rows, cols = _selection_view(s.shape)
        masks.append(torch.empty((rows, triton.cdiv(cols, 32)), dtype=torch.int32, device=device))

    # Large groups with a real choice to make sample their scores (see the module docstring).
    group_samples = [0] * n_groups
    for s, g in zip(scores, group):
        group_samples[g] += s.numel() // _SAMPLE_RATE
    sampled = [n >= _SAMPLE_MIN_NUMEL and 0 < k < n and m > 0 for n, k, m in zip(sizes, ks, group_samples)]
    order = sorted(range(n_tensors), key=lambda i: group[i])  # stable: tensor order within a group
    slot_rows, chunks_per_slot, group_first = [], [], [None] * n_groups
    n_chunks = 0
    for i in order:
        s, m, g = scores[i], masks[i], group[i]
        rows, cols = _selection_view(s.shape)
        words = m.numel()
        chunks = triton.cdiv(words, block_w)
        if group_first[g] is None:
            group_first[g] = n_chunks
        n_samples = s.numel() // _SAMPLE_RATE if sampled[g] else 0
        slot_rows.append([s.data_ptr(), cols, m.shape[1], words, n_chunks, g, m.data_ptr(), s.numel(), n_samples])
        chunks_per_slot.append(chunks)
        n_chunks += chunks
    if n_chunks == 0:  # every tensor is empty: nothing to read, nothing to write
        return masks
    slot_table = _table(slot_rows, torch.int64, device)
    chunk_slot = torch.repeat_interleave(
        torch.arange(n_tensors, dtype=torch.int32, device=device),
        _table(chunks_per_slot, torch.int64, device), output_size=n_chunks)

    # Per-group state. Trivial groups (k = 0 or k = n) are final from the start: k = 0 keeps no key
    # (none exceeds the top key, no tie rank is < 0), k = n keeps all (every rank is < n).
    active = [0 < k < n for n, k in zip(sizes, ks)]
    state_rows = []
    for g, (n, k) in enumerate(zip(sizes, ks)):
        state_rows.append([0, full_key, digit_shift, int(active[g]),
                           full_key if k == 0 else 0, 0 if k == 0 else n, 0, group_first[g] or 0])
    state = _table(state_rows, torch.int64, device)
    k_dev = _table(ks, torch.int64, device)
    is_active = state[:, _G_ACTIVE] != 0

    count_dtype = torch.int32 if max(sizes) < 2**31 else torch.int64
    hist = torch.zeros((n_groups, _NUM_BINS), dtype=count_dtype, device=device)
    above = torch.zeros(n_groups, dtype=torch.int64, device=device)
    nan_count = torch.zeros(n_tensors, dtype=torch.int64, device=device)
    meta = dict(KEY_BITS=key_bits, INF_BITS=_INF_BITS[dtype], LARGEST=bool(largest))
    layout = dict(BLOCK_W=block_w, SLOT_FIELDS=_SLOT_FIELDS, GROUP_FIELDS=_GROUP_FIELDS)

    def histogram_pass(count_nan: bool):
        _histogram_kernel[(n_chunks,)](
            chunk_slot, slot_table, state, hist, above, nan_count,
            COUNT_NAN=count_nan, NUM_BINS=_NUM_BINS, **meta, **layout, num_warps=_NUM_WARPS)
        return _locate(hist, above, k_dev)

    full_range = _table([0, full_key, digit_shift], torch.int64, device)
    any_sampled = any(sampled)
    if any_sampled:
        # Bracket of top digits around each sampled group's expected threshold rank.
        lo_rank, hi_rank = [], []
        for n, k, s in zip(sizes, ks, group_samples):
            expect = k * s / n if n else 0.0
            margin = _SAMPLE_SIGMAS * math.sqrt(s) + _SAMPLE_SLACK
            lo_rank.append(max(0, math.floor(expect - margin)))
            hi_rank.append(min(s + 1, math.ceil(expect + margin)))
        # Axis 1 (slots) allows 65535 programs: _check_inputs caps the number of tensors.
        grid = (triton.cdiv(max(r[_S_NSAMPLE] for r in slot_rows), _SAMPLE_BLOCK), n_tensors)
        _sample_histogram_kernel[grid](
            slot_table, hist, MULT=_SAMPLE_MULT, BLOCK=_SAMPLE_BLOCK,
            NUM_BINS=_NUM_BINS, SLOT_FIELDS=_SLOT_FIELDS, **meta, num_warps=_NUM_WARPS)
        before = hist.cumsum(1, dtype=hist.dtype)
        before -= hist
        total = (before[:, -1] + hist[:, -1]).long()
        # Digits holding the lo_rank-th and hi_rank-th largest sample (rank 0: the top digit).
        d_hi = (before <= (total - _table(lo_rank, torch.int64, device))[:, None]).sum(1) - 1
        d_lo = ((before <= (total - _table(hi_rank, torch.int64, device))[:, None]).sum(1) - 1).clamp(min=0)
        n_digits = d_hi - d_lo + 1
        log2_digits = (n_digits[:, None] > 2 ** torch.arange(17, device=device)).sum(1)  # ceil(log2)
        bracket = torch.stack([d_lo << digit_shift, ((d_hi + 1) << digit_shift) - 1,
                               (log2_digits + digit_shift - 16).clamp(min=0)], 1)
        use = _table(sampled, torch.bool, device)
        state[:, :3] = torch.where(use[:, None], bracket, full_range)
        hist.zero_()

    b, above_b, at_b, hit = histogram_pass(count_nan=True)
    if any_sampled:
        # Repair: groups whose bracket missed the threshold start over on all keys.
        miss = is_active & ~hit
        state[:, :3] = torch.where(miss[:, None], full_range, state[:, :3])
        state[:, _G_ACTIVE] = miss.long()
        hist.masked_fill_(miss[:, None], 0)
        above.masked_fill_(miss, 0)
        b2, above_b2, at_b2, _ = histogram_pass(count_nan=False)
        b, above_b, at_b = (torch.where(miss, new, old) for new, old in
                            ((b2, b), (above_b2, above_b), (at_b2, at_b)))
    lo = state[:, _G_LO] + (b << state[:, _G_SHIFT])
    if key_bits == 32:
        # Pass B inside the bin found, for groups whose bins were wider than one key.
        wide = is_active & (state[:, _G_SHIFT] > 0)
        state[:, _G_LO] = lo
        state[:, _G_HI] = lo + (1 << state[:, _G_SHIFT]) - 1
        state[:, _G_SHIFT] = 0
        state[:, _G_ACTIVE] = wide.long()
        hist.zero_()
        above.zero_()
        b2, above_b2, at_b2, _ = histogram_pass(count_nan=False)
        lo = torch.where(wide, lo + b2, lo)
        above_b = torch.where(wide, above_b2, above_b)
        at_b = torch.where(wide, at_b2, at_b)
    # lo is now T itself for active groups; above_b = count(key > T), at_b = count(key == T).
    limit = k_dev - above_b
    state[:, _G_THRESH] = torch.where(is_active, lo, state[:, _G_THRESH])
    state[:, _G_LIMIT] = torch.where(is_active, limit, state[:, _G_LIMIT])
    state[:, _G_NEED_RANK] = (is_active & (limit < at_b)).long()

    ties = torch.zeros(n_chunks, dtype=torch.int32, device=device)
    _tie_count_kernel[(n_chunks,)](chunk_slot, slot_table, state, ties, **meta, **layout, num_warps=_NUM_WARPS)
    ties_before = ties.cumsum(0) - ties
    _write_mask_kernel[(n_chunks,)](chunk_slot, slot_table, state, ties_before, **meta, **layout,
                                    num_warps=_NUM_WARPS)

    nan_slots = nan_count.nonzero().flatten().tolist()  # the one host sync
    if nan_slots:
        bad = min(order[s] for s in nan_slots)
        raise ValueError(f"scores[{bad}]: contains NaN; NaN scores cannot be ranked")
    return masks
