"""Benchmarks of kidkernels against eager PyTorch, torch.compile and Liger-Kernel (``pytest benchmarks/
--benchmark-only``); see ``benchmarks/README.md``.  A package so that the benchmark files share ``harness``,
``shapes``, ``providers`` and ``kd_step`` by import; it is not installed with kidkernels."""
