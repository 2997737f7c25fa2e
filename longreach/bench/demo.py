"""The demo: a small benchmark and its report on the embedded default model, in minutes.

``DEMO_MODEL`` is the one line to change when the default model changes: the in-project lab
model (``"lab"``, trained at 256 tokens, so lengths of 2-8x its trained length cost
seconds); SmolLM2-135M-Instruct was the default before the lab model retrieved. Each model has a plan; the lab
plan measures past the trained length, where vanilla fails and the extension methods
should not. SmolLM2's trained length (8192) is too long for that on a 2-core CPU within
five minutes, so its plan stays at short lengths and only shows the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longreach.bench.grid import BenchConfig

DEMO_MODEL = "lab"


@dataclass(frozen=True)
class Reach:
    """One method measured on passkey at further multiples of the trained length."""

    method: str
    multiples: tuple[float, ...]
    depths: tuple[float, ...] | None = None  # None: the plan's
    samples: int | None = None  # None: the plan's


@dataclass(frozen=True)
class DemoPlan:
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    lengths: tuple[int, ...] = ()  # absolute token counts, or
    multiples: tuple[float, ...] = ()  # multiples of the model's trained length
    depths: tuple[float, ...] = (0.5,)
    samples: int = 2
    reach: tuple[Reach, ...] = ()  # methods at extra multiples, passkey only

    def lengths_for(self, trained: int | None) -> list[int]:
        if self.multiples and trained:
            return sorted({int(m * trained) for m in self.multiples})
        return list(self.lengths or (1024, 2048))


PLANS: dict[str, DemoPlan] = {
    "lab": DemoPlan(
        methods=(
            "vanilla",
            "yarn:factor=4",
            "self-extend:group=4,window=128",
            "lm-infinite",
            "infllm",
        ),
        tasks=("passkey", "perplexity:last=64"),
        multiples=(1, 2, 4, 8),
        # The memory method at 32x the trained length too (8192 tokens): passkey only, where
        # the dense methods would cost minutes and answer nothing. The readers at 32x and
        # 128x (32768 tokens), one sample per depth: 2-16 s a sample on one core.
        reach=(
            Reach("infllm", (32,)),
            Reach("infiniretri", (32, 128), (0.1, 0.5, 0.9), 1),
            Reach("xl3m", (32, 128), (0.1, 0.5, 0.9), 1),
        ),
        depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        samples=3,
    ),
    "smollm2-135m": DemoPlan(
        methods=("vanilla", "yarn:factor=4"),
        tasks=("passkey", "perplexity:last=128"),
        lengths=(1024, 2048),
        samples=2,
    ),
}
FALLBACK_PLAN = DemoPlan(
    methods=("vanilla", "yarn:factor=4"), tasks=("passkey",), lengths=(1024, 2048)
)


def demo_plan(model: str) -> DemoPlan:
    return PLANS.get(model, FALLBACK_PLAN)


def demo_configs(out: Path, model: str, trained: int | None) -> list[BenchConfig]:
    """The demo's grids: the main one, then one per ``reach`` entry, all in ``out/demo.db``."""
    plan = demo_plan(model)
    configs = [demo_config(out, model, trained)]
    for reach in plan.reach if trained else ():
        configs.append(
            BenchConfig(
                model=model,
                methods=[reach.method],
                tasks=[plan.tasks[0]],
                lengths=sorted({int(m * trained) for m in reach.multiples}),
                depths=list(reach.depths or plan.depths),
                samples=reach.samples or plan.samples,
                seed=0,
                chat=False,
                db=str(Path(out) / "demo.db"),
            )
        )
    return configs


def demo_config(out: Path, model: str, trained: int | None) -> BenchConfig:
    """The bench configuration of the demo; its database lives in ``out/demo.db`` (a rerun resumes)."""
    plan = demo_plan(model)
    return BenchConfig(
        model=model,
        methods=list(plan.methods),
        tasks=list(plan.tasks),
        lengths=plan.lengths_for(trained),
        depths=list(plan.depths),
        samples=plan.samples,
        seed=0,
        chat=False,
        db=str(Path(out) / "demo.db"),
    )
