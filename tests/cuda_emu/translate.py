"""Rewrites a qwix CUDA source (.cu or .cuh) as C++ for the CUDA emulator
(include/cuda_runtime.h), keeping every line on its line (sanitizer reports
and __LINE__ name the original):
- `kernel<...><<<config>>>(args)` -> `qwix_emu::launch(qwix_emu::Config(config), kernel<...>, args)`;
- `__launch_bounds__(N) kernel(...) {` gets `qwix_emu::check_launch_bounds(N);` at the body's start;
- `__shared__ T name[...];` gets `qwix_emu::shared_garbage(&name, sizeof(name));` (garbage per block);
- `TORCH_LIBRARY_IMPL(qwix, CUDA, m) { m.impl(...) }` -> ops of the `qwix_cuda_emu` namespace
  (schemas inferred), callable on CPU tensors.
Comments and string literals are never rewritten.

usage: translate.py IN OUT
"""
import re
import sys


def _fail(msg):
    raise SystemExit(f"translate.py: {msg}")


def _code_only(src):
    """src with comments and string/char literals blanked (same length, newlines kept)."""
    out, i, n = list(src), 0, len(src)
    while i < n:
        two = src[i:i + 2]
        if two in ("//", "/*"):
            end = src.find("\n" if two == "//" else "*/", i + 2)
            end = n if end < 0 else end + (0 if two == "//" else 2)
        elif src[i] in "\"'":
            end = i + 1
            while end < n and src[end] != src[i]:
                end += 2 if src[end] == "\\" else 1
            end += 1
        else:
            i += 1
            continue
        for k in range(i, min(end, n)):
            if out[k] != "\n":
                out[k] = " "
        i = end
    return "".join(out)


def _balanced_end(code, open_at, pair="()"):
    """Index just past the bracket matching the one at open_at."""
    depth = 0
    for k in range(open_at, len(code)):
        depth += {pair[0]: 1, pair[1]: -1}.get(code[k], 0)
        if depth == 0:
            return k + 1
    _fail(f"unbalanced {pair} from offset {open_at}")


def _kernel_start(code, end):
    """Start of the kernel expression ending at `end` (before `<<<`): an
    identifier with optional, possibly nested, template arguments."""
    i = end
    if code[i - 1] == ">":
        depth = parens = 0  # angle brackets count outside parentheses only: `k<(3 > 2)>`
        while True:
            i -= 1
            if i < 0:
                _fail(f"cannot find the kernel name before the launch at offset {end}")
            parens += {")": 1, "(": -1}.get(code[i], 0)
            if parens == 0:
                depth += {">": 1, "<": -1}.get(code[i], 0)
            if depth == 0:
                break
    while i > 0 and (code[i - 1].isalnum() or code[i - 1] in "_:"):
        i -= 1
    if i == end:
        _fail(f"no kernel name before the launch at offset {end}")
    return i


def _edits(code):
    """(start, end, replacement) edits, from the code-only text."""
    edits = []
    for m in re.finditer(r"<<<", code):
        end = m.start()
        while code[end - 1].isspace():
            end -= 1
        start = _kernel_start(code, end)
        close = code.find(">>>", m.end())
        paren = code.find("(", close)
        if close < 0 or paren < 0 or code[close + 3:paren].strip():
            _fail(f"expected `>>>(` after the launch configuration at offset {m.start()}")
        kernel, config = code[start:end], code[m.end():close]
        removed = code[end:m.end()] + code[close:paren + 1]
        edits.append((start, paren + 1, f"::qwix_emu::launch(::qwix_emu::Config({config}), {kernel}, "
                      + "\n" * removed.count("\n")))
    for m in re.finditer(r"__launch_bounds__\s*\(", code):
        args_end = _balanced_end(code, m.end() - 1)
        first_arg = re.split(r",(?![^()]*\))", code[m.end():args_end - 1])[0]
        body = code.find("{", args_end)
        if body < 0 or ";" in code[args_end:body]:
            _fail(f"__launch_bounds__ at offset {m.start()} is not on a kernel definition")
        edits.append((body + 1, body + 1, f" ::qwix_emu::check_launch_bounds(({first_arg}));"))
    for m in re.finditer(r"\b(extern\s+)?__shared__\b[^;{}()]*?(\w+)\s*(\[[^;]*\])?\s*;", code):
        if m.group(1):
            _fail("extern (dynamic) __shared__ memory is not emulated")
        if "," in re.sub(r"\[[^\]]*\]|<[^<>]*>", "", m.group(0)):
            _fail(f"one variable per __shared__ declaration (offset {m.start()})")
        name = m.group(2)
        edits.append((m.end(), m.end(), f" ::qwix_emu::shared_garbage(&{name}, sizeof({name}));"))
    registrations = [m.start() for m in re.finditer(r"TORCH_LIBRARY_IMPL\b", code)]
    if re.search(r"TORCH_LIBRARY_IMPL\(qwix, CUDA, m\)", code):
        if len(registrations) != 1:
            _fail("one TORCH_LIBRARY_IMPL block per file (its m.impl calls become m.def)")
        impl = "TORCH_LIBRARY_IMPL(qwix, CUDA, m)"
        edits.append((registrations[0], registrations[0] + len(impl), "TORCH_LIBRARY_FRAGMENT(qwix_cuda_emu, m)"))
        edits += [(m.start(), m.end(), "m.def(") for m in re.finditer(r"\bm\.impl\(", code)]
    return sorted(edits)


def translate(src):
    code = _code_only(src)
    out, pos = [], 0
    for start, end, text in _edits(code):
        if start < pos:
            _fail(f"overlapping rewrites at offset {start}")
        out += [src[pos:start], text]
        pos = end
    out.append(src[pos:])
    text = "".join(out)
    if text.count("\n") != src.count("\n"):
        _fail("the rewrite moved lines")
    return text


if __name__ == "__main__":
    src_path, out_path = sys.argv[1:]
    with open(src_path) as f:
        text = translate(f.read())
    with open(out_path, "w") as f:
        f.write(f'#line 1 "{src_path}"\n' + text)
