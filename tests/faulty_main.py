"""``main.py`` with a SIGKILL at the point that ``$HAIRSEG_FAULT`` names (preemption tests).

Run as ``python tests/faulty_main.py --config=... --workdir=...`` from the repository root.
``$HAIRSEG_FAULT`` (unset: plain ``main.py``) is one of:

  step=N                    while train step N runs (just after it is dispatched);
  eval=K                    when the evaluation input has delivered its K-th batch, counted
                            over this process (K=2: after the first batch was predicted);
  save=DIR/STEP             when checkpoint DIR/STEP (DIR: checkpoints or best) is fully
                            written in its temporary folder, before the rename that commits it.

The process kills itself with SIGKILL: nothing is flushed, no handler or thread runs on.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def die() -> None:
    """Ends the process the way a lost machine or the OOM killer does."""
    sys.stderr.write(f"faulty_main: SIGKILL at {os.environ['HAIRSEG_FAULT']}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_step(step: int) -> None:
    from hairseg_jax import steps

    jit_steps = steps.jit_steps

    def faulty_jit_steps(*args, **kwargs):
        train, *others = jit_steps(*args, **kwargs)

        def faulty_train(state, batch):
            this_step = int(state.step) + 1  # read before the state is donated
            result = train(state, batch)
            if this_step == step:
                die()
            return result

        return (faulty_train, *others)

    steps.jit_steps = faulty_jit_steps


def kill_in_eval(batch_number: int) -> None:
    from hairseg_jax.data import whole_images

    eval_batches = whole_images.eval_batches
    delivered = [0]

    def faulty_eval_batches(*args, **kwargs):
        for batch in eval_batches(*args, **kwargs):
            delivered[0] += 1
            if delivered[0] == batch_number:
                die()
            yield batch

    whole_images.eval_batches = faulty_eval_batches


def kill_in_save(where: str) -> None:
    from orbax.checkpoint._src.path import atomicity

    cls = atomicity.AtomicRenameTemporaryPath
    finalize = cls.finalize

    async def faulty_finalize(self, *args, **kwargs):
        final = self.get_final()
        if f"{final.parent.name}/{final.name}" == where:
            die()
        return await finalize(self, *args, **kwargs)

    cls.finalize = faulty_finalize


def install(fault: str) -> None:
    kind, _, where = fault.partition("=")
    if kind == "step":
        kill_in_step(int(where))
    elif kind == "eval":
        kill_in_eval(int(where))
    elif kind == "save":
        kill_in_save(where)
    else:
        raise SystemExit(f"faulty_main: unknown HAIRSEG_FAULT {fault!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if os.environ.get("HAIRSEG_FAULT"):
        install(os.environ["HAIRSEG_FAULT"])
    sys.argv[0] = str(REPO / "main.py")
    runpy.run_path(str(REPO / "main.py"), run_name="__main__")
