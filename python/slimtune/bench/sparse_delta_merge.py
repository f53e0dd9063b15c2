"""sparse_delta_merge_ against ``weight.view(-1).index_add_`` (the stock-PyTorch way)."""

import torch


from .harness import Context, Group


def _groups(ctx: Context):
    shapes = [(1024, 1024)] if ctx.quick else [(1024, 1024), (4096, 4096), (11008, 4096)]
    densities = [0.01] if ctx.quick else [0.001, 0.01, 0.05]
    g = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        for density in densities:
            numel = rows * cols
            k = max(1, int(numel * density))
            weight = torch.randn(rows, cols, generator=g).to(ctx.device, ctx.dtype)
            indices = torch.randperm(numel, generator=g)[:k].sort().values.to(ctx.device, torch.int32)
            # Tiny values: thousands of repeated in-place adds must stay finite.
            values = (torch.randn(k, generator=g) * 1e-6).to(ctx.device, ctx.dtype)
            idx64 = indices.long()
            flat = weight.view(-1)

            def stock(flat=flat, idx64=idx64, values=values):
                flat.index_add_(0, idx64, values, alpha=0.5)

            def ours(weight=weight, indices=indices, values=values):
                torch.ops.slimtune.sparse_delta_merge_(weight, indices, values, 0.5)

            yield Group(
                op="sparse_delta_merge",
                mode="fwd",
                x_name="shape,density",
                x_value=f"{rows}x{cols},{density:g}",
                providers={"index_add_": stock, "slimtune": ours},
                baseline="index_add_",
                config={"rows": rows, "cols": cols, "density": density, "k": k, "index_dtype": "int32"},
            )


BENCHMARKS = {"sparse_delta_merge": _groups}
