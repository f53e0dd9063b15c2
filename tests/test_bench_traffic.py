"""The traffic model of ``python -m slimtune.bench --traffic``: its arithmetic on small shapes counted by
hand, and the CLI, which must not print a GPU figure it did not measure."""

import pytest
import torch

from slimtune.bench import traffic
from slimtune.bench.__main__ import main


def test_sddmm_bytes_by_hand():
    # T=64 tokens, a 256x128 bf16 weight at density 1/16: K = 2048 int32 entries, float32 results.
    row = traffic.sddmm(64, 256, 128, 1 / 16, torch.bfloat16)
    g, x = 64 * 256 * 2, 64 * 128 * 2  # 32768 + 16384 bytes of operands
    assert row.floor == g + x + 2048 * 4 + 2048 * 4 == 65536
    # One token slice (64 tokens): indices + rowptr (257 int64) once, 2048 partials written and
    # read back, 2048 results written.
    assert traffic.sddmm_chunks(64, 2048) == 1
    assert row.design == g + x + (2048 * 4 + 257 * 8) + 2 * 2048 * 4 + 2048 * 4 == 83976
    # From L2: g once, x to each of the 2 row groups of 128, the indices twice per 32-token tile.
    assert row.l2 == g + 2 * x + 2 * 2 * 2048 * 4 == 98304
    assert row.ratio == pytest.approx(83976 / 65536)


def test_sparse_forward_and_lora_bytes_by_hand():
    # T=8, a 4x16 float32 weight at density 1/4: K = 16 entries (int32 index + float32 value).
    row = traffic.sparse_forward(8, 4, 16, 1 / 4, torch.float32)
    csr = 16 * 8 + 5 * 8
    assert row.floor == 8 * 16 * 4 + 4 * 16 * 4 + csr + 8 * 4 * 4 == 1064
    # GEMM (x, W0 read, y written) + SpMM (x read, y read, the output written: y itself in float32).
    assert row.design == (512 + 256 + 128) + (512 + csr + 128 + 128) == 1832
    # bf16: the SpMM (x read) writes the bf16 delta term, the GEMM (x, W0 read) reads it and writes y.
    lowp = traffic.sparse_forward(8, 4, 16, 1 / 4, torch.bfloat16)
    assert lowp.design == (256 + csr + 8 * 4 * 2) + (256 + 128 + 2 * 8 * 4 * 2) == 1000
    # dx over the same delta (g 8x4, dx 8x16): the SpMMᵀ reads the CSR as it is; one 128-column
    # group, so the starts are 4 rows x 2 int32, written (rowptr and indices read) and read back.
    dx = traffic.sparse_dx(8, 4, 16, 1 / 4, torch.bfloat16)
    assert dx.floor == 8 * 4 * 2 + 4 * 16 * 2 + csr + 8 * 16 * 2 == 616
    starts = 4 * 2 * 4
    assert dx.design == (5 * 8 + 16 * 4 + starts) + starts + (64 + csr + 256) + (64 + 128 + 2 * 256) == 1360
    # From L2 beyond that: one column group and one 64-token tile, so nothing is read twice.
    assert dx.l2 == dx.design
    # LoRA r=2 over 8 tokens, 16 -> 4, bf16: x read once, the 8x2 float32 intermediate written, adapters.
    fwd = traffic.lora_forward(8, 16, 4, 2, torch.bfloat16)
    assert fwd.floor == 8 * 16 * 2 + 8 * 2 * 4 + 2 * 20 * 4 == 480
    assert fwd.design == 480 + 8 * 2 * 4 + 2 * 8 * 4 * 2 == 672


def test_max_pool_bytes_by_hand_and_its_ops_run():
    # 3 planes of 8x8, k3 s2 p1 -> 4x4 outputs, bf16: x read once, output and int8 offsets written
    # (forward); g and offsets read, dx written once (backward, a gather in dx's dtype).
    fwd, bwd = traffic.max_pool(3, 8, 8, 3, 2, 1, torch.bfloat16)
    assert fwd.design == fwd.floor == 3 * 64 * 2 + 3 * 16 * 2 + 3 * 16 == 528
    assert bwd.design == bwd.floor == 3 * 16 * 2 + 3 * 16 + 3 * 64 * 2 == 528
    out, offsets = fwd.make(torch.device("cpu"))()
    assert out.shape == offsets.shape == (1, 3, 4, 4) and offsets.dtype == torch.int8
    dx = bwd.make(torch.device("cpu"))()
    assert dx.shape == (1, 3, 8, 8) and dx.dtype == torch.bfloat16


def test_every_row_is_consistent():
    for row in traffic.rows():
        assert row.design >= row.floor > 0, row
    issue = traffic.sddmm(4096, 4096, 4096, 0.01, torch.bfloat16)
    assert issue.ratio <= 2.0  # the SDDMM's target: at most twice its floor from DRAM


def test_cli_help_names_the_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--traffic" in out and "achieved GB/s" in out


def test_cli_on_cpu_prints_the_model_and_no_gpu_figures(capsys):
    assert main(["--traffic"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["kernel", "shape", "dtype"]
    body = [ln for ln in lines[2:] if ln.startswith(("sparse_delta", "lora", "memsave"))]
    assert len(body) == len(traffic.rows())
    assert all("not run on a GPU" in ln and ln.rstrip().endswith("-") for ln in body)
    issue = next(ln for ln in body if ln.startswith("sparse_delta_sddmm") and "T=4096 4096x4096 0.01 " in ln)
    assert "100.5" in issue and "68.5" in issue and "1.47x" in issue
