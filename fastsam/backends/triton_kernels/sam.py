"""Triton kernels for the passes of docs/design.md §2. Arithmetic only; launchers in ../triton.py.

Every kernel walks a *segment table*: program ``s`` handles elements
``[seg_start[s], seg_start[s] + seg_len[s])`` of tensor ``seg_tensor[s]``, whose base address
per role (w, g, w_old, state) is read from an int64 address table. One launch therefore covers
any number of tensors of one dtype combination. Offsets are int64 (tensors over 2^31 elements);
loads are widened to ``ACC`` (fp32, or fp64 for fp64 storage), results are rounded once on
store. ``*_REF`` arguments are tensors of
the role's dtype, used only for their element type.

Per-tensor operator code ``mode``: 0 = T is 1 (SAM), 1 = T = |w| + eta (element-wise ASAM),
2 = T = ‖w[i]‖₂ + eta (filter-wise ASAM; that tensor's segments are whole filters i), 3 = T = 1
in the norm and e multiplied by |w| + eta (Adaptive-GSAM, functional.Scaling "outer").
``QMODE``: 0 when q = 2 (p = 2), 1 when q = 1 (p = ∞), 2 for any other q.
"""
import os

import triton
import triton.language as tl

# Triton's interpreter (CPU tests) truncates fp32 → bf16 even when asked for round-to-nearest-even,
# which biases every bf16 update; compiled kernels round to nearest even. Under the interpreter
# the rounding is therefore done explicitly (bit-exact with torch), so the tests check the
# numerics the GPU produces.
_SOFTWARE_BF16_RTNE = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _pow_q(x, q, QMODE: tl.constexpr):
    """x^q for x >= 0 (0^q = 0)."""
    if QMODE == 0:
        return x * x
    elif QMODE == 1:
        return x
    else:
        return tl.exp2(q * tl.log2(x))


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """Round an fp32/fp64 value to the storage dtype (round to nearest even)."""
    if DTYPE == tl.bfloat16 and _SOFTWARE_BF16_RTNE:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def _segment(seg_tensor, seg_start, seg_len, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    t = tl.load(seg_tensor + s)
    start = tl.load(seg_start + s)
    if ALIGNED:  # every segment starts at a multiple of BLOCK: lets loads vectorise
        start = tl.multiple_of(start, BLOCK)
    n = tl.load(seg_len + s)
    return s, t, start, n


@triton.jit
def _address(table, t, REF, ALIGNED: tl.constexpr):
    ptr = tl.load(table + t).to(tl.pointer_type(REF.dtype.element_ty))
    if ALIGNED:  # launcher checked: every base address is 16-byte aligned
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def norm_partials_kernel(
    seg_tensor, seg_start, seg_len,
    w_addr, g_addr, mode_of, eta_of,
    partials, filter_T, hp, m_addr, group_of, momentum_of_group,
    W_REF, G_REF,
    QMODE: tl.constexpr, MOM: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass A, stage 1: partials[s] = Σ_{i in segment s} |T·g|^q (no atomics: stage 2 sums
    the partials in a fixed order). Filter segments also write their T to filter_T[s].
    hp = [q]. MOM (FriendlySAM): g is d = g − sigma·m, m at m_addr, sigma the first of the
    three values of its group in momentum_of_group."""
    s, t, start, n = _segment(seg_tensor, seg_start, seg_len, ALIGNED, BLOCK)
    q = tl.load(hp).to(ACC)
    mode = tl.load(mode_of + t)
    eta = tl.load(eta_of + t).to(ACC)
    w_ptr = _address(w_addr, t, W_REF, ALIGNED)
    g_ptr = _address(g_addr, t, G_REF, ALIGNED)
    if MOM:
        m_ptr = _address(m_addr, t, G_REF, ALIGNED)
        sigma = tl.load(momentum_of_group + 3 * tl.load(group_of + t)).to(ACC)
    n_w = tl.where((mode == 1) | (mode == 2), n, 0)  # w is read only where the norm needs it
    acc_u = tl.zeros([BLOCK], dtype=ACC)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n, BLOCK):
        local = off + tl.arange(0, BLOCK).to(tl.int64)
        inside = local < n
        idx = start + local
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(ACC)
        if MOM:
            g = g - sigma * tl.load(m_ptr + idx, mask=inside, other=0.0).to(ACC)
        w = tl.load(w_ptr + idx, mask=local < n_w, other=0.0).to(ACC)
        T = tl.where(mode == 1, tl.abs(w) + eta, 1.0)  # filter T is constant: applied below
        acc_u += _pow_q(tl.abs(T * g), q, QMODE)
        acc_w += w * w
    row_T = tl.sqrt(tl.sum(acc_w, axis=0)) + eta
    row_scale = tl.where(mode == 2, _pow_q(row_T, q, QMODE), 1.0)
    tl.store(partials + s, tl.sum(acc_u, axis=0) * row_scale)
    tl.store(filter_T + s, row_T)


@triton.jit
def sum_kernel(x, n, out, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass A, stage 2: out = Σ x[0:n] in a fixed order (one program: deterministic)."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(x + idx, mask=idx < n, other=0.0).to(ACC)
    tl.store(out, tl.sum(acc, axis=0))


@triton.jit
def gsam_partials_kernel(
    seg_tensor, seg_start, seg_len, adv_addr, first_addr, partials, G_REF,
    ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """GSAM's reduction, stage 1: partials[3s : 3s + 3] = Σ over segment s of g·g_adv,
    g_adv², g² (adv = this step's gradient g_adv, first = the kept first gradient g)."""
    s, t, start, n = _segment(seg_tensor, seg_start, seg_len, ALIGNED, BLOCK)
    adv_ptr = _address(adv_addr, t, G_REF, ALIGNED)
    first_ptr = _address(first_addr, t, G_REF, ALIGNED)
    inner = tl.zeros([BLOCK], dtype=ACC)
    adv_sq = tl.zeros([BLOCK], dtype=ACC)
    first_sq = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n, BLOCK):
        local = off + tl.arange(0, BLOCK).to(tl.int64)
        inside = local < n
        idx = start + local
        a = tl.load(adv_ptr + idx, mask=inside, other=0.0).to(ACC)
        g = tl.load(first_ptr + idx, mask=inside, other=0.0).to(ACC)
        inner += g * a
        adv_sq += a * a
        first_sq += g * g
    tl.store(partials + 3 * s, tl.sum(inner, axis=0))
    tl.store(partials + 3 * s + 1, tl.sum(adv_sq, axis=0))
    tl.store(partials + 3 * s + 2, tl.sum(first_sq, axis=0))


@triton.jit
def gsam_along_kernel(partials, n, hp, out, SUMS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    """GSAM's reduction, stage 2 (one program, fixed order): the three sums, then
    out = cos·‖g‖ / (‖g_adv‖ + eps) with cos = ⟨g, g_adv⟩ / (‖g_adv‖·‖g‖ + eps). hp = [eps].
    SUMS: out[0:3] = the three sums instead (sharded parameters reduce them across ranks)."""
    inner = tl.zeros([BLOCK], dtype=ACC)
    adv_sq = tl.zeros([BLOCK], dtype=ACC)
    first_sq = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inside = idx < n
        inner += tl.load(partials + 3 * idx, mask=inside, other=0.0).to(ACC)
        adv_sq += tl.load(partials + 3 * idx + 1, mask=inside, other=0.0).to(ACC)
        first_sq += tl.load(partials + 3 * idx + 2, mask=inside, other=0.0).to(ACC)
    if SUMS:
        tl.store(out, tl.sum(inner, axis=0))
        tl.store(out + 1, tl.sum(adv_sq, axis=0))
        tl.store(out + 2, tl.sum(first_sq, axis=0))
    else:
        eps = tl.load(hp).to(ACC)
        adv_norm = tl.sqrt(tl.sum(adv_sq, axis=0))
        first_norm = tl.sqrt(tl.sum(first_sq, axis=0))
        cosine = tl.sum(inner, axis=0) / (adv_norm * first_norm + eps)
        tl.store(out, cosine * first_norm / (adv_norm + eps))


@triton.jit
def _hyper(hp, i, bits, HP_DEVICE: tl.constexpr, ACC: tl.constexpr):
    """Scalar ``i`` of an update, in ACC: by value, ``bits`` being its fp64 bit pattern (an int
    argument: Triton rounds a float argument to fp32), so that new values (an lr schedule, Adam's
    bias corrections, the SWA weight) upload and allocate nothing; or, HP_DEVICE (values formed
    on the device: a tensor lr), entry ``i`` of the fp64 array ``hp``."""
    if HP_DEVICE:
        value = tl.load(hp + i).to(ACC)
    else:
        value = bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    return value


@triton.jit
def _gradient_source(g_ptr, first_addr, along_ptr, alpha, t, G_REF,
                     GMODE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr):
    """Per program, what _update_gradient reads besides g: the second gradient's pointer
    (GSAM's g, FreeSAM's stored gradient, LookSAM's direction; g itself when unused), alpha
    (GSAM's, given; 0 otherwise) and along (GSAM's, or LookSAM's coefficient; 0 otherwise)."""
    first_ptr = g_ptr
    along = tl.zeros([], dtype=ACC)
    if GMODE != 0:
        first_ptr = _address(first_addr, t, G_REF, ALIGNED)
    if GMODE != 1:
        alpha = tl.zeros([], dtype=ACC)
    if GMODE == 1 or GMODE == 3:
        along = tl.load(along_ptr).to(ACC)
    return first_ptr, alpha, along


@triton.jit
def _update_gradient(g_ptr, first_ptr, idx, inside, write, alpha, along, gain, G_REF,
                     MAXIMIZE: tl.constexpr, GMODE: tl.constexpr, ACC: tl.constexpr):
    """The gradient an update uses (GMODE), g being gain·g (max_grad_norm's clip coefficient,
    1 without): 0 g; 1 GSAM's (1 + alpha·along)·g - alpha·g_first; 2 FreeSAM's stored gradient
    at first_ptr, which then receives g (where ``write``); 3 LookSAM's g + along·u_v. Negated
    when maximizing."""
    if GMODE == 2:
        current = _to_storage(tl.load(g_ptr + idx, mask=inside).to(ACC) * gain,
                              G_REF.dtype.element_ty)  # g itself, bit for bit, when gain is 1
        g = tl.load(first_ptr + idx, mask=inside).to(ACC)
        tl.store(first_ptr + idx, current, mask=write)
    else:
        g = tl.load(g_ptr + idx, mask=inside).to(ACC) * gain
    if GMODE == 1:
        g = (1.0 + alpha * along) * g - alpha * tl.load(first_ptr + idx, mask=inside).to(ACC)
    if GMODE == 3:
        g = g + along * tl.load(first_ptr + idx, mask=inside).to(ACC)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _update_goes_ahead(skip_ptr, SKIP: tl.constexpr):
    """False when the update is skipped (SKIP: the device flag at skip_ptr is non-zero; then
    w ← w_old and nothing else is written), else True."""
    if SKIP:
        ahead = tl.load(skip_ptr) == 0.0
    else:
        ahead = tl.full([], 1, tl.int1)
    return ahead


@triton.jit
def _average(avg_ptr, idx, inside, new_w, weight, ACC: tl.constexpr):
    """Weight averaging of the stored new weights (functional.Average): avg ← w when weight is 1
    (an exact copy), avg kept when it is 0, else avg + weight·(w - avg)."""
    w = new_w.to(ACC)
    avg = tl.load(avg_ptr + idx, mask=inside).to(ACC)
    avg = tl.where(weight == 1.0, w, tl.where(weight == 0.0, avg, avg + weight * (w - avg)))
    tl.store(avg_ptr + idx, _to_storage(avg, avg_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mix32(x):
    """ESAM's 32-bit finaliser over uint32 values (csrc/elementwise.h mix32; wraps mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit(do_not_specialize=["key0", "key1"])
def perturb_kernel(
    seg_tensor, seg_start, seg_len,
    w_addr, g_addr, w_old_addr, mode_of, eta_of, group_of, rho_of_group,
    filter_T, norm_sum, skipped, hp, keep_addr, m_addr, m_next_addr, momentum_of_group,
    index_of, mask_of_group, offset_at, key0, key1,
    W_REF, G_REF,
    QMODE: tl.constexpr, KEEP: tl.constexpr, MOM: tl.constexpr, MASK: tl.constexpr,
    ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass B: w_old ← w (bit copy); w ← w + ρ·T·sign(u)·|u|^(q-1) / (S^(1/p) + eps), u = T·g
    (mode 3: u = g and the whole term times |w| + eta). A non-finite S leaves w untouched and
    sets skipped = 1 (else 0). hp = [q, 1/p, eps]; ρ is per group (rho_of_group[group_of[t]]),
    so a ρ schedule changes no table. KEEP: also keep[t] ← g (GSAM's first gradient). MOM
    (FriendlySAM): g is d = g − sigma·m, and m_next ← lmbda·m + gain·g (m itself for a
    non-finite S), [sigma, lmbda, gain] per group in momentum_of_group. MASK (ESAM): only
    the elements whose draw (fastsam.functional.Mask, the stream of the tensor's position
    index_of[t] under the key (key0, key1): int64 arguments whose low 32 bits are the words,
    at the element's index plus the tensor's offset, mask_of_group[offset_at + position] when
    offset_at >= 0) falls below their group's threshold in mask_of_group move."""
    s, t, start, n = _segment(seg_tensor, seg_start, seg_len, ALIGNED, BLOCK)
    q = tl.load(hp).to(ACC)
    inv_p = tl.load(hp + 1).to(ACC)
    eps = tl.load(hp + 2).to(ACC)
    S = tl.load(norm_sum).to(ACC)
    ok = (S == S) & (tl.abs(S) < float("inf"))
    if QMODE == 1:  # p = ∞: e = ρ·T·sign(g), no denominator
        inv_denom = 1.0
    elif QMODE == 0:
        inv_denom = 1.0 / (tl.sqrt(S) + eps)
    else:
        inv_denom = 1.0 / (tl.exp2(tl.log2(S) * inv_p) + eps)
    rho = tl.load(rho_of_group + tl.load(group_of + t)).to(ACC)
    scale = tl.where(ok, rho * inv_denom, 0.0)
    mode = tl.load(mode_of + t)
    eta = tl.load(eta_of + t).to(ACC)
    row_T = tl.load(filter_T + s).to(ACC)
    w_ptr = _address(w_addr, t, W_REF, ALIGNED)
    g_ptr = _address(g_addr, t, G_REF, ALIGNED)
    old_ptr = _address(w_old_addr, t, W_REF, ALIGNED)
    if KEEP:
        keep_ptr = _address(keep_addr, t, G_REF, ALIGNED)
    if MOM:
        m_ptr = _address(m_addr, t, G_REF, ALIGNED)
        m_next_ptr = _address(m_next_addr, t, G_REF, ALIGNED)
        momentum = momentum_of_group + 3 * tl.load(group_of + t)
        sigma = tl.load(momentum).to(ACC)
        lmbda = tl.load(momentum + 1).to(ACC)
        gain = tl.load(momentum + 2).to(ACC)
    if MASK:
        position = tl.load(index_of + t).to(tl.uint32)
        b = _mix32(key0.to(tl.uint32) ^ _mix32(position))
        c = _mix32(key1.to(tl.uint32) ^ b)
        threshold = tl.load(mask_of_group + tl.load(group_of + t)).to(tl.int64)
        first = start.to(tl.int64)
        if offset_at >= 0:
            first += tl.load(mask_of_group + offset_at + position.to(tl.int64)).to(tl.int64)
    for off in range(0, n, BLOCK):
        local = off + tl.arange(0, BLOCK).to(tl.int64)
        inside = local < n
        idx = start + local
        w_raw = tl.load(w_ptr + idx, mask=inside)
        w = w_raw.to(ACC)
        g_raw = tl.load(g_ptr + idx, mask=inside, other=0.0)
        if KEEP:
            tl.store(keep_ptr + idx, g_raw, mask=inside)
        g = g_raw.to(ACC)
        if MOM:
            m_raw = tl.load(m_ptr + idx, mask=inside, other=0.0)
            m = m_raw.to(ACC)
            m_next = _to_storage(lmbda * m + gain * g, G_REF.dtype.element_ty)
            tl.store(m_next_ptr + idx, tl.where(ok, m_next, m_raw), mask=inside)
            g = g - sigma * m
        T = tl.where(mode == 1, tl.abs(w) + eta, tl.where(mode == 2, row_T, 1.0))
        u = T * g
        if QMODE == 0:
            direction = T * u
        elif QMODE == 1:
            direction = T * _sign(u)
        else:
            direction = T * _sign(u) * tl.exp2((q - 1.0) * tl.log2(tl.abs(u)))
        direction = tl.where(mode == 3, (tl.abs(w) + eta) * direction, direction)
        new_w = tl.where(ok, _to_storage(w + scale * direction, W_REF.dtype.element_ty), w_raw)
        if MASK:  # the elements the draw leaves out keep w
            i = first + local  # the element's index in the mask
            draw = _mix32(_mix32(i.to(tl.uint32) + b) ^ (c + (i >> 32).to(tl.uint32)))
            new_w = tl.where(draw.to(tl.int64) < threshold, new_w, w_raw)
        tl.store(old_ptr + idx, w_raw, mask=inside)
        tl.store(w_ptr + idx, new_w, mask=inside)
    if s == 0:
        tl.store(skipped, tl.where(ok, 0.0, 1.0))


@triton.jit
def restore_kernel(
    seg_tensor, seg_start, seg_len, w_addr, w_old_addr, W_REF,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass C without an update: w ← w_old."""
    s, t, start, n = _segment(seg_tensor, seg_start, seg_len, ALIGNED, BLOCK)
    w_ptr = _address(w_addr, t, W_REF, ALIGNED)
    old_ptr = _address(w_old_addr, t, W_REF, ALIGNED)
    for off in range(0, n, BLOCK):
        local = off + tl.arange(0, BLOCK).to(tl.int64)
        idx = start + local
        tl.store(w_ptr + idx, tl.load(old_ptr + idx, mask=local < n), mask=local < n)


_SGD_SCALARS = ["h0", "h1", "h2", "h3", "h4", "h5"]


@triton.jit(do_not_specialize=_SGD_SCALARS)
def sgd_kernel(
    seg_tensor, seg_start, seg_len,
    w_addr, g_addr, w_old_addr, buf_addr, hp,
    h0: tl.int64, h1: tl.int64, h2: tl.int64, h3: tl.int64, h4: tl.int64, h5: tl.int64,
    first_addr, along_ptr, avg_addr, skip_ptr, clip_ptr,
    W_REF, G_REF, BUF_REF,
    HAS_MOMENTUM: tl.constexpr, FRESH: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, GMODE: tl.constexpr, AVG: tl.constexpr, SKIP: tl.constexpr,
    HP_DEVICE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass C fused with torch.optim.SGD (see functional.Backend.restore_sgd).
    The scalars [lr, momentum, dampening, weight_decay, alpha, averaging weight] are h0..h5 (by
    value) or hp (HP_DEVICE), read by _hyper; GMODE as _update_gradient (first_addr: GSAM's g
    or FreeSAM's stored gradient; along: GSAM's 0-d scalar); AVG: the new weights are averaged
    into avg_addr's tensors (_average); SKIP: the flag at skip_ptr may skip the update
    (_update_goes_ahead); clip_ptr: max_grad_norm's coefficient (a 1 without)."""
    s, t, start, n = _segment(seg_tensor, seg_start, seg_len, ALIGNED, BLOCK)
    ahead = _update_goes_ahead(skip_ptr, SKIP)
    lr = _hyper(hp, 0, h0, HP_DEVICE, ACC)
    momentum = _hyper(hp, 1, h1, HP_DEVICE, ACC)
    dampening = _hyper(hp, 2, h2, HP_DEVICE, ACC)
    weight_decay = _hyper(hp, 3, h3, HP_DEVICE, ACC)
    w_ptr = _address(w_addr, t, W_REF, ALIGNED)
    g_ptr = _address(g_addr, t, G_REF, ALIGNED)
    old_ptr = _address(w_old_addr, t, W_REF, ALIGNED)
    first_ptr, alpha, along = _gradient_source(g_ptr, first_addr, along_ptr,
                                               _hyper(hp, 4, h4, HP_DEVICE, ACC), t, G_REF,
                                               GMODE, ACC, ALIGNED)
    gain = tl.load(clip_ptr).to(ACC)
    if HAS_MOMENTUM:
        buf_ptr = _address(buf_addr, t, BUF_REF, ALIGNED)
    if AVG:
        avg_ptr = _address(avg_addr, t, W_REF, ALIGNED)
        avg_weight = _hyper(hp, 5, h5, HP_DEVICE, ACC)
    for off in range(0, n, BLOCK):
        local = off + tl.arange(0, BLOCK).to(tl.int64)
        inside = local < n
        idx = start + local
        write = tl.where(ahead, inside, False)  # (inside & ahead fails in the interpreter)
        w_raw = tl.load(old_ptr + idx, mask=inside)
        w = w_raw.to(ACC)
        d = _update_gradient(g_ptr, first_ptr, idx, inside, write, alpha, along, gain, G_REF,
                             MAXIMIZE,
                             GMODE, ACC)
        d = d + weight_decay * w
        if HAS_MOMENTUM:
            if FRESH:  # torch.optim's first step: buf = d, no dampening
                buf = d
            else:
                buf = momentum * tl.load(buf_ptr + idx, mask=inside).to(ACC)
                buf = buf + (1.0 - dampening) * d
            tl.store(buf_ptr + idx, _to_storage(buf, BUF_REF.dtype.element_ty), mask=write)
            if NESTEROV:
                d = d + momentum * buf
            else:
                d = buf
        new_w = tl.where(ahead, _to_storage(w - lr * d, W_REF.dtype.element_ty), w_raw)
        tl.store(w_ptr + idx, new_w, mask=inside)
        if AVG:
            _average(avg_ptr, idx, write, new_w, avg_weight, ACC)


_ADAM_SCALARS = ["h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8", "h9"]


@triton.jit(do_not_specialize=_ADAM_SCALARS)
def adam_kernel(
    seg_tensor, seg_start, seg_len,
    w_addr, g_addr, w_old_addr, m_addr, v_addr, vmax_addr, hp,
    h1: tl.int64, h2: tl.int64, h3: tl.int64, h4: tl.int64, h5: tl.int64, h6: tl.int64,
    h7: tl.int64, h8: tl.int64, h9: tl.int64,
    first_addr, along_ptr, avg_addr, skip_ptr, bias, index_of, clip_ptr,
    W_REF, G_REF, M_REF,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    GMODE: tl.constexpr, AVG: tl.constexpr, SKIP: tl.constexpr, BIAS: tl.constexpr,
    HP_DEVICE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass C fused with torch.optim.Adam/AdamW (see functional.Backend.restore_adam).
    The scalars [lr, β1, β2, eps, weight_decay, lr/(1-β1^t), sqrt(1-β2^t), 1 - lr·weight_decay,
    alpha, averaging weight] are h1..h9 by value (lr itself is not read: only the derived
    values, which come from the host as torch.optim forms them), or hp (HP_DEVICE: in lr's
    dtype for a tensor lr), read by _hyper. GMODE, AVG, SKIP, clip_ptr as in sgd_kernel.
    BIAS: the two bias corrections per tensor, from row index_of[t] of bias (n, 2) instead."""
    s, t, start, n = _segment(seg_tensor, seg_start, seg_len, ALIGNED, BLOCK)
    ahead = _update_goes_ahead(skip_ptr, SKIP)
    beta1 = _hyper(hp, 1, h1, HP_DEVICE, ACC)
    beta2 = _hyper(hp, 2, h2, HP_DEVICE, ACC)
    eps = _hyper(hp, 3, h3, HP_DEVICE, ACC)
    weight_decay = _hyper(hp, 4, h4, HP_DEVICE, ACC)
    if BIAS:
        row = bias + 2 * tl.load(index_of + t).to(tl.int64)
        step_size = tl.load(row).to(ACC)
        bias_correction2_sqrt = tl.load(row + 1).to(ACC)
    else:
        step_size = _hyper(hp, 5, h5, HP_DEVICE, ACC)
        bias_correction2_sqrt = _hyper(hp, 6, h6, HP_DEVICE, ACC)
    decay = _hyper(hp, 7, h7, HP_DEVICE, ACC)
    w_ptr = _address(w_addr, t, W_REF, ALIGNED)
    g_ptr = _address(g_addr, t, G_REF, ALIGNED)
    old_ptr = _address(w_old_addr, t, W_REF, ALIGNED)
    m_ptr = _address(m_addr, t, M_REF, ALIGNED)
    v_ptr = _address(v_addr, t, M_REF, ALIGNED)
    if AMSGRAD:
        vmax_ptr = _address(vmax_addr, t, M_REF, ALIGNED)
    first_ptr, alpha, along = _gradient_source(g_ptr, first_addr, along_ptr,
                                               _hyper(hp, 8, h8, HP_DEVICE, ACC), t, G_REF,
                                               GMODE, ACC, ALIGNED)
    gain = tl.load(clip_ptr).to(ACC)
    if AVG:
        avg_ptr = _address(avg_addr, t, W_REF, ALIGNED)
        avg_weight = _hyper(hp, 9, h9, HP_DEVICE, ACC)
    for off in range(0, n, BLOCK):
        local = off + tl.arange(0, BLOCK).to(tl.int64)
        inside = local < n
        idx = start + local
        write = tl.where(ahead, inside, False)  # (inside & ahead fails in the interpreter)
        w_raw = tl.load(old_ptr + idx, mask=inside)
        w = w_raw.to(ACC)
        g = _update_gradient(g_ptr, first_ptr, idx, inside, write, alpha, along, gain, G_REF,
                             MAXIMIZE,
                             GMODE, ACC)
        if DECOUPLED:
            w = w * decay
        else:
            g = g + weight_decay * w
        m = tl.load(m_ptr + idx, mask=inside).to(ACC)
        v = tl.load(v_ptr + idx, mask=inside).to(ACC)
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        tl.store(m_ptr + idx, _to_storage(m, M_REF.dtype.element_ty), mask=write)
        tl.store(v_ptr + idx, _to_storage(v, M_REF.dtype.element_ty), mask=write)
        if AMSGRAD:
            v = tl.maximum(tl.load(vmax_ptr + idx, mask=inside).to(ACC), v)
            tl.store(vmax_ptr + idx, _to_storage(v, M_REF.dtype.element_ty), mask=write)
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
        new_w = tl.where(ahead, _to_storage(w - step_size * m / denom, W_REF.dtype.element_ty),
                         w_raw)
        tl.store(w_ptr + idx, new_w, mask=inside)
        if AVG:
            _average(avg_ptr, idx, write, new_w, avg_weight, ACC)
