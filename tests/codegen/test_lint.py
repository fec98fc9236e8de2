"""The lint catches what the interpreter accepts and the GPU compiler rejects."""

import pytest

from ltmdsl.codegen.lint import SMEM_LIMIT_BYTES, lint

HEAD = '''
import triton
import triton.language as tl

META = {"k": {"BLOCK": %(block)d, "D": %(d)d, "num_warps": 4, "num_stages": 3}}

'''


def module(body: str, block: int = 64, d: int = 64, decorator: str = "@triton.jit") -> str:
    return HEAD % {"block": block, "d": d} + f"""
{decorator}
def k(X, Y, n, BLOCK: tl.constexpr, D: tl.constexpr):
{body}
"""


GOOD = """
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    a = tl.load(X + rows[:, None] * D + cols[None, :])
    acc = tl.zeros([BLOCK, D], tl.float32)
    for i in range(0, n):
        b = tl.load(Y + cols[:, None] * D + cols[None, :])
        acc += tl.dot(a, b)
    tl.store(X + rows[:, None] * D + cols[None, :], acc)
"""


def test_good_kernel_passes_and_estimates_shared_memory():
    problems, reports = lint(module(GOOD), "bf16")
    assert problems == []
    dot = reports["k"].dots[0]
    assert dot.a == (64, 64) and dot.b == (64, 64) and dot.in_loop
    assert reports["k"].smem_bytes == 64 * 64 * 2 + 64 * 64 * 2 * 3


def test_a_module_with_fp32_dots_says_so_and_is_sized_at_4_bytes():
    """The delta rule's dots take fp32 operands whatever the data dtype: DOT_ELEMENT_BYTES overrides it."""
    src = module(GOOD).replace("META = {", "DOT_ELEMENT_BYTES = 4\n\nMETA = {")
    _, reports = lint(src, "bf16")
    assert reports["k"].smem_bytes == 64 * 64 * 4 + 64 * 64 * 4 * 3


def test_small_dot_is_rejected():
    problems, _ = lint(module(GOOD, block=8), "bf16")
    assert any("below 16" in p for p in problems)


def test_non_power_of_two_arange_is_rejected():
    problems, _ = lint(module(GOOD, d=48), "bf16")
    assert any("not a power of two" in p for p in problems)


def test_runtime_arange_bound_is_rejected():
    problems, _ = lint(module("    x = tl.arange(0, n)\n"), "bf16")
    assert any("not constexpr" in p for p in problems)


def test_block_pointers_are_rejected():
    body = "    p = tl.make_block_ptr(X, (n, n), (n, 1), (0, 0), (BLOCK, BLOCK), (1, 0))\n"
    problems, _ = lint(module(body), "bf16")
    assert any("block pointers" in p for p in problems)


def test_uninferable_dot_is_rejected():
    problems, _ = lint(module("    c = tl.dot(some_helper(X), X)\n"), "bf16")
    assert any("not inferred" in p for p in problems)


def test_shared_memory_over_the_h100_limit_is_rejected():
    problems, reports = lint(module(GOOD, block=256, d=256), "fp32")
    assert reports["k"].smem_bytes > SMEM_LIMIT_BYTES
    assert any("shared memory" in p for p in problems)


def test_autotune_on_in_place_update_is_rejected():
    body = "    x = tl.load(X + tl.arange(0, BLOCK))\n    tl.store(X + tl.arange(0, BLOCK), x * 2)\n"
    deco = "@triton.autotune(configs=[], key=['n'])\n@triton.jit"
    problems, _ = lint(module(body, decorator=deco), "bf16")
    assert any("in place" in p for p in problems)


def test_meta_must_cover_constexprs():
    src = module(GOOD).replace('"D": 64, ', "")
    problems, _ = lint(src, "bf16")
    assert any("lacks constexpr D" in p for p in problems)


@pytest.mark.parametrize("src", ["def broken(:\n", "META = {'k': foo()}\n"])
def test_unparseable_modules_are_reported(src):
    problems, _ = lint(src, "bf16")
    assert problems
