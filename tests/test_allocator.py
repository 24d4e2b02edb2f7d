"""The heap keeps freed activations for reuse (yoco.allocator): a large tensor allocated again after it
was freed is not faulted in again page by page. Measured in fresh interpreters, as a yoco command starts."""

import json
import resource
import subprocess
import sys

import pytest

from yoco import allocator

PROBE = """
import json, resource, sys, torch
from yoco import allocator
if sys.argv[1] == "retain":
    assert allocator.retain_freed_memory()
x, w1, w2 = torch.randn(6144, 512), torch.randn(512, 2048), torch.randn(2048, 512)
faults = []
for _ in range(8):  # a forward pass's pattern: large temporaries (48 MiB, above glibc's largest mmap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # threshold) made and freed in turn
    h = x @ w1
    y = (torch.nn.functional.silu(h) * h) @ w2
    del h, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
allocator.release_free_memory()  # and the process can still give it back
print(json.dumps(faults))
"""


def faults(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(allocator.libc() is None, reason="glibc's mallopt only")
def test_a_forward_pass_reuses_its_freed_temporaries_instead_of_faulting_them_in_again():
    pages = (6144 * 2048 * 4) // resource.getpagesize()  # one 48 MiB temporary
    default, retained = faults("default"), faults("retain")
    assert all(n >= 2 * pages for n in default[-3:])  # glibc's default: each pass maps its temporaries anew
    assert all(n < pages // 10 for n in retained[-3:]), (default, retained)  # after a warm-up: reused, barely a fault
