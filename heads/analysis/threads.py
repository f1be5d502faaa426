"""Thread limits for the numeric helpers that stream large matrices (the probe's fits, the bootstrap).

Why one thread by default: their work is many passes over a 20k x 768 matrix with small outputs, where
synchronising threads costs more than the second core gives, and far more when other work shares the cores.
Measured on the project's shared 2-core machine under load: a HUME-VB-sized logistic fit took 1.3 s with one
thread and 3.2-4.1 s with two, the ridge decomposition 0.5 s against 1.4-1.6 s, the 1,000-resample bootstrap
of a Val split 0.8-1.5 s against 2.6 s.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def limited_threads(n: int, *, torch_threads: bool = True) -> Iterator[None]:
    """Limit BLAS/OpenMP pools (threadpoolctl) and, with `torch_threads`, torch to `n` threads; restored on exit.
    `n` <= 0 leaves the libraries' own settings."""
    if n <= 0:
        yield
        return
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - a dependency of scikit-learn

    before = None
    if torch_threads:
        import torch  # noqa: PLC0415

        before = torch.get_num_threads()
        torch.set_num_threads(int(n))
    try:
        with threadpool_limits(int(n)):
            yield
    finally:
        if before is not None:
            import torch  # noqa: PLC0415

            torch.set_num_threads(before)
