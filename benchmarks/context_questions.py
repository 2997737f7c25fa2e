"""N questions on one document: ``longreach.Context`` (encode once) against N full re-prefills.

For one question set of a task (``longreach.tasks.questions``: one document, N questions) the
script times, in one run and on the same tokens:

- **context**: ``Context.encode`` of the document once, then each question read after its
  cache and answered greedily (``answer_ids``);
- **re-prefill**: for each question, one prefill of document + question, then the same
  greedy decoding.

It prints both totals, their ratio, the encoding's share, each way's accuracy and whether
the answers agree token for token. The two ways feed the same tokens in different chunks
(the document's last chunk and the question are one call when re-prefilling): in fp32 that
moves logits by about 1e-6, in bf16 by up to 0.06, which can flip a near tie.

    python benchmarks/context_questions.py --model lab --length 4k --questions 20
    python benchmarks/context_questions.py --model smollm2-135m --length 2k --questions 20 \\
        --task kv-retrieval --chunk 1024
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lab")
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--length", default="4k")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--depth", type=float, default=0.1)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    args = parser.parse_args()

    import torch

    import longreach as lr
    from longreach.bench.grid import parse_length
    from longreach.prefill import greedy, prefill
    from longreach.tasks import PromptFormat, get_task
    from longreach.tasks.questions import question_set

    torch.set_num_threads(args.threads)
    model, tok = lr.load(args.model, dtype=args.dtype)
    task = get_task(args.task)
    length = parse_length(args.length)
    qs = question_set(task, PromptFormat(tok), length, args.depth, 0, 0, args.questions)

    def done(sample):
        return lambda text: task.is_complete(sample, text)

    t0 = time.perf_counter()
    ctx = lr.Context.encode(model, tok, qs.document_ids, method=args.method, chunk=args.chunk)
    encode_s = time.perf_counter() - t0
    shared = [
        ctx.ask_ids(ids, s.max_new_tokens, done(s))
        for ids, s in zip(qs.question_ids, qs.samples, strict=True)
    ]
    context_s = time.perf_counter() - t0

    fresh = []
    t1 = time.perf_counter()
    with lr.extend(model, args.method), torch.inference_mode():
        for sample in qs.samples:
            state = prefill(model, torch.tensor([sample.input_ids]), args.chunk)
            stop = done(sample)
            new = greedy(
                model, state, sample.max_new_tokens, ctx.eos,
                stop=lambda t, stop=stop: stop(tok.decode(t[0], skip_special_tokens=True)),
            )  # fmt: skip
            fresh.append(new[0].tolist())
    fresh_s = time.perf_counter() - t1

    def accuracy(answers):
        scores = [
            task.score(s, tok.decode(a, skip_special_tokens=True))
            for s, a in zip(qs.samples, answers, strict=True)
        ]
        return sum(scores) / len(scores)

    same = sum(a == b for a, b in zip(shared, fresh, strict=True))
    print(
        f"{args.model} · {args.method} · {args.task} · document {len(qs.document_ids)} tokens · "
        f"{args.questions} questions · {args.dtype} · {torch.get_num_threads()} thread(s)"
    )
    print(
        f"context:    {context_s:8.2f} s  (encode {encode_s:.2f} s, questions {context_s - encode_s:.2f} s)"
    )
    print(f"re-prefill: {fresh_s:8.2f} s")
    print(f"ratio re-prefill / context: {fresh_s / context_s:.2f}x")
    print(
        f"accuracy context {accuracy(shared):.2f}, re-prefill {accuracy(fresh):.2f}; "
        f"identical answers {same}/{len(shared)}"
    )


if __name__ == "__main__":
    main()
