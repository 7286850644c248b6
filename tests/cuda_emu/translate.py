"""Rewrites a qwix .cu file as C++ for the CUDA emulator (include/cuda_runtime.h):
each `kernel<...><<<config>>>(args)` launch becomes
`qwix_emu::launch(qwix_emu::Config(config), kernel<...>, args)`, and the CUDA
registrations `TORCH_LIBRARY_IMPL(qwix, CUDA, m) { m.impl(...) }` become ops of
the `qwix_cuda_emu` namespace (schemas inferred), callable on CPU tensors.

usage: translate.py IN.cu OUT.cpp
"""
import re
import sys


def _kernel_start(src, end):
    """Start of the kernel expression that ends at `end` (just before `<<<`):
    an identifier with optional, possibly nested, template arguments."""
    i = end
    if src[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(src[i], 0)
            if depth == 0:
                break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def translate(src):
    out, pos = [], 0
    for m in re.finditer(r"<<<", src):
        end = m.start()
        while src[end - 1].isspace():
            end -= 1
        start = _kernel_start(src, end)
        close = src.index(">>>", m.end())
        paren = src.index("(", close)
        if src[close + 3:paren].strip():
            raise SystemExit(f"translate.py: unexpected text between >>> and ( at offset {close}")
        kernel, config = src[start:end], src[m.end():close]
        out.append(src[pos:start])
        out.append(f"::qwix_emu::launch(::qwix_emu::Config({config}), {kernel}, ")
        pos = paren + 1
    out.append(src[pos:])
    text = "".join(out)
    registrations = text.count("TORCH_LIBRARY_IMPL(qwix, CUDA, m)")
    text = text.replace("TORCH_LIBRARY_IMPL(qwix, CUDA, m)", "TORCH_LIBRARY_FRAGMENT(qwix_cuda_emu, m)")
    if registrations:
        text = text.replace("m.impl(", "m.def(")
    return text


if __name__ == "__main__":
    src_path, out_path = sys.argv[1:]
    with open(src_path) as f:
        text = translate(f.read())
    with open(out_path, "w") as f:
        f.write(f'#line 1 "{src_path}"\n' + text)
