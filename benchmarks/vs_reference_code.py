"""Our windowed methods against the authors' own code, on the same SmolLM2-135M inputs.

The references are the repositories the papers point to: datamllab/LongLM (Self-Extend),
Glaciohound/LM-Infinite and mit-han-lab/streaming-llm. This script fetches nothing: give it
a checkout of each (``--longlm PATH --lm-infinite PATH --streaming-llm PATH``). Each
reference runs in a child process, in a virtual environment with the transformers version
that reference runs on (built once under ``--envs``, with the local CPU wheel ``torch==2.13.0``,
then reused), and is imported from the given path at run time. Ours runs in this process.

Both sides read the same token ids (``longreach.tasks.Passkey`` prompts, made with
longreach's tokenizer) and the same safetensors directory (the one ``longreach.load``
caches), in fp32 with one torch thread. For each prompt the script records the maximum
absolute difference of the last-position logits after the prompt and the greedy answers of
both sides, and whether each finds the pass key.

Settings (matching ours to the authors' entry points):

- self-extend: ``SelfExtend.apply(model, group, window, enable_flash_attention=False)``
  (the eager path) against ``self-extend:group=G,window=W`` (default G=8, W=1024).
- lm-infinite: ``convert_llama_model(model, local_branch, global_branch)`` as the
  repository's README calls it (4096, 10; the distance limit is the local branch) against
  ``lm-infinite:window=4096,sinks=10,cap=4096``. The code reads key/value projections with
  as many heads as queries; SmolLM2 uses grouped-query attention, so the child replaces
  ``k_proj``/``v_proj`` by projections whose rows repeat each key/value head (the same
  numbers, as many heads as queries) before converting.
- streaming: ``enable_streaming_llm(model, start_size, recent_size)`` (4, 2000 as in
  ``examples/run_streaming_llama.py``) with the prompt fed one token at a time and the cache
  cut after every step, as ``examples/eval_long_ppl.py`` does, against
  ``streaming:sinks=4,window=2001`` (our window counts the current token).
- vanilla: the unmodified model on the old transformers against ours; the floor of what
  two transformers versions differ by.

Results go to a JSONL file (one line per cell: method, length, depth), and a rerun skips
the cells already there. ``--table FILE`` prints the table of a file.

    taskset -c 0 .venv/bin/python benchmarks/vs_reference_code.py --lengths 4k \\
        --longlm ../refs/longlm --lm-infinite ../refs/lm-infinite --streaming-llm ../refs/streaming-llm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "vs_reference_code.jsonl"
DEFAULT_ENVS = Path.home() / ".cache" / "longreach" / "reference-envs"
# The local CPU wheel (as the Makefile installs it); never an unpinned torch.
TORCH_SPEC = "torch==2.13.0"
METHODS = ("vanilla", "self-extend", "lm-infinite", "streaming")


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reference implementation: which checkout flag holds it and what it runs on."""

    method: str
    repo_flag: str | None  # the argparse dest of its checkout path; None: no repository
    transformers: str
    note: str


# LongLM pins transformers 4.38.2 (README). LM-Infinite's README lists 4.32.1, but its
# current models/llama.py calls the 4.38-style rotary embedding (position ids) and the
# Cache API, which 4.32 lacks; it runs on 4.38.2. streaming-llm pins 4.33.0 (README), whose
# tuple caches and ``rotary_emb(x, seq_len=)`` its pos-shift attention needs.
REFERENCES = {
    "vanilla": Reference("vanilla", None, "4.38.2", "plain LlamaForCausalLM (eager)"),
    "self-extend": Reference(
        "self-extend", "longlm", "4.38.2", "SelfExtend.apply(model, G, W), eager path"
    ),
    "lm-infinite": Reference(
        "lm-infinite", "lm_infinite", "4.38.2", "models.llama.convert_llama_model(model, W, S)"
    ),
    "streaming": Reference(
        "streaming",
        "streaming_llm",
        "4.33.0",
        "enable_streaming_llm(model, S, R), fed token by token",
    ),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    group: int = 8
    window: int = 1024
    lmi_window: int = 4096
    lmi_sinks: int = 10
    start_size: int = 4
    recent_size: int = 2000

    def ours(self, method: str) -> str:
        """Our spec string for ``method`` under these settings."""
        if method == "vanilla":
            return "vanilla"
        if method == "self-extend":
            return f"self-extend:group={self.group},window={self.window}"
        if method == "lm-infinite":
            w = self.lmi_window
            return f"lm-infinite:window={w},sinks={self.lmi_sinks},cap={w}"
        if method == "streaming":
            return f"streaming:sinks={self.start_size},window={self.recent_size + 1}"
        raise ValueError(f"unknown method {method!r}")

    def reference(self, method: str) -> dict:
        """The keyword settings the reference child receives for ``method``."""
        if method == "self-extend":
            return {"group": self.group, "window": self.window}
        if method == "lm-infinite":
            return {"local_branch": self.lmi_window, "global_branch": self.lmi_sinks}
        if method == "streaming":
            return {"start_size": self.start_size, "recent_size": self.recent_size}
        return {}


# ---------------------------------------------------------------- pure parts (tested)


def parse_length(text: str) -> int:
    text = text.strip().lower()
    if not text:
        raise argparse.ArgumentTypeError("empty length")
    try:
        value = int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad length {text!r}; use e.g. 4096 or 4k") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"length must be positive, got {text!r}")
    return value


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x.strip()]

    return parse


def _methods(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(
                f"unknown method {name!r}; choose from {', '.join(METHODS)}"
            )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--longlm", type=Path, help="checkout of datamllab/LongLM (self-extend)")
    p.add_argument("--lm-infinite", type=Path, help="checkout of Glaciohound/LM-Infinite")
    p.add_argument("--streaming-llm", type=Path, help="checkout of mit-han-lab/streaming-llm")
    p.add_argument("--methods", type=_methods, default=list(METHODS), help="comma list")
    p.add_argument("--lengths", type=_csv(parse_length), default=[4096, 8192])
    p.add_argument("--depths", type=_csv(float), default=[0.25, 0.5, 0.75])
    p.add_argument("--seed", type=int, default=0, help="passkey seed (sample i uses index i)")
    p.add_argument("--group", type=int, default=8, help="self-extend G")
    p.add_argument("--window", type=int, default=1024, help="self-extend W")
    p.add_argument("--lmi-window", type=int, default=4096, help="lm-infinite local branch")
    p.add_argument("--lmi-sinks", type=int, default=10, help="lm-infinite global branch")
    p.add_argument("--start-size", type=int, default=4, help="streaming sinks")
    p.add_argument("--recent-size", type=int, default=2000, help="streaming recent tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--envs", type=Path, default=DEFAULT_ENVS, help="where the venvs live")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL of results")
    p.add_argument("--table", type=Path, help="print the table of this JSONL and exit")
    args = p.parse_args(argv)
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            p.error(f"depth {d} is outside [0, 1]")
    if args.table is None:
        for method in args.methods:
            flag = REFERENCES[method].repo_flag
            if flag is not None and getattr(args, flag) is None:
                p.error(f"{method} needs --{flag.replace('_', '-')} PATH (a checkout)")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(
        group=args.group,
        window=args.window,
        lmi_window=args.lmi_window,
        lmi_sinks=args.lmi_sinks,
        start_size=args.start_size,
        recent_size=args.recent_size,
    )


def cell_key(method: str, spec: str, n: int, depth: float) -> tuple:
    return (method, spec, n, round(depth, 4))


def compare(ref_logits, our_logits, ref_tokens: list[int], our_tokens: list[int]) -> dict:
    """Max |Δ| of two logit vectors, whether their argmax agree, whether the answers agree."""
    a = [float(x) for x in ref_logits]
    b = [float(x) for x in our_logits]
    if len(a) != len(b):
        raise ValueError(f"logit vectors differ in size: {len(a)} vs {len(b)}")
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return {
        "max_abs_dlogit": diff,
        "argmax_agree": max(range(len(a)), key=a.__getitem__)
        == max(range(len(b)), key=b.__getitem__),
        "answers_agree": list(ref_tokens) == list(our_tokens),
    }


def summarize(records: list[dict]) -> list[dict]:
    """One row per (method, length): worst |Δ|, agreement and passkey counts."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((METHODS.index(r["method"]), r["n"], r["spec"]), []).append(r)
    rows = []
    for (_, n, spec), rs in sorted(groups.items()):
        rows.append(
            {
                "method": rs[0]["method"],
                "spec": spec,
                "n": n,
                "prompts": len(rs),
                "max_abs_dlogit": max(r["max_abs_dlogit"] for r in rs),
                "argmax_agree": sum(bool(r["argmax_agree"]) for r in rs),
                "answers_agree": sum(bool(r["answers_agree"]) for r in rs),
                "ref_correct": sum(bool(r["ref_correct"]) for r in rs),
                "our_correct": sum(bool(r["our_correct"]) for r in rs),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'method':<12s} {'ours':<40s} {'n':>5s} {'max|Δlogit|':>11s} "
        f"{'argmax':>6s} {'answers':>7s} {'key ref':>7s} {'key ours':>8s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        k = r["prompts"]
        lines.append(
            f"{r['method']:<12s} {r['spec']:<40s} {r['n']:>5d} {r['max_abs_dlogit']:>11.2e} "
            f"{r['argmax_agree']:>4d}/{k} {r['answers_agree']:>5d}/{k} "
            f"{r['ref_correct']:>5d}/{k} {r['our_correct']:>6d}/{k}"
        )
    return "\n".join(lines)


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ---------------------------------------------------------------- environments


def env_dir(envs: Path, transformers_version: str) -> Path:
    return envs / f"transformers-{transformers_version}"


def ensure_env(envs: Path, transformers_version: str) -> Path:
    """The python of a venv with ``transformers==version`` and the pinned CPU torch."""
    d = env_dir(envs, transformers_version)
    py = d / "bin" / "python"
    stamp = d / ".ready"
    if stamp.is_file():
        return py
    print(f"building {d} (transformers {transformers_version}, {TORCH_SPEC})", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            TORCH_SPEC,
            f"transformers=={transformers_version}",
        ],
        check=True,
    )
    check = (
        "import torch, transformers; "
        f"assert transformers.__version__ == {transformers_version!r}, transformers.__version__; "
        f"assert torch.__version__.split('+')[0] == {TORCH_SPEC.split('==')[1]!r}, torch.__version__"
    )
    subprocess.run([str(py), "-c", check], check=True)
    stamp.write_text(f"{TORCH_SPEC} transformers=={transformers_version}\n", encoding="utf-8")
    return py


# ---------------------------------------------------------------- the reference side (child)


def _stub_gpu_modules() -> None:
    """LongLM's patch package imports flash_attn and triton at module level, for its GPU
    paths; this benchmark uses its eager path. Empty stand-ins let the import succeed, and
    any use of them fails loudly."""
    import importlib.machinery
    import types

    class _Stub:
        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str):
            return _Stub(f"{self._name}.{attr}")

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # used as a decorator
            if self._name.endswith(("jit", "heuristics", "autotune")):
                return lambda fn: fn
            raise RuntimeError(f"{self._name} is a GPU stand-in and must not be called")

    for name in ("flash_attn", "triton", "triton.language"):
        if name in sys.modules:
            continue
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__getattr__ = lambda attr, _n=name: _Stub(f"{_n}.{attr}")
        sys.modules[name] = mod
    sys.modules["triton"].language = sys.modules["triton.language"]


def _repeat_kv_projections(model) -> None:
    """k_proj/v_proj producing one key/value head per query head (rows repeated): what
    grouped-query attention computes, in the layout LM-Infinite's code reads."""
    import torch

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads == kv_heads:
        return
    hd = cfg.hidden_size // heads
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            w = old.weight.detach().view(kv_heads, hd, -1).repeat_interleave(heads // kv_heads, 0)
            new = torch.nn.Linear(old.in_features, heads * hd, bias=old.bias is not None)
            new.weight.data = w.reshape(heads * hd, -1).contiguous()
            if old.bias is not None:
                b = old.bias.detach().view(kv_heads, hd).repeat_interleave(heads // kv_heads, 0)
                new.bias.data = b.reshape(-1).contiguous()
            setattr(attn, name, new)
        attn.num_key_value_heads = heads
        attn.num_key_value_groups = 1


def worker(request_path: str) -> None:
    """Child: run one reference on one prompt; write the logits and tokens to files."""
    req = json.loads(Path(request_path).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(req["threads"])
    import transformers
    from transformers import LlamaForCausalLM

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    kwargs = {"torch_dtype": torch.float32}
    if version >= (4, 36):
        kwargs["attn_implementation"] = "eager"  # the class the patches look for
    # transformers 4.38 sizes its causal-mask buffer by max_position_embeddings and never
    # grows it while decoding, so the eager attention fails one token past the trained
    # length; a larger value changes nothing else (rotary angles come from position ids).
    saved = json.loads((Path(req["model_dir"]) / "config.json").read_text())
    kwargs["max_position_embeddings"] = max(
        saved["max_position_embeddings"], len(req["input_ids"]) + req["max_new_tokens"] + 1
    )
    # transformers 4.x reads only the top-level rope_theta; a config saved by 5.x may hold
    # the base in rope_parameters alone, and 4.x would then silently run base 10000.
    theta = saved.get("rope_theta", (saved.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None:
        kwargs["rope_theta"] = theta
    model = LlamaForCausalLM.from_pretrained(req["model_dir"], **kwargs).eval()
    ref_freq = model.model.layers[0].self_attn.rotary_emb.inv_freq.double()
    if not torch.allclose(ref_freq, torch.tensor(req["inv_freq"], dtype=torch.float64)):
        raise SystemExit(
            "the reference model's RoPE frequencies differ from ours: "
            f"{ref_freq[:3].tolist()} vs {req['inv_freq'][:3]} (check rope_theta in config.json)"
        )
    method, s = req["method"], req["settings"]
    trim = None
    one_by_one = False
    if method == "self-extend":
        _stub_gpu_modules()
        sys.path.insert(0, req["repo"])
        import SelfExtend

        SelfExtend.apply(model, s["group"], s["window"], enable_flash_attention=False)
    elif method == "lm-infinite":
        sys.path.insert(0, req["repo"])
        _repeat_kv_projections(model)
        from models.llama import convert_llama_model

        convert_llama_model(model, s["local_branch"], s["global_branch"])
    elif method == "streaming":
        sys.path.insert(0, req["repo"])
        from streaming_llm.enable_streaming_llm import enable_streaming_llm

        trim = enable_streaming_llm(model, s["start_size"], s["recent_size"])
        one_by_one = True
    elif method != "vanilla":
        raise SystemExit(f"unknown method {method!r}")

    ids = torch.tensor([req["input_ids"]])
    eos = req["eos_token_id"]
    t0 = time.perf_counter()
    with torch.no_grad():
        past = None
        if one_by_one:
            for t in range(ids.shape[1]):
                out = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
                past = trim(out.past_key_values)
        else:
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
        first = out.logits[0, -1].float().clone()
        logits, tokens = first, []
        for _ in range(req["max_new_tokens"]):
            token = int(logits.argmax())
            tokens.append(token)
            if token == eos:
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = trim(out.past_key_values) if trim is not None else out.past_key_values
            logits = out.logits[0, -1].float()
    seconds = time.perf_counter() - t0
    torch.save(first, req["logits_path"])
    result = {"tokens": tokens, "seconds": seconds, "transformers": transformers.__version__}
    Path(req["result_path"]).write_text(json.dumps(result), encoding="utf-8")


def run_reference(py: Path, request: dict) -> tuple[object, dict]:
    import torch

    with tempfile.TemporaryDirectory(prefix="vsref-") as tmp:
        request = dict(request)
        request["logits_path"] = str(Path(tmp) / "logits.pt")
        request["result_path"] = str(Path(tmp) / "result.json")
        req_path = Path(tmp) / "request.json"
        req_path.write_text(json.dumps(request), encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS=str(request["threads"]), PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        subprocess.run([str(py), str(Path(__file__).resolve()), "--worker", str(req_path)],
                       check=True, env=env)  # fmt: skip
        logits = torch.load(request["logits_path"])
        result = json.loads(Path(request["result_path"]).read_text(encoding="utf-8"))
    return logits, result


# ---------------------------------------------------------------- our side and the loop


def run_ours(model, tok, spec: str, ids, max_new: int):
    import torch

    import longreach as lr
    from longreach.prefill import greedy, prefill

    t0 = time.perf_counter()
    with torch.no_grad(), lr.extend(model, spec) as handle:
        state = prefill(model, ids, chunk=ids.shape[1], cache=handle.new_cache())
        first = state.logits[0].float().clone()
        new = greedy(model, state, max_new, tok.eos_token_id)
    return first, [int(x) for x in new[0]], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table is not None:
        print(format_table(summarize(read_records(args.table))))
        return
    import torch

    import longreach as lr
    from longreach.models.loader import resolve_model_dir
    from longreach.tasks import Passkey, PromptFormat

    torch.set_num_threads(args.threads)
    settings = settings_of(args)
    model, tok = lr.load("smollm2-135m", dtype="fp32")
    model_dir = str(resolve_model_dir("smollm2-135m"))
    records = read_records(args.out)
    done = {cell_key(r["method"], r["spec"], r["n"], r["depth"]) for r in records}
    task, fmt = Passkey(), PromptFormat(tok)
    pythons = {}
    for n in args.lengths:
        for i, depth in enumerate(args.depths):
            sample = task.generate(fmt, n, depth, args.seed, i)
            ids = torch.tensor([sample.input_ids])
            for method in args.methods:
                spec = settings.ours(method)
                if cell_key(method, spec, n, depth) in done:
                    continue
                ref = REFERENCES[method]
                if ref.transformers not in pythons:
                    pythons[ref.transformers] = ensure_env(args.envs, ref.transformers)
                repo = getattr(args, ref.repo_flag) if ref.repo_flag else None
                request = {
                    "method": method,
                    "repo": str(Path(repo).resolve()) if repo else None,
                    "settings": settings.reference(method),
                    "model_dir": model_dir,
                    "input_ids": sample.input_ids,
                    "max_new_tokens": sample.max_new_tokens,
                    "eos_token_id": tok.eos_token_id,
                    "threads": args.threads,
                    "inv_freq": model.model.rotary_emb.inv_freq.double().tolist(),
                }
                print(f"{method} n={n} depth={depth}: reference ...", flush=True)
                ref_logits, ref_result = run_reference(pythons[ref.transformers], request)
                print(f"{method} n={n} depth={depth}: ours ...", flush=True)
                our_logits, our_tokens, our_seconds = run_ours(
                    model, tok, spec, ids, sample.max_new_tokens
                )
                ref_text = tok.decode(ref_result["tokens"], skip_special_tokens=True)
                our_text = tok.decode(our_tokens, skip_special_tokens=True)
                rec = {
                    "method": method,
                    "spec": spec,
                    "reference": ref.note,
                    "reference_settings": settings.reference(method),
                    "transformers_ref": ref_result["transformers"],
                    "n": n,
                    "tokens": len(sample.input_ids),
                    "depth": round(depth, 4),
                    "sample": i,
                    "expected": sample.expected[0],
                    "ref_answer": ref_text.strip()[:32],
                    "our_answer": our_text.strip()[:32],
                    "ref_correct": task.score(sample, ref_text) >= 1.0,
                    "our_correct": task.score(sample, our_text) >= 1.0,
                    "ref_seconds": round(ref_result["seconds"], 1),
                    "our_seconds": round(our_seconds, 1),
                    "dtype": "fp32",
                    "threads": args.threads,
                }
                rec.update(compare(ref_logits, our_logits, ref_result["tokens"], our_tokens))
                print(json.dumps(rec), flush=True)
                records.append(rec)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
    print(format_table(summarize(records)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
