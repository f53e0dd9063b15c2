"""Malformed arguments to the raw ops raise a RuntimeError naming the argument instead of reading or
writing out of bounds. Each call runs in a fresh interpreter: a crash (SIGSEGV, SIGFPE, heap
corruption) fails the test instead of killing pytest."""

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import torch, slimtune
ops = torch.ops.slimtune
"""

# Each snippet defines `call()`, a single op call that must raise.
# A 2-row weight whose delta entries all lie in row 0; rowptr's middle entry points far past the
# end of `indices` (large enough to be its own mapping, so reading past it faults).
SPARSE = """
K = 1 << 18
w = torch.zeros(2, 1 << 20)
idx = torch.arange(K, dtype=torch.int32)
vals = torch.zeros(K)
rp = torch.tensor([0, 2**40, K])
x = torch.zeros(1, 1 << 20)
"""

CASES = {
    "linear_rowptr_huge": (SPARSE + "def call(): ops.sparse_delta_linear(x, w, None, idx, rp, vals)", "rowptr"),
    "backward_rowptr_huge": (
        SPARSE + "def call(): ops.sparse_delta_linear_backward(torch.zeros(1, 2), x, w, idx, rp, vals, [True] * 3)",
        "rowptr",
    ),
    "sddmm_rowptr_huge": (SPARSE + "def call(): ops.sparse_delta_sddmm(torch.zeros(1, 2), x, idx, rp)", "rowptr"),
    "compact_zero_input_dim": (
        "def call(): ops.memsave_maxpool_compact(torch.zeros(1, 1, 2, 2, dtype=torch.long), [1, 1, 4, 0], [2, 2], "
        "[2, 2], [0, 0], [1, 1])",
        "input_size",
    ),
    "compact_index_outside_window": (
        "def call(): ops.memsave_maxpool_compact(torch.full((1, 1, 2, 2), 15, dtype=torch.long), [1, 1, 4, 4], "
        "[2, 2], [2, 2], [0, 0], [1, 1])",
        "indices",
    ),
    "backward_offset_outside_window": (
        "def call(): ops.memsave_maxpool_backward(torch.randn(1, 1, 2, 2), torch.full((1, 1, 2, 2), -128, "
        "dtype=torch.int8), [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])",
        "offsets",
    ),
    "backward_grad_larger_than_input": (
        "def call(): ops.memsave_maxpool_backward(torch.randn(1, 1, 60, 60), torch.zeros(1, 1, 60, 60, "
        "dtype=torch.int8), [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])",
        "grad",
    ),
    "backward_offset_into_padding": (
        "def call(): ops.memsave_maxpool_backward(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, "
        "dtype=torch.int8), [1, 1, 4, 4], [3, 3], [1, 1], [1, 1], [1, 1])",
        "offsets",
    ),
    "maxpool_kernel_product_overflow": (
        "def call(): ops.memsave_maxpool_backward(torch.randn(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, "
        "dtype=torch.int8), [1, 1, 4, 4], [2**32, 2**32], [1, 1], [0, 0], [1, 1])",
        "kernel_size",
    ),
    "merge_meta_indices": (
        SPARSE + "def call(): ops.sparse_delta_merge_(w, idx.to('meta'), vals, 1.0)",
        "indices",
    ),
    "merge_meta_weight": (SPARSE + "def call(): ops.sparse_delta_merge_(w.to('meta'), idx, vals, 1.0)", "weight"),
    "linear_meta_rowptr": (
        SPARSE + "rp = torch.tensor([0, K, K])\n"
        "def call(): ops.sparse_delta_linear(x, w, None, idx, rp.to('meta'), vals)",
        "rowptr",
    ),
    "lora_meta_weight": (
        "x, A, B = torch.randn(3, 8), torch.randn(2, 8), torch.randn(4, 2)\n"
        "def call(): ops.lora_linear(x, torch.randn(4, 8, device='meta'), None, A, B, 1.0, 0.0, None, 0)",
        "weight",
    ),
    "lora_multi_meta_grad": (
        "x, W, A, B = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)\n"
        "outs, xa = ops.lora_linear_multi(x, [W], [torch.empty(0)], [A], [B], [1.0], 0.0, None, 0)\n"
        "def call(): ops.lora_linear_multi_backward([torch.randn(3, 4, device='meta')], x, [W], [A], [B], xa, [1.0], "
        "0.0, None, 0, True, True, True, [False])",
        "grad_outs",
    ),
    "relu_backward_meta_mask": (
        "def call(): ops.memsave_relu_backward(torch.randn(9), torch.zeros(2, dtype=torch.uint8, device='meta'))",
        "mask",
    ),
}

RUNNER = """
try:
    call()
except RuntimeError as e:
    print("RAISED:", str(e).splitlines()[0])
    raise SystemExit(0)
print("NO ERROR")
raise SystemExit(3)
"""


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_naming_the_argument(name):
    snippet, arg = CASES[name]
    code = PRELUDE + textwrap.dedent(snippet) + "\n" + RUNNER
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit status {proc.returncode} (negative: killed by a signal):\n{out[-2000:]}"
    assert f"'{arg}'" in out, f"the error does not name '{arg}':\n{out[-2000:]}"
