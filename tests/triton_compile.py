"""Compile every Triton kernel of fastsam for an sm_90 GPU (to PTX and cubin), on any machine:
no GPU needed, so the compiled path, not only the interpreter, is checked in CI. Run by
tests/test_fused.py in a subprocess (TRITON_INTERPRET must be unset before triton is imported).
Prints one line per kernel variant and exits non-zero on the first failure."""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastsam.backends.triton_kernels import sam as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SEGMENTS = dict(seg_tensor="*i32", seg_start="*i64", seg_len="*i64")


def compile_variant(kernel, pointers, constexprs, segments=True):
    signature = {**(SEGMENTS if segments else {}), **pointers,
                 **{name: "constexpr" for name in constexprs}}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=TARGET)
    assert compiled.asm.get("cubin"), "no cubin"
    shown = {k: v for k, v in constexprs.items() if k != "BLOCK"}
    print(f"ok {kernel.fn.__name__} {shown}")


def main():
    for storage, acc in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        ref = f"*{storage}"
        scalar = "*fp64" if acc == tl.float64 else "*fp32"
        common = dict(ACC=acc, ALIGNED=True, BLOCK=512)
        for qmode in (0, 1, 2):
            # FriendlySAM's momentum (MOM) with p = 2; GSAM's kept gradient with p = 2 too
            mom = qmode in (0, 2)
            compile_variant(K.norm_partials_kernel, dict(
                w_addr="*i64", g_addr="*i64", mode_of="*i32", eta_of="*fp64", partials=scalar,
                filter_T=scalar, hp="*fp64", m_addr="*i64", group_of="*i32",
                momentum_of_group="*fp64", W_REF=ref, G_REF=ref),
                dict(QMODE=qmode, MOM=mom, **common))
            for keep in (False, True):
                compile_variant(K.perturb_kernel, dict(
                    w_addr="*i64", g_addr="*i64", w_old_addr="*i64", mode_of="*i32",
                    eta_of="*fp64", group_of="*i32", rho_of_group="*fp64", filter_T=scalar,
                    norm_sum=scalar, skipped="*fp32", hp="*fp64", keep_addr="*i64",
                    m_addr="*i64", m_next_addr="*i64", momentum_of_group="*fp64",
                    index_of="*i32", mask_of_group="*fp64", offset_at="i32", key0="i64",
                    key1="i64", W_REF=ref,
                    G_REF=ref),
                    # ESAM's mask (MASK) beside every variant without the kept gradient
                    dict(QMODE=qmode, KEEP=keep and qmode == 0, MOM=mom and not keep,
                         MASK=not keep, **common))
        compile_variant(K.sum_kernel, dict(x=scalar, n="i32", out=scalar),
                        dict(ACC=acc, BLOCK=1024), segments=False)
        compile_variant(K.restore_kernel, dict(w_addr="*i64", w_old_addr="*i64", W_REF=ref),
                        dict(ALIGNED=True, BLOCK=512))
        compile_variant(K.gsam_partials_kernel, dict(
            adv_addr="*i64", first_addr="*i64", partials=scalar, G_REF=ref), common)
        for sums in (False, True):  # along, or the three sums (sharded parameters)
            compile_variant(K.gsam_along_kernel, dict(partials=scalar, n="i32", hp="*fp64",
                                                      out=scalar),
                            dict(SUMS=sums, ACC=acc, BLOCK=1024), segments=False)
        for gmode in (0, 1, 2, 3):
            # the scalars by value (int64 bit patterns), or from the device array (HP_DEVICE)
            by_value = {f"h{i}": "i64" for i in range(10)}
            compile_variant(K.sgd_kernel, dict(
                w_addr="*i64", g_addr="*i64", w_old_addr="*i64", buf_addr="*i64", hp="*fp64",
                **{k: by_value[k] for k in K._SGD_SCALARS},
                first_addr="*i64", along_ptr=scalar, avg_addr="*i64", skip_ptr="*fp32",
                clip_ptr=scalar, W_REF=ref, G_REF=ref, BUF_REF=ref),
                dict(HAS_MOMENTUM=gmode != 1, FRESH=False, NESTEROV=gmode == 2, MAXIMIZE=gmode == 1,
                     GMODE=gmode, AVG=gmode in (0, 2), SKIP=gmode in (2, 3),
                     HP_DEVICE=gmode == 3, **common))
            compile_variant(K.adam_kernel, dict(
                w_addr="*i64", g_addr="*i64", w_old_addr="*i64", m_addr="*i64", v_addr="*i64",
                vmax_addr="*i64", hp="*fp64", **{k: by_value[k] for k in K._ADAM_SCALARS},
                first_addr="*i64", along_ptr=scalar,
                avg_addr="*i64", skip_ptr="*fp32", bias="*fp64", index_of="*i64",
                clip_ptr="*fp64", W_REF=ref, G_REF=ref, M_REF=ref),
                dict(DECOUPLED=gmode != 0, AMSGRAD=gmode == 1, MAXIMIZE=gmode == 2, GMODE=gmode,
                     AVG=gmode in (1, 3), SKIP=gmode in (0, 2), BIAS=gmode in (0, 1),
                     HP_DEVICE=gmode in (0, 2), **common))
    return 0


if __name__ == "__main__":
    sys.exit(main())
