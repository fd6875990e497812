#!/usr/bin/env python3
"""Checks that scripts/install-deps.sh names everything the project uses from the machine.

A fresh machine has only Debian's essential packages, the compilers of the project's machine kind
and whatever the install list brings, so every build input must come from a Debian package that
the list names or that a named package depends on (Depends / Pre-Depends, recursively), or from
Debian's essential set. Four kinds of input are checked, after the builds have run:

  headers   every header in the compilers' dependency output of the builds under build/
            (ninja's deps log of each Ninja tree: CMake library, tests, serve app, sanitizer
            builds, the Python extensions; and the -MD files of the emulated kernel suite and
            the GPU compile checks), mapped to its package through dpkg's file lists;
  libraries every shared library that the binaries and extensions under build/ were linked
            against (their NEEDED entries, found as the dynamic loader finds them), as the file
            the linker read: lib<name>.so beside the library where that exists (its -dev package),
            else the library itself (a header can come with a wider package, e.g. boost's, while
            the library it needs does not);
  modules   every module imported by the Python files of tests/, scripts/, examples/ and bench/
            (outside the standard library and the project), as Debian's python3 finds it;
  commands  every command in a command position of the shell scripts (.ci/, scripts/, bench/),
            as PATH finds it.

Outside Debian, two sources are accepted and named in the report: the CUDA toolkit of the
machine (/usr/local/cuda; nvcc is not a Debian package) and the torch 2.x environment, whose
packages come pinned from PyPI (scripts/torch2*-requirements.txt). A module Debian's python3
lacks must be found in that environment (the tests import it optionally, e.g. safetensors), or
be one of YARDSTICK_MODULES.

Usage: scripts/check-deps.py [--drop PACKAGE]... [--build DIR]
--drop pretends the install list lacks PACKAGE (the check must then fail on what needs it).
Exit 0 when everything is covered, 1 otherwise, each miss naming the file and its package.
"""
import argparse
import ast
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_ROOTS = ("/usr/local/cuda",)
# Imported only by benchmarks, as the yardsticks they compare against, from where the benchmark
# says: the GPU machine brings torch's triton and FLA as PyPI wheels (docs/gpu.md); torchscale
# goes into the ignored third_party_bench/ (bench/cpu_retention.py's docstring).
YARDSTICK_MODULES = {"fla": "bench/gpu_bench.py", "triton": "bench/gpu_bench.py",
                     "torchscale": "bench/cpu_retention.py"}
PY_DIRS = ("tests", "scripts", "examples", "bench")
SHELL_GLOBS = (".ci/run", ".ci/*.sh", "scripts/*.sh", "bench/*.sh")
DEVICE_SCRIPTS = {"bench/gpu_check.sh"}  # runs on the GPU machine, with that machine's tools


def named_packages():
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/install-deps.sh"), "--list"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def installed_packages():
    """{name: (essential, provides, depends)} from dpkg's database (installed packages only)."""
    fmt = "${Package}\t${Status}\t${Essential}\t${Provides}\t${Depends}, ${Pre-Depends}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f=" + fmt], check=True, capture_output=True,
                         text=True).stdout
    pkgs = {}
    for line in out.splitlines():
        name, status, essential, provides, depends = line.split("\t")
        if "ok installed" not in status:
            continue
        names = lambda field: [re.sub(r"[\s(:].*", "", alt.strip()) for alt in field.split(",")
                               if alt.strip()]
        deps = [[re.sub(r"[\s(:].*", "", a.strip()) for a in group.split("|") if a.strip()]
                for group in depends.split(",") if group.strip()]
        pkgs[name] = (essential == "yes", names(provides), deps)
    return pkgs


def closure(roots, pkgs):
    """The packages a fresh machine has once the roots are installed: the roots, what they depend
    on (any installed alternative, or a package providing a virtual name), and the essential set."""
    providers = {}
    for name, (_, provides, _) in pkgs.items():
        for p in provides:
            providers.setdefault(p, []).append(name)
    todo = [p for p in roots if p in pkgs] + [n for n, (ess, _, _) in pkgs.items() if ess]
    have = set()
    while todo:
        p = todo.pop()
        if p in have:
            continue
        have.add(p)
        for group in pkgs[p][2]:
            for alt in group:
                for real in ([alt] if alt in pkgs else []) + providers.get(alt, []):
                    if real not in have:
                        todo.append(real)
    return have


class Owners:
    """Path -> Debian package, from dpkg's file lists (/usr-merged paths tried both ways)."""

    def __init__(self):
        self.owner = {}
        for lst in glob.glob("/var/lib/dpkg/info/*.list"):
            pkg = os.path.basename(lst)[:-5].split(":")[0]
            with open(lst, errors="replace") as f:
                for line in f:
                    self.owner.setdefault(line.rstrip("\n"), pkg)

    def of(self, path):
        # the name itself before its target: a -dev package's lib<name>.so is a symlink to the
        # runtime package's file
        for name in (path, os.path.realpath(path)):
            cands = [name]
            for a, b in (("/usr/lib/", "/lib/"), ("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/")):
                if name.startswith(a):
                    cands.append(b + name[len(a):])
                elif name.startswith(b):
                    cands.append(a + name[len(b):])
            for c in cands:
                if c in self.owner:
                    return self.owner[c]
        return None


def torch2_prefixes():
    """Where the torch 2.x environments live (their files come from PyPI, pinned)."""
    base = os.environ.get("RETENTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "retention")
    return [os.path.realpath(v) for v in glob.glob(os.path.join(base, "torch2-*", "venv"))]


def forwarded_to(path):
    """The program a two-line `#!/bin/sh` + `exec PROGRAM "$@"` wrapper runs, else None.

    Some machines put such wrappers for CUDA's tools in /usr/local/bin instead of a symlink."""
    try:
        if os.path.getsize(path) > 512:
            return None
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return None
    if len(lines) != 2 or not lines[0].startswith("#!"):
        return None
    m = re.fullmatch(r'exec\s+(/\S+)\s+"\$@"', lines[1])
    return m.group(1) if m else None


def classify(path, owners, allowed, venvs):
    """None when the path is covered, else a description of what is missing."""
    target = forwarded_to(path)
    if target and owners.of(path) is None:
        why = classify(target, owners, allowed, venvs)
        return why and f"{path} runs {target}: {why}"
    real = os.path.realpath(path)
    if real.startswith(os.path.realpath(ROOT) + os.sep) or path.startswith(ROOT + os.sep):
        return None
    if any(real.startswith(os.path.realpath(c)) or path.startswith(c) for c in CUDA_ROOTS):
        return None
    if any(real.startswith(v + os.sep) for v in venvs):
        return None
    pkg = owners.of(path)
    if pkg is None:
        return f"{path} belongs to no Debian package (installed by hand?)"
    if pkg not in allowed:
        return f"{path} comes from Debian package {pkg}, which the install list does not bring"
    return None


# -- headers -------------------------------------------------------------------------------------

def parse_make_deps(text):
    """{target: [prerequisites]} from make-style dependency rules (-MD output)."""
    rules = {}
    for rule in text.replace("\\\n", " ").splitlines():
        if ":" not in rule:
            continue
        target, _, prereqs = rule.partition(": ")
        if not prereqs and rule.endswith(":"):
            continue  # -MP phony rule
        rules.setdefault(target.strip(), []).extend(prereqs.split())
    return rules


def header_uses(build):
    """{header path: first object that includes it} over every build tree under build/."""
    uses = {}

    def add(obj, dep, base):
        # a relative path is relative to where the compiler ran: the build tree or the checkout
        cands = [os.path.normpath(os.path.join(b, dep)) for b in (base, ROOT)]
        path = next((c for c in cands if os.path.exists(c)), cands[0])
        uses.setdefault(path, os.path.relpath(obj, ROOT) if os.path.isabs(obj) else obj)

    ninja = shutil.which("ninja")
    for log in glob.glob(os.path.join(build, "**", ".ninja_deps"), recursive=True):
        tree = os.path.dirname(log)
        out = subprocess.run([ninja, "-C", tree, "-t", "deps"], capture_output=True, text=True)
        obj = None
        for line in out.stdout.splitlines():
            if line and not line.startswith(" "):
                obj = os.path.join(tree, line.split(":")[0])
            elif line.strip() and obj:
                add(obj, line.strip(), tree)
    for d in glob.glob(os.path.join(build, "**", "*.d"), recursive=True):
        with open(d, errors="replace") as f:
            rules = parse_make_deps(f.read())
        for target, deps in rules.items():
            for dep in deps:
                add(os.path.join(os.path.dirname(d), target), dep, os.path.dirname(d))
    return uses


# -- linked libraries ----------------------------------------------------------------------------

def elf_files(build):
    """Executables and shared objects the builds produced (CMake's compiler probes left out)."""
    for dirpath, dirnames, filenames in os.walk(build):
        dirnames[:] = [d for d in dirnames if d != "CMakeFiles"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".o") or os.path.islink(path):
                continue
            if not (".so" in name or os.access(path, os.X_OK)):
                continue
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield path


def loader_cache():
    """{soname: path} of the x86-64 libraries in the dynamic loader's cache."""
    out = subprocess.run(["/sbin/ldconfig", "-p"], check=True, capture_output=True, text=True).stdout
    found = {}
    for m in re.finditer(r"^\s+(\S+) \(libc6,x86-64[^)]*\) => (\S+)$", out, re.M):
        found.setdefault(m.group(1), m.group(2))
    return found


def library_uses(build):
    """{library file the linker read: first binary linked against it} over the ELF files under
    build/. A library the loader cannot find here is left to the tests that load it."""
    cache = loader_cache()
    uses = {}
    for elf in sorted(elf_files(build)):
        out = subprocess.run(["readelf", "-d", elf], capture_output=True, text=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
        runpath = [d.replace("$ORIGIN", os.path.dirname(elf))
                   for m in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.+?)\]", out)
                   for d in m.split(":")]
        for soname in needed:
            lib = next((os.path.join(d, soname) for d in runpath
                        if os.path.exists(os.path.join(d, soname))), cache.get(soname))
            if lib is None:
                continue
            link_name = os.path.join(os.path.dirname(lib), soname.split(".so")[0] + ".so")
            uses.setdefault(link_name if os.path.exists(link_name) else lib,
                            os.path.relpath(elf, ROOT))
    return uses


# -- Python modules ------------------------------------------------------------------------------

def imported_modules():
    """{top-level module: first importing file}, without the standard library and the project."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "--", *[f"{d}/*.py" for d in PY_DIRS],
                            "setup.py"], check=True, capture_output=True, text=True).stdout.split()
    local = {os.path.splitext(os.path.basename(f))[0] for f in files} | {"retention"}
    mods = {}
    for f in files:
        tree = ast.parse(open(os.path.join(ROOT, f)).read(), f)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    mods.setdefault(top, f)
    return mods


FIND = ("import importlib.util, json, sys\n"
        "def origin(m):\n"
        "    try:\n"
        "        s = importlib.util.find_spec(m)\n"
        "    except Exception:\n"
        "        return None\n"
        "    if s is None:\n"
        "        return None\n"
        "    return s.origin if s.origin not in (None, 'namespace') else list(s.submodule_search_locations)[0]\n"
        "print(json.dumps({m: origin(m) for m in sys.argv[1:]}))\n")


def module_origins(python, mods):
    out = subprocess.run([python, "-c", FIND, *mods], check=True, capture_output=True, text=True,
                         cwd="/").stdout
    return json.loads(out)


# -- shell commands ------------------------------------------------------------------------------

KEYWORDS = {"if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case",
            "esac", "function", "time", "!", "{", "}", "[[", "]]", "select", "coproc"}
PREFIXES = {"exec", "command", "env", "sudo", "nohup", "timeout", "xargs", "ccache", "builtin"}
SEPARATORS = {";", ";;", "&", "&&", "|", "||", "(", ")", "|&", "\n"}


def script_commands():
    """{command: first 'file:line'} in command positions of the project's shell scripts.

    Heredoc bodies are skipped; words after `case` patterns, variables and function names are
    not commands. A word PATH does not find is left to the script itself to fail on."""
    cmds = {}
    files = sorted({f for g in SHELL_GLOBS for f in glob.glob(os.path.join(ROOT, g))
                    if os.path.relpath(f, ROOT) not in DEVICE_SCRIPTS})
    for path in files:
        rel = os.path.relpath(path, ROOT)
        text = open(path).read()
        functions = set(re.findall(r"^\s*([A-Za-z_][\w-]*)\s*\(\)\s*\{", text, re.M))
        heredoc = None
        for no, line in enumerate(text.splitlines(), 1):
            if heredoc:
                if line.strip() == heredoc:
                    heredoc = None
                continue
            m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
            if m:
                heredoc = m.group(1)
            if re.match(r"^\s*[^()\s]*\)\s*$|^\s*[\w|*.-]+\)", line) and "$(" not in line.split(")")[0]:
                line = line.split(")", 1)[1]  # a case pattern
            # $(cmd ...), a tool's default (${CXX:-g++}) and what `command -v` looks for
            subs = (re.findall(r"\$\(\s*([A-Za-z][\w.+-]*)", line)
                    + re.findall(r"\$\{\w+:-([A-Za-z/][\w/.+-]*)", line)
                    + re.findall(r"command -v ([A-Za-z][\w.+-]*)", line))
            try:
                lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
                lex.whitespace_split = True
                lex.commenters = "#"
                words = list(lex)
            except ValueError:
                words = line.split()
            first = True
            for w in words:
                if w in SEPARATORS:
                    first = True
                    continue
                if not first:
                    continue
                if w in ("for", "select", "case"):
                    first = False  # a variable name and words follow, up to the next separator
                    continue
                if w in PREFIXES:
                    subs.append(w)  # a command that runs the next word
                if w in KEYWORDS or re.match(r"^[A-Za-z_]\w*(\[[^]]*\])?\+?=", w) or w in PREFIXES:
                    continue  # still in command position after these
                first = False
                subs.append(w)
            for w in subs:
                if re.fullmatch(r"[A-Za-z][\w.+-]*|/[\w/.+-]+", w) and w not in functions:
                    cmds.setdefault(w, f"{rel}:{no}")
    return cmds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drop", action="append", default=[], help="pretend the list lacks PACKAGE")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = ap.parse_args()

    named = named_packages() - set(args.drop)
    pkgs = installed_packages()
    missing = sorted(p for p in named if p not in pkgs)
    allowed = closure(named, pkgs)
    owners = Owners()
    venvs = torch2_prefixes()
    problems = [f"install list: {p} is named but not installed (run scripts/install-deps.sh)"
                for p in missing]

    uses = header_uses(args.build)
    by_cause = {}  # one line per package (or unowned tree), naming the first file that needs it
    for header, obj in sorted(uses.items()):
        why = classify(header, owners, allowed, venvs)
        if why:
            cause = why.split(" comes from ")[-1] if " comes from " in why else why
            by_cause.setdefault(cause, []).append((header, obj))
    for cause, hits in by_cause.items():
        header, obj = hits[0]
        more = f" (and {len(hits) - 1} more headers)" if len(hits) > 1 else ""
        problems.append(f"header: {obj} includes {classify(header, owners, allowed, venvs)}{more}")

    libs = library_uses(args.build)
    for lib, elf in sorted(libs.items()):
        why = classify(lib, owners, allowed, venvs)
        if why:
            problems.append(f"library: {elf} is linked against {why}")

    mods = imported_modules()
    debian = module_origins("/usr/bin/python3", sorted(mods))
    venv_py = [os.path.join(v, "bin", "python") for v in venvs]
    for mod, origin in sorted(debian.items()):
        if origin is None:
            found = [py for py in venv_py if module_origins(py, [mod])[mod]]
            if not found and mod not in YARDSTICK_MODULES:
                problems.append(f"module: {mods[mod]} imports {mod}, which neither Debian's python3 "
                                "nor a torch 2.x environment has")
            continue
        why = classify(origin, owners, allowed, venvs)
        if why:
            problems.append(f"module: {mods[mod]} imports {mod}: {why}")

    path = os.environ.get("PATH", "") + ":/usr/local/cuda/bin"
    cmds = script_commands()
    n_found = 0
    for cmd, where in sorted(cmds.items()):
        exe = shutil.which(cmd, path=path)
        if exe is None:
            continue
        n_found += 1
        why = classify(exe, owners, allowed, venvs)
        if why:
            problems.append(f"command: {where} runs {cmd}: {why}")

    print(f"check-deps: {len(named)} named packages bring {len(allowed)} (with the essential set); "
          f"checked {len(uses)} headers, {len(libs)} libraries, {len(mods)} modules, "
          f"{n_found} commands")
    if not uses:
        problems.append(f"no dependency output under {args.build}: run the builds first")
    for p in problems:
        print("check-deps: MISSING " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
