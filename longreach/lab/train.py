"""Train the lab model: a small Llama (RoPE, RMSNorm, SwiGLU) at a short context.

``train(TrainConfig(...))`` runs the whole recipe: tokenizer, data (text + synthetic
retrieval samples), Dataset Decomposition batches (or the concat-and-chunk baseline),
AdamW with warm-up and cosine decay, checkpoints for resume, and the export of a normal
Hugging Face model directory. Same seed, same result: the data of step ``s`` comes from a
generator seeded with ``(seed, s)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.

Mixed precision: bf16 autocast only where the CPU has bf16 units that beat fp32 (AMX-BF16, Arm BF16,
AVX512-BF16 where the probe in compat.cpu_supports_bf16 measures it faster); on an AVX2-only CPU bf16
matmuls are ~300x slower than fp32, so training runs in fp32 there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longreach.compat import cpu_supports_bf16
from longreach.errors import LongreachError
from longreach.lab import corpus, decomposition, synthetic
from longreach.lab.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass
class TrainConfig:
    out_dir: Path = Path("runs/lab")
    seed: int = 0
    pipeline: str = "dd"  # "dd" (Dataset Decomposition) or "concat" (concat-and-chunk)
    steps: int = 3000
    token_budget: int = 2048  # tokens per optimisation step
    seq_len: int = 256  # the trained context length
    min_len: int = 32  # shortest Dataset Decomposition bucket
    curriculum_cycles: int = 4
    curriculum_sharpness: float = 8.0
    synthetic_fraction: float = 0.6  # share of training tokens that are retrieval samples
    copy_share: float = 0.4  # share of those that are copy sequences (the rest: harness tasks)
    copy_warmup_steps: int = 600  # first steps: repeated random-token lists only (see Batches)
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 100
    eval_windows: int = 24  # held-out windows of seq_len tokens for the validation loss
    probe_samples: int = 10  # passkey samples at seq_len scored at each evaluation (0: none)
    max_text_docs: int | None = None  # for tests: use only the first n documents
    init_from: str | None = None  # continue from this model directory (its tokenizer too)
    threads: int | None = None
    force: bool = False  # overwrite a model in out_dir that this run's checkpoint did not make

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.pipeline not in ("dd", "concat"):
            raise LongreachError(f"unknown pipeline {self.pipeline!r}; choose dd or concat.")


@dataclass
class StepInfo:
    step: int
    steps: int
    loss: float
    lr: float
    seq_len: int
    tokens: int
    seconds: float  # wall time of this step
    val_loss: float | None = None
    passkey: float | None = None  # probe accuracy at the trained length, at evaluations


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    train_seconds: float  # optimisation steps only (this process and resumed ones)
    val_loss: float
    history: list[dict] = field(default_factory=list)


def model_config(cfg: TrainConfig, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    tokenizer: object
    text_docs: list[np.ndarray]  # token ids without <s>
    synthetic: list[np.ndarray]  # <s>-led, bucket lengths
    val_rows: np.ndarray  # (eval_windows, seq_len) held-out essay windows

    @property
    def text_tokens(self) -> int:
        return sum(len(d) for d in self.text_docs)


def _work_dir(cfg: TrainConfig) -> Path:
    return cfg.out_dir / "work"


def prepare_tokenizer(cfg: TrainConfig, docs: list[corpus.Document]):
    if cfg.init_from:
        return AutoTokenizer.from_pretrained(cfg.init_from)
    path = _work_dir(cfg) / "tokenizer"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path)
    tok = train_tokenizer([d.text for d in docs] + list(_PROMPT_TEXT), vocab_size=cfg.vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# The fixed text of the retrieval prompts, repeated so that its words get tokens of their own.
_PROMPT_TEXT = [
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there. The grass is green. The sky is "
    "blue. The sun is yellow. Here we go. There and back again. The pass key is 12345. Remember "
    "it. 12345 is the pass key. What is the pass key? The pass key is 12345. Some special magic "
    "numbers are hidden within the following text. Make sure to memorize them. I will quiz you "
    "about the numbers afterwards. What is the special magic number for Kyoto mentioned in the "
    "provided text? The special magic number for Kyoto mentioned in the provided text is 1234567."
    " Extract the value corresponding to the specified key in the JSON object below. JSON data: "
    "Key: Corresponding value:"
] * 20


def training_essays_dir(cfg: TrainConfig, docs: list[corpus.Document]) -> Path:
    """A folder of the training essays: the essay haystack of the retrieval samples."""
    folder = _work_dir(cfg) / "essays"
    folder.mkdir(parents=True, exist_ok=True)
    for d in docs:
        if d.source == "paul_graham" and not (folder / d.name).exists():
            (folder / d.name).write_text(d.text, encoding="utf-8")
    return folder


def synthetic_pool(
    cfg: TrainConfig, tokenizer, essays_dir: Path, n_tokens: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Retrieval samples, about ``n_tokens`` in all.

    ``copy_share`` of the tokens are copy sequences, spread evenly over the buckets; the rest
    are harness tasks at bucket lengths >= 128, 60% of their tokens at the trained length,
    where passkey accuracy counts.
    """
    lengths = [
        n
        for n in decomposition.bucket_lengths(cfg.seq_len, cfg.min_len)
        if n >= synthetic.MIN_LENGTH
    ]
    shares = {n: 0.6 if n == cfg.seq_len else 0.4 / max(1, len(lengths) - 1) for n in lengths}
    if len(lengths) == 1:
        shares = {lengths[0]: 1.0}
    pool: list[np.ndarray] = []
    all_lengths = decomposition.bucket_lengths(cfg.seq_len, cfg.min_len)
    copy_tokens = n_tokens * cfg.copy_share
    n_tokens -= copy_tokens
    for n in all_lengths:  # copy sequences: the same number of tokens in every bucket
        for _ in range(int(copy_tokens / len(all_lengths) / n)):
            pool.append(np.asarray(synthetic.copy_sequence(tokenizer, rng, n), dtype=np.int64))
    for n in lengths:
        for _ in range(int(n_tokens * shares[n] / n)):
            try:
                ids = synthetic.retrieval_sequence(tokenizer, rng, n, essays_dir, seed=cfg.seed)
            except LongreachError:
                # A tiny test vocabulary spends more than n tokens on the prompt's fixed text.
                log.warning("retrieval prompts do not fit in %d tokens; none at that length", n)
                break
            pool.append(np.asarray(ids, dtype=np.int64))
    return pool


def prepare_data(cfg: TrainConfig, on_status: Callable[[str], None] = log.info) -> Data:
    docs = corpus.training_documents(cfg.max_text_docs)
    tokenizer = prepare_tokenizer(cfg, docs)
    text_docs = [
        np.asarray(tokenizer(d.text, add_special_tokens=False).input_ids, dtype=np.int64)
        for d in docs
    ]
    text_tokens = sum(len(d) for d in text_docs)
    f = cfg.synthetic_fraction
    on_status(f"{len(text_docs)} documents, {text_tokens:,} tokens; writing retrieval samples")
    pool = synthetic_pool(
        cfg,
        tokenizer,
        training_essays_dir(cfg, docs),
        int(text_tokens * f / max(1e-9, 1 - f)),
        np.random.default_rng(cfg.seed),
    )
    val_ids = np.asarray(
        tokenizer(corpus.validation_text(), add_special_tokens=False).input_ids, dtype=np.int64
    )
    step = cfg.seq_len - 1
    n = min(cfg.eval_windows, len(val_ids) // step)
    val_rows = np.stack(
        [
            np.concatenate([[tokenizer.bos_token_id], val_ids[i * step : (i + 1) * step]])
            for i in range(n)
        ]
    )
    return Data(tokenizer, text_docs, pool, val_rows)


class Batches:
    """The batch of step ``s``, a pure function of ``(seed, s)`` (resume-safe).

    The first ``copy_warmup_steps`` steps are repeated random-token lists only
    (:func:`synthetic.repeated_tokens`, generated on the fly): ``min_len`` tokens for two
    thirds of them, then twice that. Induction heads (find the earlier occurrence of the
    current token, predict what followed it) form there, and every retrieval task is learnt
    on top of them. Measured on this model (2048 tokens a step, lr 3e-3, 1 thread):

    - copy sequences only mixed into the text (12% of the tokens): no induction head after
      1,500 steps (loss on the copied half of a random-token list 8.4, as on the first half)
      and no passkey retrieved;
    - repeated lists alone, 128-token rows, periods of 32-64: loss still 8.1-8.2 (of 8.3)
      after 550 steps, with 2 or 4 heads;
    - repeated lists alone, 32-token rows, periods of 8-16: loss on the last quarter 7.9,
      5.2, 3.4 after 50, 300, 500 steps.

    (A fixed period is learnt in 150 steps, but by a head that attends at a fixed offset,
    which does not help retrieval.)
    """

    def __init__(self, cfg: TrainConfig, data: Data) -> None:
        self.cfg = cfg
        self.tokenizer = data.tokenizer
        bos = data.tokenizer.bos_token_id
        if cfg.pipeline == "dd":
            self.buckets = decomposition.build_buckets(
                data.text_docs, bos, cfg.seq_len, cfg.min_len, extra=data.synthetic
            )
        else:
            docs = list(data.text_docs) + list(data.synthetic)
            self.rows = decomposition.concat_and_chunk(
                docs, bos, cfg.seq_len, np.random.default_rng([cfg.seed, 1])
            )

    def __call__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.cfg.seed, 2, step])
        if step < self.cfg.copy_warmup_steps:
            # Short rows first: at initialisation attention is spread evenly over the
            # context, so the signal for the right key falls with the row length.
            short = step < 2 * self.cfg.copy_warmup_steps // 3
            n = self.cfg.min_len if short else min(2 * self.cfg.min_len, self.cfg.seq_len)
            rows = [
                synthetic.repeated_tokens(self.tokenizer, rng, n)
                for _ in range(max(1, self.cfg.token_budget // n))
            ]
            return torch.tensor(rows, dtype=torch.int64)
        if self.cfg.pipeline == "dd":
            batch = decomposition.dd_batch(
                self.buckets,
                rng,
                step / self.cfg.steps,
                self.cfg.token_budget,
                cycles=self.cfg.curriculum_cycles,
                sharpness=self.cfg.curriculum_sharpness,
            )
        else:
            batch = decomposition.chunk_batch(self.rows, rng, self.cfg.token_budget)
        return torch.from_numpy(batch)


# --------------------------------------------------------------------------- training


def autocast_context():
    if cpu_supports_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model, rows: np.ndarray, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = torch.from_numpy(rows[i : i + batch_size])
        with autocast_context():
            loss = model(input_ids=x, labels=x).loss
        total += float(loss) * len(x)
        count += len(x)
    model.train()
    return total / max(1, count)


def passkey_probe(model, tokenizer, cfg: TrainConfig) -> float | None:
    """Passkey accuracy at the trained length on ``probe_samples`` evaluation samples.

    Training watches it because the validation loss says nothing about copying: the first
    checkpoint's loss kept falling while it never retrieved a key.
    """
    if cfg.probe_samples <= 0:
        return None
    from longreach.lab.evaluate import passkey_accuracy

    model.eval()
    try:
        return passkey_accuracy(model, tokenizer, cfg.seq_len, cfg.probe_samples).accuracy
    except LongreachError:  # a test's tiny vocabulary cannot fit the prompt
        return None
    finally:
        model.train()


def _save_state(path: Path, model, opt, step: int, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, **extra}, tmp)
    os.replace(tmp, path)  # atomic: an interruption never leaves a half-written checkpoint


def train(
    cfg: TrainConfig,
    data: Data | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume) and export the model to ``cfg.out_dir``; see the module docstring.

    ``data`` (from ``prepare_data``) lets several runs share one preparation (the benchmark).
    ``on_step`` is called after every step; an exception it raises (e.g. KeyboardInterrupt)
    stops training, and the next call resumes from the last checkpoint.
    """
    status = on_status or (lambda msg: log.info(msg))
    check_out_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work = _work_dir(cfg)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LongreachError(
            f"cannot create {work} ({exc.strerror or exc}); pass an --out folder that can be written."
        ) from None
    state_path = work / STATE_FILE

    if data is None:
        status("preparing tokenizer and data")
        data = prepare_data(cfg, status)
    batches = Batches(cfg, data)

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM._from_config(
        model_config(cfg, data.tokenizer), attn_implementation="sdpa", dtype=torch.float32
    )
    if cfg.init_from:
        from safetensors.torch import load_file

        weights = load_file(str(Path(cfg.init_from) / "model.safetensors"))
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
        model.load_state_dict(weights)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    start, tokens, seconds, history = 0, 0, 0.0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state.get("config") != _config_key(cfg):
            raise LongreachError(
                f"the checkpoint in {work} was made with another configuration; "
                "delete that folder or pass the same options to resume."
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, tokens = state["step"], state["tokens"]
        seconds, history = state["seconds"], state["history"]
        status(f"resumed from step {start}")

    def checkpoint(step: int) -> None:
        _save_state(
            state_path,
            model,
            opt,
            step,
            {
                "tokens": tokens,
                "seconds": seconds,
                "history": history,
                "config": _config_key(cfg),
            },
        )

    status(f"training on {'bf16 autocast' if cpu_supports_bf16() else 'fp32'}")
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        x = batches(step)
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast_context():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        seconds += dt
        tokens += x.numel()
        done = step + 1
        val = probe = None
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = validation_loss(model, data.val_rows)
            probe = passkey_probe(model, data.tokenizer, cfg)
        record = {
            "step": done,
            "loss": round(loss.item(), 4),
            "seq_len": x.shape[1],
            "tokens": tokens,
            "seconds": round(seconds, 2),
        }
        if val is not None:
            record["val_loss"] = round(val, 4)
        if probe is not None:
            record["passkey"] = probe
        history.append(record)
        if on_step:
            on_step(
                StepInfo(done, cfg.steps, loss.item(), lr, x.shape[1], x.numel(), dt, val, probe)
            )
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint(done)

    final_val = validation_loss(model, data.val_rows)
    export(cfg, model, data, tokens, seconds, final_val, history)
    return TrainResult(cfg.out_dir, cfg.steps, tokens, seconds, final_val, history)


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuse an ``out_dir`` that is a file, or that holds a model this run did not make.

    A folder with a model but no ``work/`` checkpoint (the shipped checkpoint, a copy of
    it, a run whose ``work/`` was deleted) would be overwritten without a way back; only
    ``force`` allows it. A folder with a checkpoint resumes.
    """
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise LongreachError(f"--out {out} is a file; pass a folder for the trained model.")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise LongreachError(f"--out {out} lies under the file {parent}; pass another folder.")
    has_model = (out / "model.safetensors").exists()
    if has_model and not (_work_dir(cfg) / STATE_FILE).exists() and not cfg.force:
        raise LongreachError(
            f"{out} already holds a trained model and no checkpoint of this run (work/{STATE_FILE}); "
            "training would overwrite it: pass another --out, or --force to replace it."
        )


def _config_key(cfg: TrainConfig) -> dict:
    key = asdict(cfg)
    for volatile in (
        "out_dir", "checkpoint_every", "eval_every", "threads", "probe_samples", "force",
    ):  # fmt: skip
        key.pop(volatile)
    return key


def export(cfg, model, data: Data, tokens: int, seconds: float, val_loss: float, history) -> None:
    """Write the Hugging Face model directory (config, safetensors, tokenizer) and a recipe."""
    model.eval()
    model.generation_config.pad_token_id = data.tokenizer.pad_token_id
    model.save_pretrained(cfg.out_dir, safe_serialization=True)
    data.tokenizer.save_pretrained(cfg.out_dir)
    info = {
        "recipe": _config_key(cfg),
        "trained_length": cfg.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "text_tokens": data.text_tokens,
        "synthetic_sequences": len(data.synthetic),
        "train_tokens": tokens,
        "train_seconds": round(seconds, 1),
        "val_loss": round(val_loss, 4),
        "precision": "bf16 autocast" if cpu_supports_bf16() else "fp32",
        "history": [h for h in history if "val_loss" in h],
    }
    (cfg.out_dir / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
