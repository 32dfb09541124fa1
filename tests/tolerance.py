"""The tolerance rule of the test suite (flash-attention's): a kernel's error against a float64
reference is at most twice the error that torch itself makes computing the same thing in the
same dtype, plus one unit in the last place of the largest reference value."""
import torch


def assert_matches_ref(out: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref64.shape, f"shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), "non-finite values in the output"
    err = (out.double() - ref64).abs().max().item()
    base = (lowp.double() - ref64).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref64.abs().max().item()
    assert err <= 2 * base + ulp, f"error {err:.3g} vs torch's own {base:.3g} in {dtype} (ulp {ulp:.3g})"


def assert_within_dot_bound(out: torch.Tensor, ref64: torch.Tensor, abs_terms: torch.Tensor, n_terms: int) -> None:
    """For float64 kernels, where torch's own float64 result is the reference itself and so has
    no error to compare with: the classical bound of a sum of ``n_terms`` products in any order,
    ``|out - ref| <= n_terms * eps * sum |terms|`` elementwise (``abs_terms`` is that sum, e.g.
    ``|x| @ |W|^T``). A wrong mask bit or index moves the result by a whole term, far beyond it."""
    assert out.shape == ref64.shape
    bound = n_terms * torch.finfo(torch.float64).eps * abs_terms
    excess = (out.double() - ref64).abs() - bound
    assert (excess <= 0).all(), f"float64 error exceeds the summation bound by {excess.max().item():.3g}"
