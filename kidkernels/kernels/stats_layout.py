"""The one definition of the per-row statistics layout of the distillation loss (plain Python: no Triton needed).

Row statistics live in a ``[NUM_STATS, rows]`` float32 array (float64 on the PyTorch backend for float64 inputs),
one row of it per quantity.  The Triton kernels (``distill_forward``, ``distill_backward``) read and write it through
``tl.constexpr`` copies of these indices, the PyTorch backend through these names; a test ties the two together.

With ``a = s / T`` and ``b = t / T`` the tempered student and teacher logits, ``q = softmax(a)``, ``p = softmax(b)``:

    MAX_STUDENT  max(a), and LOGZ_STUDENT = log(sum exp(a - max(a))): the log-sum-exp of a, kept in two parts so
    LOGZ_STUDENT that log q = (a - max(a)) - LOGZ_STUDENT is accurate near the maximum whatever the logits' size (a
                 float32 log-sum-exp of size 200 is rounded by 1.5e-5, which every log-probability would inherit)
    MAX_TEACHER, LOGZ_TEACHER  the same for b (not written without a teacher)
    LSE_CE       log-sum-exp of the untempered student logits s (the MLE term's normaliser)
    KD           the divergence of the row (0 on ignored rows)
    CE           the cross-entropy of the row (0 on ignored rows, NaN for an out-of-range target)
    CENTER       the row constant of the divergence gradient (see ``kernels/divergence.py``):
                 RKL  E_q[a - b] - CENTER_2;  JSD  E_q[d], d = log((1 - beta) q / m);  TVD  the q-mass where q < p
                 plus half of the q-mass where q == p;  FKL  0 (unused)
    CENTER_2     RKL: max(a) - max(b), the offset of the two models' logits; TVD: the q-mass where q > p plus half
                 of the q-mass where q == p; 0 otherwise
    TOP          the column of the student's largest logit (as a float: exact below 2**24 columns), where the
                 gradient kernel writes minus the sum of the row's other gradient elements

Ignored rows are never swept: their KD, CE, centers, log-sum-exps and TOP are 0.
"""
MAX_STUDENT = 0
LOGZ_STUDENT = 1
MAX_TEACHER = 2
LOGZ_TEACHER = 3
LSE_CE = 4
KD = 5
CE = 6
CENTER = 7
CENTER_2 = 8
TOP = 9
NUM_STATS = 10

# Column indices are stored in float32 statistics: exact up to this many columns.
MAX_VOCAB = 1 << 24
