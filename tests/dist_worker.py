"""One rank of a multi-process run for tests/test_distributed.py (launched like torchrun launches it:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment).

    python tests/dist_worker.py SCENARIO OUT_DIR

``compare``: prune the cases of :data:`CASES` and save each rank's weights, report and perplexity on
:data:`EVAL` to ``OUT_DIR``.
``fail_solve`` / ``fail_forward``: rank 1 raises inside a solve / a calibration forward.
``stream``: stream ``OUT_DIR/checkpoint`` into ``OUT_DIR/whole`` and ``OUT_DIR/moe-checkpoint`` (fused
experts) into ``OUT_DIR/moe-whole``; stream the first into ``OUT_DIR/resumed`` with rank 1 failing once
block 1 is in the partial folder, then resume that run.
``reconstruction``: prune with block reconstruction on; save each rank's weights and report.
``fail_refit``: rank 1 raises inside a step of the block reconstruction (between two gradient sums).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import calibration_ids, make_tiny_model  # noqa: E402
from moe_models import make_moe_model  # noqa: E402

# every pass in float32 on every machine ("auto" is bfloat16 on a CPU that has it natively), so that one and
# two processes can be compared to 1e-3
SMALL = dict(
    num_samples=8,
    sequence_length=32,
    batch_size=4,
    iterations=5,
    refit_iterations=5,
    compute_dtype="float32",
)
CASES = {
    "llama-50": ("llama", dict(pattern="unstructured")),
    "llama-2:4": ("llama", dict(pattern="2:4")),
    # default min_expert_tokens (128 > the ~64 routed tokens each expert gets): forced routing everywhere
    "qwen3_moe-50": ("qwen3_moe", dict(pattern="unstructured")),
    # routed statistics, three passes of three experts
    "qwen3_moe-2:4": ("qwen3_moe", dict(pattern="2:4", min_expert_tokens=0, experts_per_pass=3)),
}
FAILURE = "injected failure on rank 1"
RECONSTRUCTION = dict(SMALL, batch_size=2, pattern="2:4", reconstruction_epochs=2, reconstruction_lr=5e-3)


def build(case: str):
    from optimum_maiht import MAIHTConfig

    family, options = CASES[case]
    model = make_moe_model(family) if family in ("qwen3_moe",) else make_tiny_model(family)
    return model, MAIHTConfig(**SMALL, **options)


def prune(case: str):
    """The model pruned (in this process, distributed or not) and its pruner."""
    from optimum_maiht import MAIHTPruner

    model, config = build(case)
    pruner = MAIHTPruner(model, config)
    pruner.prune(calibration_ids(), progress=False)
    return model, pruner


EVAL = dict(n=7, seq=16, seed=3)
"""Perplexity windows scored after pruning: 7 windows in batches of 2, so the ranks get 2 and 5."""


def compare(out: Path) -> None:
    from optimum_maiht import distributed
    from optimum_maiht.evaluation import perplexity

    rank = int(os.environ["RANK"])
    for case in CASES:
        model, pruner = prune(case)
        ppl = perplexity(model, None, calibration_ids(**EVAL), batch_size=2, parallel=distributed.current())
        torch.save(
            {"state": model.state_dict(), "report": pruner.report.to_dict(), "perplexity": ppl},
            out / f"{case}-rank{rank}.pt",
        )
        folder = out / f"{case}-saved-rank{rank}"  # only rank 0 may write it
        assert pruner.save_pretrained(folder) == folder.resolve()


def reconstruction(out: Path) -> None:
    from optimum_maiht import MAIHTConfig, MAIHTPruner

    model = make_tiny_model("llama")
    pruner = MAIHTPruner(model, MAIHTConfig(**RECONSTRUCTION))
    pruner.prune(calibration_ids(), progress=False)
    rank = int(os.environ["RANK"])
    torch.save({"state": model.state_dict(), "report": pruner.report.to_dict()}, out / f"rec-rank{rank}.pt")


def fail_refit() -> None:
    from optimum_maiht import MAIHTConfig, MAIHTPruner
    from optimum_maiht.pipeline import BlockCall

    if int(os.environ["RANK"]) == 1:
        run = BlockCall.run

        def run_or_fail(call, block, hidden):
            if torch.is_grad_enabled():  # a training step, not a calibration pass or an error measurement
                raise ValueError(FAILURE)
            return run(call, block, hidden)

        BlockCall.run = run_or_fail
    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**RECONSTRUCTION))
    pruner.prune(calibration_ids(), progress=False)


def fail(where: str) -> None:
    from optimum_maiht import MAIHTPruner
    from optimum_maiht.pipeline import context

    model, config = build("llama-50")
    solver = None
    if int(os.environ["RANK"]) == 1:
        if where == "solve":

            def solver(weight, gram, spec):  # the layer-solver seam: an experiment's own solver
                raise ValueError(FAILURE)

        else:
            real = context.replay
            calls = []

            def broken_forward(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:  # block 1's first pass: between two collective phases
                    raise ValueError(FAILURE)
                return real(*args, **kwargs)

            context.replay = broken_forward
    MAIHTPruner(model, config, solver=solver).prune(calibration_ids(), progress=False)


# without the block refit: its Adam steps turn last-bit differences of the Gram sums (another summation
# order on two ranks) into differences of up to the learning rate; test_two_processes_refit_blocks_with_the_
# same_steps checks the refit under two ranks exactly
STREAM = dict(
    num_samples=8,
    sequence_length=32,
    batch_size=2,
    iterations=3,
    refit_iterations=3,
    reconstruction_epochs=0,
    compute_dtype="float32",  # as SMALL's
)
STREAM_SHARD = "100KB"


def stream(out: Path) -> None:
    from optimum_maiht import MAIHTConfig, MAIHTPruner
    from optimum_maiht.streaming import StreamingStore, partial_folder

    def run(folder: str, **options):
        return MAIHTPruner.prune_to_folder(
            out / "checkpoint",
            out / folder,
            MAIHTConfig(**STREAM),
            calibration_ids(),
            max_shard_size=STREAM_SHARD,
            progress=False,
            **options,
        )

    rank = int(os.environ["RANK"])
    report = run("whole")
    MAIHTPruner.prune_to_folder(  # a fused mixture-of-experts checkpoint, converted block by block
        out / "moe-checkpoint",
        out / "moe-whole",
        MAIHTConfig(**STREAM, min_expert_tokens=0),
        calibration_ids(),
        max_shard_size=STREAM_SHARD,
        progress=False,
    )
    done = StreamingStore.done

    def done_then_fail(self, index, block, record):
        done(self, index, block, record)
        if index == 1 and rank == 1:
            raise ValueError(FAILURE)

    StreamingStore.done = done_then_fail
    try:
        run("resumed")
    except ValueError as err:
        failure = str(err)
    else:
        failure = None
    StreamingStore.done = done
    finished = sorted(p.name for p in partial_folder(out / "resumed").glob("blocks/*.json"))
    resumed = run("resumed", resume=True)
    errors = [[(layer.name, layer.sparsity, layer.error) for layer in r.layers] for r in (report, resumed)]
    record = {
        "world_size": report.world_size,
        "failure": failure,
        "finished": finished,
        "same_errors": errors[0] == errors[1],
    }
    (out / f"stream-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "compare":
        compare(out_dir)
    elif scenario == "stream":
        stream(out_dir)
    elif scenario == "reconstruction":
        reconstruction(out_dir)
    elif scenario == "fail_refit":
        fail_refit()
    else:
        fail(scenario.removeprefix("fail_"))
