"""The one definition of the partial-state layout of the GEMM-fused loss forward (plain Python: no Triton needed).

The fused forward (``distill_fused_forward.py``) runs one program per (row block, vocabulary block) tile of a row
chunk; each program reduces its tile to one partial state per row, and the merge kernel (``distill_fused_merge.py``)
combines a row's states over the vocabulary blocks into the row statistics of ``stats_layout.py``.  The states live in
a float32 array ``[NUM_PARTIALS, num_vocab_blocks, row_capacity]``, one plane of it per quantity, rows contiguous: a
forward program writes its ``BLOCK_M`` rows of one block as one contiguous run, and the merge reads ``[blocks, rows]``
slabs whose consecutive lanes are consecutive rows (coalesced both ways).  With ``a = s / T`` and ``b = t / T`` the
tempered student and teacher logits of the block:

    M_STUDENT, Z_STUDENT    log-sum-exp state of a: max and sum exp(a - max)  (for FKL the one-pass state's ``y``)
    M_TEACHER, Z_TEACHER    the same for b (not written without a teacher)
    KL_SUM                  FKL and RKL: the one-pass KL sum ``sum exp(x - m_x) ((x - y) - (m_x - m_y))`` of the
                            block, x the weighting model's logits (RKL: a, FKL: b), y the other's
                            (``online_softmax.merge_kl``); not written for JSD, TVD and the cross-entropy alone
    M_CE, Z_CE              log-sum-exp state of the untempered student logits s (only when T != 1: the MLE term's
                            own normaliser, ``SEPARATE_CE_LSE``)
    BEST, BEST_INDEX        the largest untempered student logit of the block and its column (as a float: exact below
                            2**24 columns; the lowest column among equal values, the first NaN if any)
    TARGET_LOGIT            the untempered student logit of the row's target, written only by the one program whose
                            vocabulary block holds it (at ``[TARGET_LOGIT, target // BLOCK_N, row]``); nothing
                            else of this plane is written or read

Rows that are ignored (their target is ``ignore_index``) are written by no program: the merge writes their statistics
as zeros without reading their states.
"""
M_STUDENT = 0
Z_STUDENT = 1
M_TEACHER = 2
Z_TEACHER = 3
KL_SUM = 4
M_CE = 5
Z_CE = 6
BEST = 7
BEST_INDEX = 8
TARGET_LOGIT = 9
NUM_PARTIALS = 10
