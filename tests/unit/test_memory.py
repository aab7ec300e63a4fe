"""keep_freed_memory: blocks freed by scoring are reused, not faulted in afresh (unirec.memory)."""

import subprocess
import sys

from tests.conftest import ROOT

# In a fresh process: a scoring thread allocating and freeing 1 MB tensors, as a tower's activations are,
# under glibc's starting mmap threshold pinned (so every block is a fresh mapping), then after
# keep_freed_memory(). Prints the minor page faults per allocation of each phase.
PROBE = """
import ctypes, resource, threading, torch
from unirec.memory import keep_freed_memory

def faults_per_block():
    out = []
    def work():
        for _ in range(20):
            torch.empty(256 * 1024).fill_(1.0)  # warm-up: the thread's own heap grows once
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(200):
            torch.empty(256 * 1024).fill_(1.0)
        out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 200)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out[0]

ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
print(faults_per_block(), keep_freed_memory(), faults_per_block())
"""


def test_freed_blocks_are_reused_without_page_faults():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    before, applied, after = r.stdout.split()
    assert applied == "True"
    assert float(before) >= 100  # a 1 MB block on fresh pages: 256 of 4 kB (the kernel may map a few at once)
    assert float(after) < 10
