"""The CUDA persistent-loop planner's plan step on its own (`cuda.loop.schedule_loop` -> `Schedule`:
stages, element owners, shared-memory residency and layout, grid barriers; no source written), and
the onehot id check of a multi-block persistent kernel in the grid emulator. No device, no simulator.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_sim import _embedding_graph, _emulate, assert_close, reference, training_graph

import unroll as ur
from unroll.backends.cuda import loop as cuda_loop
from unroll.backends.cuda.loop import DeviceProps, LoopOptions, NotPersistent, schedule_loop


def _loops(cell: str, **dims):
    from unroll.backends.cuda.backend import PASSES
    from unroll.ir.node import toposort
    from unroll.ir.ops import Op
    from unroll.ir.optimize import optimize
    graph, _, _ = training_graph(cell, **dims)
    graph = optimize(graph, passes=list(PASSES))
    fwd, bwd = [n for n in toposort(list(graph.outputs)) if n.op is Op.LOOP]
    return fwd, bwd


def test_plan_step_of_an_lstm(monkeypatch) -> None:
    """Stages, what lives in shared memory, who computes which columns, barriers: all decided
    before (and without) any source."""
    monkeypatch.setattr(cuda_loop, "emit_loop", lambda *a: pytest.fail("the plan step wrote source"))
    monkeypatch.setattr(cuda_loop, "_LoopWriter", None)
    fwd, bwd = _loops("lstm", T=3, B=2, I=3, H=8)
    sc = schedule_loop(fwd, LoopOptions(blocks=2), DeviceProps())
    # forward: h @ W (W's slices resident in shared memory), then one stage for the cell's outputs
    assert [(st.kind, st.output) for st in sc.stages] == [("matmul", False), ("pointwise", True)]
    (p,) = sc.smem
    assert p.op.value == "matmul" and p.src[1].shape == (8, 32) and sc.scratch == []
    # block g owns hidden units 4g..4g+3 (all rows) and computes exactly their four gate columns
    assert sc.owners[sc.outputs[0]].reshape(2, 8).tolist() == [[0] * 4 + [1] * 4] * 2
    assert sc.needed[p] == [{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                            {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}]
    # one grid barrier per step, before h @ W (it reads the h that other blocks wrote)
    assert [st.grid_sync for st in sc.stages] == [True, False] and sc.grid_syncs == 1
    # shared memory per block: W's 16 columns (K = 8 rows), then P's 16 columns (M = 2 rows)
    assert sc.layout[p] == (0, 8 * 16, 16) and sc.shared_bytes == (8 * 16 + 2 * 16) * 4
    # one block: every column, no grid barrier
    one = schedule_loop(fwd, LoopOptions(blocks=1), DeviceProps())
    assert one.grid_syncs == 0 and one.needed[one.smem[0]] == [set(range(32))]
    # backward: the gate gradients are a scratch stage feeding dgates @ W.T, one barrier before it
    back = schedule_loop(bwd, LoopOptions(blocks=2), DeviceProps())
    assert [(st.kind, st.output) for st in back.stages] == [("pointwise", False), ("matmul", False),
                                                             ("pointwise", True)]
    assert back.scratch == [back.stages[0].node] and back.smem == [back.stages[1].node]
    assert [st.grid_sync for st in back.stages] == [False, True, False]
    assert back.description()["grid_syncs_per_step"] == 1


@pytest.mark.parametrize("cell,stages", [("gru", 2), ("rnn", 2)])
def test_plan_step_of_gru_and_rnn_forward(cell: str, stages: int) -> None:
    fwd, _ = _loops(cell, T=3, B=2, I=3, H=8)
    sc = schedule_loop(fwd, LoopOptions(blocks=2), DeviceProps())
    assert len(sc.stages) == stages and sc.grid_syncs == 1 and len(sc.smem) == 1
    assert sc.stages[0].kind == "matmul" and sc.stages[0].grid_sync


def test_plan_step_gives_up_resident_weights_when_shared_memory_is_short() -> None:
    fwd, _ = _loops("rnn", T=2, B=2, I=3, H=8)
    full = schedule_loop(fwd, LoopOptions(blocks=1), DeviceProps())
    assert len(full.smem) == 1 and not full.notes
    short = schedule_loop(fwd, LoopOptions(blocks=1), DeviceProps(max_shared_bytes=full.shared_bytes - 1))
    assert short.smem == [] and short.shared_bytes == 0
    assert short.notes == [f"1 blocks need {full.shared_bytes} bytes of shared memory"]
    assert short.description()["inlined_matmuls"] == 1


def test_plan_step_refuses_a_nested_loop() -> None:
    x = ur.input("x", (2, 2, 2))

    def outer(h, xt):
        c, _ = ur.scan(lambda c, k: (ur.tanh(c + xt), c), h, length=2)
        return c, c
    _, ys = ur.scan(outer, ur.zeros((2, 2)), x)
    with pytest.raises(NotPersistent, match="nested loop"):
        schedule_loop(ys.src[0], LoopOptions(), DeviceProps())


def test_plan_and_emit_steps_make_the_kernel() -> None:
    """plan_loop = schedule_loop + emit_loop; the LoopPlan keeps its Schedule."""
    fwd, _ = _loops("lstm", T=3, B=2, I=3, H=8)
    plan = cuda_loop.plan_loop(fwd, LoopOptions(blocks=2), DeviceProps())
    again = cuda_loop.emit_loop(schedule_loop(fwd, LoopOptions(blocks=2), DeviceProps()), lambda n: True)
    assert plan.schedule is not None and plan.description == plan.schedule.description()
    assert plan.spec.body == again.body and plan.spec.body.count("cuda.atomic.add(bar, 0, 1)") == 2


def test_out_of_range_onehot_ids_in_a_multiblock_persistent_loop() -> None:
    """The persistent kernel records the id like the other kernels; the emulator raises after the run."""
    graph, feeds = _embedding_graph()
    graph = ur.graph(*graph.outputs[2:])  # the loop's outputs only: its kernel is the one that checks
    feeds = {k: v for k, v in feeds.items() if k != "emb.weight"}
    outs, program = _emulate(graph, feeds, 2)
    assert [p["path"] for p in program.plan] == ["persistent"]
    assert not any(s.checks for s in program.specs() if not s.name.startswith("persistent"))
    assert any(s.checks for s in program.specs() if s.name.startswith("persistent"))
    assert_close(outs, reference(graph, feeds))
    ids = np.array(feeds["ids"])
    ids[3, 2] = 9
    with pytest.raises(IndexError, match="onehot: id (9|10) is out of range for depth 6"):
        _emulate(graph, {**feeds, "ids": ids}, 2)
