"""Diagnosis: which process history makes the vocab load crash on the GPU machine."""
import sys
mode, path = sys.argv[1], sys.argv[2]
if "npfirst" in mode:
    import numpy, numpy.random  # noqa
import pyllama_inf as pi
if "write" in mode:
    from pyllama_inf.testing import write_random_llama
    write_random_llama(path, seed=1)
if "nprandom" in mode:
    import numpy.random  # noqa
    numpy.random.default_rng(0).standard_normal(10)
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if ".so" in l})
print(mode, "libs:", [x for x in libs if "stdc" in x or "gcc" in x or "python3.12/site-packages" in x], file=sys.stderr, flush=True)
import os; print(mode, "locale env:", {k: v for k, v in os.environ.items() if k.startswith("LC_") or k == "LANG"}, file=sys.stderr, flush=True)
with pi.Model(path, n_ctx=1024, n_threads=2, n_ubatch=64, n_gpu_layers=-1) as m:
    print(mode, "LOADED OK", file=sys.stderr, flush=True)
